"""Shared body of the paper-size configs (accelerator runs).

Sizes and vocabulary come from ``sessa_jax.config.PRESETS``; data is byte-level text (ids
0..256 of the larger vocabulary) until a subword tokenizer is added.
"""

from sessa_jax.config import PRESETS
from sessa_jax.train.config import base_config


def paper_config(preset: str):
    c = base_config()
    c.model.update(**PRESETS[preset])  # the preset's vocabulary, so parameter counts are the paper's
    c.model.update(match_params=True, dtype="bfloat16", scan_layers=True, remat=True, chunk_size=128)
    c.data.update(task="text", seq_len=2048, batch_size=256)
    c.data.text.update(max_bytes=0, arrayrecord_dir="")
    c.optim.update(lr=6e-4 if preset == "125m" else 3e-4, warmup_steps=2000, weight_decay=0.1, min_lr_ratio=0.1)
    # 256 positions x 50304 ids at a time: the (B, T, V) float32 logits are never built.
    c.train.update(steps=100_000, log_every=100, eval_every=2000, eval_batches=50, loss_chunk=256)
    c.checkpoint.update(every=2000, keep=3)
    return c
