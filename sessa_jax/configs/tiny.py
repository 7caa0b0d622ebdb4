"""Seconds-long run for tests and notebooks: 2-layer width-32 model on a small MQAR."""

from sessa_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.update(d_model=32, n_heads=2, n_layers=2, chunk_size=16, max_len=64)
    c.data.update(task="mqar", seq_len=32, batch_size=8)
    c.data.mqar.update(vocab_size=32, num_kv_pairs=4)
    c.optim.update(lr=3e-3, warmup_steps=5)
    c.train.update(steps=30, log_every=10, eval_batches=2)
    return c
