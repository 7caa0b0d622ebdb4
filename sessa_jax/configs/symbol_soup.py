"""SymbolSoup long-range classification (20 classes; chance = 5%).

The paper uses sequences of 2048; this CPU default uses 256 (``--config.data.seq_len=2048
--config.data.symbol_soup.block_len=256`` for the paper's length on an accelerator).
"""

from sessa_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.update(d_model=64, n_heads=4, n_layers=2, chunk_size=64, max_len=2048)
    c.data.update(task="symbol_soup", seq_len=256, batch_size=32)
    c.data.symbol_soup.update(block_len=64)
    c.optim.update(lr=2e-3, warmup_steps=50)
    c.train.update(steps=1000, log_every=50, eval_every=250, eval_batches=8)
    c.checkpoint.update(every=250)
    return c
