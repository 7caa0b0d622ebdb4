"""Data: synthetic long-context tasks (MQAR, SymbolSoup), byte-level text, packing, grain pipelines.

The pipeline names below are loaded on first use (PEP 562), so ``python -m sessa_jax.data.text``
runs that module once, as ``__main__``, instead of after the package had already imported it.
"""

import importlib

__all__ = ["EVAL", "TASKS", "TRAIN", "global_batch", "make_dataset", "make_iterator", "task_vocab_size"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module("sessa_jax.data.pipeline"), name)
    raise AttributeError(f"module 'sessa_jax.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
