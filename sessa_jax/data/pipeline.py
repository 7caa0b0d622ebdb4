"""grain pipelines: task source -> shuffle/repeat -> per-process shard -> batch -> iterator.

Every pipeline is a ``grain.MapDataset`` over a random-access source, so an iterator's
state is just its position (``get_state``/``set_state``) and is saved with the model
checkpoint. Each process reads a disjoint slice (``ds[process_index::process_count]``)
and batches ``batch_size // process_count`` examples; ``global_batch`` assembles the
per-process batches into global ``jax.Array``s sharded over the data axis.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from sessa_jax.data import mqar, symbol_soup, symbol_soup_tsv, text

TASKS = ("mqar", "symbol_soup", "text")
TRAIN, EVAL = 0, 1


def task_vocab_size(data_cfg) -> int:
    """Smallest model vocabulary that covers every token of the task."""
    if data_cfg.task == "mqar":
        return data_cfg.mqar.vocab_size
    if data_cfg.task == "symbol_soup":
        return symbol_soup.VOCAB_SIZE
    if data_cfg.task == "text":
        return text.VOCAB_SIZE
    raise ValueError(f"data.task={data_cfg.task!r} is unknown; choose one of {TASKS}")


def make_source(data_cfg, split: int):
    """The random-access source of ``split`` (TRAIN or EVAL) for ``data_cfg.task``."""
    task = data_cfg.task
    if task == "mqar":
        m = data_cfg.mqar
        return mqar.MQARSource(data_cfg.seq_len, m.vocab_size, m.num_kv_pairs, data_cfg.seed, split)
    if task == "symbol_soup":  # TRAIN reads the train split, EVAL the valid split
        s = data_cfg.symbol_soup
        if s.tsv_dir:
            return symbol_soup_tsv.TsvSource(symbol_soup_tsv.split_file(s.tsv_dir, split), data_cfg.seq_len)
        return symbol_soup.SymbolSoupSource(data_cfg.seq_len, s.min_tokens, s.max_tokens, data_cfg.seed, split,
                                            s.num_train if split == TRAIN else s.num_eval)
    if task == "text":
        t = data_cfg.text
        if t.arrayrecord_dir:
            records = grain.sources.ArrayRecordDataSource(text.shard_files(t.arrayrecord_dir, split))
            row_len = len(records[0]) // (2 * text.ROW_DTYPE().itemsize) - 1 if len(records) else data_cfg.seq_len
            if row_len != data_cfg.seq_len:
                raise ValueError(
                    f"data.text.arrayrecord_dir={t.arrayrecord_dir!r} holds rows of seq_len={row_len}, but "
                    f"data.seq_len={data_cfg.seq_len}; set data.seq_len={row_len} or write new shards with "
                    f"`python -m sessa_jax.data.text prepare ... --seq_len {data_cfg.seq_len}`"
                )
            return grain.MapDataset.source(records).map(text.decode_row)
        return text.load_text_source(t.path, data_cfg.seq_len, t.max_bytes, t.eval_fraction, split)
    raise ValueError(f"data.task={task!r} is unknown; choose one of {TASKS}")


def make_dataset(data_cfg, split: int = TRAIN, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """Batched, per-process dataset. Train repeats forever; eval is one finite pass."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    source = make_source(data_cfg, split)
    ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
    local_batch = data_cfg.batch_size // pc
    finite = data_cfg.task in ("text", "symbol_soup")  # mqar sources are endless and already random
    if finite and split == TRAIN:
        ds = ds.shuffle(seed=data_cfg.seed).repeat(None)
    elif finite:  # finite eval split
        rows = len(ds)
        if rows < data_cfg.batch_size:
            fix = (f"raise data.text.eval_fraction (now {data_cfg.text.eval_fraction}), use more text, or lower "
                   f"data.batch_size or data.seq_len" if data_cfg.task == "text" else
                   "raise data.symbol_soup.num_eval or lower data.batch_size")
            raise ValueError(
                f"the {data_cfg.task} eval split has {rows} rows of data.seq_len={data_cfg.seq_len}, fewer than one "
                f"batch of data.batch_size={data_cfg.batch_size}, so eval would read nothing; {fix}"
            )
        ds = ds[:rows - rows % pc]  # every process gets as many rows, so as many batches (no collective hang)
    ds = ds[pi::pc]
    ds = ds.batch(local_batch, drop_remainder=True, batch_fn=_stack)
    read = grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch)
    return ds.to_iter_dataset(read)


def _stack(examples) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def make_iterator(data_cfg, split: int = TRAIN, **kw):
    """A checkpointable iterator of per-process batches (dict of (B_local, T) arrays)."""
    return iter(make_dataset(data_cfg, split, **kw))


def global_batch(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global jax.Arrays laid out by ``sharding``."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
