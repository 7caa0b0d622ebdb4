"""Data: synthetic long-context tasks (MQAR, SymbolSoup), byte-level text, packing, grain pipelines."""

from sessa_jax.data.pipeline import EVAL, TASKS, TRAIN, global_batch, make_dataset, make_iterator, task_vocab_size

__all__ = ["EVAL", "TASKS", "TRAIN", "global_batch", "make_dataset", "make_iterator", "task_vocab_size"]
