"""MQAR (Zoology-style associative recall) at a CPU-feasible size; the matched-comparison task.

python train.py --config=configs/mqar.py --config.model.kind=transformer --config.model.match_params=True
"""

from sessa_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.update(d_model=64, n_heads=4, n_layers=2, chunk_size=64, max_len=256)
    c.data.update(task="mqar", seq_len=128, batch_size=32)
    c.data.mqar.update(vocab_size=128, num_kv_pairs=8)
    c.optim.update(lr=3e-3, warmup_steps=50, weight_decay=0.1)
    c.train.update(steps=1000, log_every=50, eval_every=250, eval_batches=8)
    c.checkpoint.update(every=250)
    return c
