"""Byte-level language modelling on a file or directory (``--config.data.text.path=...``).

With no path it trains on the built-in corpus: the Python standard library's sources.
"""

from sessa_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.update(d_model=128, n_heads=4, n_layers=4, chunk_size=128, max_len=1024)
    c.data.update(task="text", seq_len=256, batch_size=16)
    c.optim.update(lr=2e-3, warmup_steps=100)
    c.train.update(steps=2000, log_every=50, eval_every=500, eval_batches=0)  # 0: the whole eval split
    c.checkpoint.update(every=500)
    return c
