"""Subword language modelling: a sentencepiece BPE tokenizer fitted offline on the corpus.

With no ``data.text.path`` it trains on the built-in corpus (the Python standard library's
sources). ``data.tokenizer.path=''`` fits a ``vocab_size`` BPE model into
``WORKDIR/tokenizer.model`` at the first start; pass a ``.model`` (sentencepiece) or set
``data.tokenizer.kind=tokenizers`` with a ``tokenizer.json`` to use your own.

    sessa-train --config=text_bpe --workdir=runs/text_bpe
"""

from sessa_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.update(d_model=128, n_heads=4, n_layers=4, chunk_size=128, max_len=1024)
    c.data.update(task="text", seq_len=256, batch_size=16)
    c.data.text.update(max_bytes=4_000_000)
    c.data.tokenizer.update(kind="sentencepiece", path="", vocab_size=4096)
    c.optim.update(lr=2e-3, warmup_steps=100)
    c.train.update(steps=2000, log_every=50, eval_every=500, eval_batches=0, loss_chunk=64)
    c.checkpoint.update(every=500)
    return c
