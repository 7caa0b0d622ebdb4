"""SymbolSoup, the published benchmark (20 classes; chance = 5%): texts of 400-600 tokens.

The published lengths and splits (20000 train / 2000 eval). The paper's 2048-token setting:
``--config.data.seq_len=2048 --config.data.symbol_soup.min_tokens=1366
--config.data.symbol_soup.max_tokens=2048`` (``symbol_soup.LENGTHS['paper_2048']``). To train on
files made by the published script: ``--config.data.symbol_soup.tsv_dir=<its output_dir>``.
"""

from sessa_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.update(d_model=64, n_heads=4, n_layers=2, chunk_size=64, max_len=2048)
    c.data.update(task="symbol_soup", seq_len=600, batch_size=32)
    c.data.symbol_soup.update(min_tokens=400, max_tokens=600, num_train=20000, num_eval=2000)
    c.optim.update(lr=2e-3, warmup_steps=50)
    c.train.update(steps=1000, log_every=50, eval_every=250, eval_batches=8)
    c.checkpoint.update(every=250)
    return c
