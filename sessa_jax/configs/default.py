"""What `make train` runs: MQAR associative recall, small enough to learn on a 2-core CPU in minutes.

Chance accuracy on the answers is 1/32 (values are drawn from 32 tokens); the final line
prints the eval accuracy on held-out examples.
"""

from sessa_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.update(kind="sessa", d_model=64, n_heads=4, n_layers=2, chunk_size=64, max_len=256)
    c.data.update(task="mqar", seq_len=64, batch_size=32)
    c.data.mqar.update(vocab_size=64, num_kv_pairs=8)
    c.optim.update(lr=3e-3, warmup_steps=50, weight_decay=0.1, min_lr_ratio=0.1)
    c.train.update(steps=2000, log_every=250, eval_every=500, eval_batches=8)
    c.checkpoint.update(every=500)
    return c
