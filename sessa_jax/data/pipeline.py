"""grain pipelines: task source -> shuffle/repeat -> per-process shard -> batch -> iterator.

Every pipeline is a ``grain.MapDataset`` over a random-access source, so an iterator's
state is just its position (``get_state``/``set_state``) and is saved with the model
checkpoint. The training iterator (``PositionedIterator``) saves its position in
examples, not batches, so a resume with another ``batch_size`` neither skips nor repeats
an example. Each process reads a disjoint slice (``ds[process_index::process_count]``)
and batches ``batch_size // process_count`` examples; ``global_batch`` assembles the
per-process batches into global ``jax.Array``s sharded over the data axis.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import grain
import jax
import numpy as np

from sessa_jax.data import mqar, symbol_soup, symbol_soup_tsv, text, tokenizers

TASKS = ("mqar", "symbol_soup", "text")
TRAIN, EVAL = 0, 1


def task_vocab_size(data_cfg) -> int:
    """Smallest model vocabulary that covers every token of the task."""
    if data_cfg.task == "mqar":
        return data_cfg.mqar.vocab_size
    if data_cfg.task == "symbol_soup":
        return symbol_soup.VOCAB_SIZE
    if data_cfg.task == "text":
        tok = data_cfg.tokenizer
        if tok.kind == "sentencepiece" and not tok.path:  # fitted at the run's start (data.tokenizers)
            return tok.vocab_size
        return tokenizer_of(data_cfg).vocab_size
    raise ValueError(f"data.task={data_cfg.task!r} is unknown; choose one of {TASKS}")


def tokenizer_of(data_cfg):
    """The text tokenizer ``data_cfg.tokenizer`` names (loaded once per kind and path)."""
    return _tokenizer(data_cfg.tokenizer.kind, data_cfg.tokenizer.path)


def _text_tokenizer(data_cfg):
    """``tokenizer_of``, or None (bytes) for a data config without a ``tokenizer`` entry."""
    return tokenizer_of(data_cfg) if data_cfg.get("tokenizer") is not None else None


@functools.lru_cache(maxsize=8)
def _tokenizer(kind: str, path: str):
    return tokenizers.make_tokenizer(kind, path)


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
        return symbol_soup.SymbolSoupSource(
            data_cfg.seq_len,
            s.min_tokens,
            s.max_tokens,
            data_cfg.seed,
            split,
            s.num_train if split == TRAIN else s.num_eval,
        )
    if task == "text":
        t = data_cfg.text
        if t.arrayrecord_dir:  # verified against its manifest and this run's tokenizer before any read
            return text.open_shards(
                t.arrayrecord_dir,
                split,
                data_cfg.seq_len,
                _text_tokenizer(data_cfg),
                verify_checksums=t.get("verify_checksums", True),
            )
        return text.load_text_source(
            t.path, data_cfg.seq_len, t.max_bytes, t.eval_fraction, split, _text_tokenizer(data_cfg)
        )
    raise ValueError(f"data.task={task!r} is unknown; choose one of {TASKS}")


def source_fingerprint(data_cfg) -> dict | None:
    """The data sources a run reads, as saved with each checkpoint and compared on resume
    (``resume_guard.check_sources``): {"digest", "files", "bytes", "entries"} over the source
    files' names (relative to their directory), sizes and, for shards, their recorded CRC-32;
    ``entries`` (the list itself) only when it has at most 64 files. None for generated data
    (mqar, generated SymbolSoup), which the config alone determines.
    """
    if data_cfg.task == "text":
        t = data_cfg.text
        if t.arrayrecord_dir:
            manifest = text.read_manifest(t.arrayrecord_dir)
            entries = [[e["name"], e["bytes"], e["crc32"]] for e in manifest["shards"]]
        else:
            root, files = text.corpus_files(t.path, t.max_bytes)
            entries = [[os.path.relpath(f, root), text.file_size(f)] for f in files]
    elif data_cfg.task == "symbol_soup" and data_cfg.symbol_soup.tsv_dir:
        files = [symbol_soup_tsv.split_file(data_cfg.symbol_soup.tsv_dir, s) for s in (TRAIN, EVAL)]
        entries = [[os.path.basename(f), text.file_size(f)] for f in files]
    else:
        return None
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return dict(
        digest=digest,
        files=len(entries),
        bytes=sum(e[1] for e in entries),
        entries=entries if len(entries) <= 64 else None,
    )


def make_dataset(
    data_cfg,
    split: int = TRAIN,
    process_index: int | None = None,
    process_count: int | None = None,
    start_example: int = 0,
) -> grain.IterDataset:
    """Batched, per-process dataset. Train repeats forever; eval is one finite pass.

    ``start_example``: global examples of the (shuffled, repeated) train stream to skip;
    process p then reads examples start_example + p, + p + process_count, ...
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    source = make_source(data_cfg, split)
    ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
    local_batch = data_cfg.batch_size // pc
    if start_example and split != TRAIN:
        raise ValueError(f"start_example={start_example}: only the train split can start past its beginning")
    finite = data_cfg.task in ("text", "symbol_soup")  # mqar sources are endless and already random
    if finite and split == TRAIN:
        ds = ds.shuffle(seed=data_cfg.seed).repeat(None)
    if start_example:
        ds = ds[start_example:]
    elif finite:  # finite eval split
        rows = len(ds)
        if rows < data_cfg.batch_size:
            fix = (
                f"raise data.text.eval_fraction (now {data_cfg.text.eval_fraction}), use more text, or lower "
                f"data.batch_size or data.seq_len"
                if data_cfg.task == "text"
                else "raise data.symbol_soup.num_eval or lower data.batch_size"
            )
            raise ValueError(
                f"the {data_cfg.task} eval split has {rows} rows of data.seq_len={data_cfg.seq_len}, fewer than one "
                f"batch of data.batch_size={data_cfg.batch_size}, so eval would read nothing; {fix}"
            )
        ds = ds[: rows - rows % pc]  # every process gets as many rows, so as many batches (no collective hang)
    ds = ds[pi::pc]
    # A text eval pass keeps its last partial batch (evaluate pads it) so every held-out row counts.
    ds = ds.batch(local_batch, drop_remainder=split == TRAIN or data_cfg.task != "text", batch_fn=_stack)
    read = grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch)
    return ds.to_iter_dataset(read)


def _stack(examples) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def make_iterator(data_cfg, split: int = TRAIN, **kw):
    """A checkpointable iterator of per-process batches (dict of (B_local, T) arrays).

    The train split gives a ``PositionedIterator`` (state = position in examples); eval
    gives grain's own iterator.
    """
    if split == TRAIN:
        return PositionedIterator(data_cfg, **kw)
    return iter(make_dataset(data_cfg, split, **kw))


class PositionedIterator:
    """The train stream's per-process batches, checkpointed as a global position in examples.

    ``get_state()`` -> {"examples": E, "batch_size": B}: E examples of the global stream
    were consumed (B per step when saved). ``set_state`` rebuilds the stream from example
    E, whatever this run's batch size, so changing ``data.batch_size`` on resume neither
    skips nor repeats data. States of grain's own iterator ({"next_index": n}, older
    checkpoints) are read as n batches of this run's batch size.

    The state also holds ``source_fingerprint`` of the data read ("sources", absent for
    generated data); ``set_state`` refuses a state whose sources differ from this run's
    (``resume_guard.DataChangedError``) unless ``data.allow_changed_sources`` is set.
    """

    def __init__(
        self, data_cfg, process_index: int | None = None, process_count: int | None = None, start_example: int = 0
    ):
        self._cfg, self._pi = data_cfg, process_index
        self._pc = jax.process_count() if process_count is None else process_count
        self.seek(start_example)  # builds (and verifies) the sources first, so errors about them come first
        self.sources = source_fingerprint(data_cfg)

    @property
    def position(self) -> int:
        """Global examples consumed so far."""
        return self._position

    def seek(self, example: int) -> None:
        """Restarts the stream at global example ``example``."""
        if isinstance(example, bool) or not isinstance(example, int) or example < 0 or example % self._pc:
            raise ValueError(
                f"data position {example!r} must be an integer >= 0 divisible by the process count {self._pc} "
                f"(it is a count of examples of the global stream); the checkpoint's data state is damaged or "
                f"was written with a batch size that the new process count does not divide"
            )
        self._position = example
        self._inner = iter(make_dataset(self._cfg, TRAIN, self._pi, self._pc, start_example=example))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._inner)
        self._position += self._cfg.batch_size
        return batch

    def get_state(self) -> dict:
        state = {"examples": self._position, "batch_size": self._cfg.batch_size}
        if self.sources is not None:  # generated data has none: its config decides it
            state["sources"] = json.loads(json.dumps(self.sources))  # a copy
        return state

    def set_state(self, state) -> None:
        """Accepts this class's state (dict, or its JSON bytes from grain's checkpoint handler).

        Raises ``resume_guard.DataChangedError`` when the state's sources differ from this
        run's and ``data.allow_changed_sources`` is not set."""
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if state.get("sources") is not None:  # states written before fingerprints existed carry none
            from sessa_jax.train import resume_guard  # here: sessa_jax.train imports this module

            resume_guard.check_sources(
                state["sources"], self.sources, bool(self._cfg.get("allow_changed_sources", False))
            )
        if "examples" in state:
            self.seek(int(state["examples"]))
        elif "next_index" in state:  # grain's iterator state: batches of (presumably) this batch size
            self.seek(int(state["next_index"]) * self._cfg.batch_size)
        else:
            raise ValueError(f"unrecognised data iterator state {state!r}; expected {{'examples': N, ...}}")

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after ``set_state``; prefetch starts on first ``next``."""


def global_batch(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global jax.Arrays laid out by ``sharding``."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
