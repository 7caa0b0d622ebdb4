"""Byte-level text: documents from files, packed into fixed-length rows with segment ids.

Tokens are bytes 0..255; every document starts with ``BOS`` (256), so ``VOCAB_SIZE`` is
257. ``path`` may be a file or a directory (read recursively, sorted, binary files
skipped); every file is read whole, and a corpus larger than ``max_bytes`` is an error
(nothing is dropped silently). An empty path selects a built-in corpus present on every
machine: the Python standard library's own ``.py`` files, of which the first
``max_bytes`` bytes in sorted path order are used (the stated sampling rule). For large corpora, ``prepare`` writes packed rows to
ArrayRecord shards once, and training reads them with ``ArrayRecordDataSource``:

    python -m sessa_jax.data.text prepare --input DIR --output SHARDS --seq_len 512
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import sysconfig

import numpy as np

from sessa_jax.data.packing import num_rows, pack_documents, row_to_example

BOS = 256
VOCAB_SIZE = 257
ROW_DTYPE = np.int32  # a stored row: tokens (T+1) then doc ids (T+1)


def builtin_corpus_dir() -> str:
    """Directory of the Python standard library sources: text that exists everywhere."""
    return sysconfig.get_paths()["stdlib"]


def list_files(path: str, builtin_suffix: str = ".py") -> list[str]:
    """Sorted readable files under ``path``; clear errors for missing or empty paths."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"data.text.path={path!r} does not exist; pass an existing text file or directory, "
            f"or set data.text.path='' to use the built-in corpus (Python standard library sources)"
        )
    if os.path.isfile(path):
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")) and d != "site-packages")
        files.extend(os.path.join(root, n) for n in names if not n.startswith("."))
    files.sort()
    if not files:
        raise FileNotFoundError(f"data.text.path={path!r} is a directory with no files; point it at text files")
    return files


def read_documents(path: str, max_bytes: int) -> list[np.ndarray]:
    """Each file is one document of bytes.

    A user ``path`` is read whole: more than ``max_bytes`` bytes of text (0 = no cap) is a
    ValueError naming the size and the keys to change. The built-in corpus (``path`` "")
    is capped instead: its first ``max_bytes`` bytes in sorted file order.
    """
    builtin = not path
    files = list_files(builtin_corpus_dir() if builtin else path)
    if builtin:
        files = [f for f in files if f.endswith(".py")]
    docs, total = [], 0
    for i, name in enumerate(files):
        try:
            with open(name, "rb") as f:
                data = f.read(max_bytes - total if builtin and max_bytes else -1)
        except OSError:
            continue
        if not data or b"\0" in data[:1024]:  # empty or binary
            continue
        docs.append(np.frombuffer(data, np.uint8))
        total += len(data)
        if builtin and max_bytes and total >= max_bytes:
            break
        if max_bytes and total > max_bytes:
            rest = sum(os.path.getsize(f) for f in files[i + 1:])
            raise ValueError(
                f"data.text.path={path!r} holds more than data.text.max_bytes={max_bytes} bytes of text ({total} "
                f"in its first {i + 1} of {len(files)} files, up to {total + rest} in all); reading part of it "
                f"would drop the rest silently. Set data.text.max_bytes=0 (no cap) or >= {total + rest}, or pack "
                f"it once with `python -m sessa_jax.data.text prepare --input {path} --output DIR --seq_len T` "
                f"and set data.text.arrayrecord_dir=DIR"
            )
    if not docs:
        raise ValueError(f"data.text.path={path!r} holds no readable text files (all empty or binary)")
    return docs


@dataclasses.dataclass
class PackedTextSource:
    """In-memory packed rows of a token stream; ``split`` takes a contiguous range of rows."""

    tokens: np.ndarray
    doc_ids: np.ndarray
    seq_len: int
    row_start: int = 0
    row_stop: int | None = None

    def __post_init__(self):
        total = num_rows(len(self.tokens), self.seq_len)
        self.row_stop = total if self.row_stop is None else min(self.row_stop, total)
        if self.row_stop <= self.row_start:
            raise ValueError(
                f"the text corpus ({len(self.tokens)} tokens) is too small for one row of data.seq_len="
                f"{self.seq_len} in this split; use more text, a shorter seq_len or a smaller eval_fraction"
            )

    def __len__(self) -> int:
        return self.row_stop - self.row_start

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = (self.row_start + int(index)) * self.seq_len
        return row_to_example(self.tokens[i:i + self.seq_len + 1], self.doc_ids[i:i + self.seq_len + 1])


def load_text_source(path: str, seq_len: int, max_bytes: int, eval_fraction: float, split: int):
    """Packed rows of the corpus at ``path``; the last ``eval_fraction`` of rows is eval."""
    tokens, doc_ids = pack_documents(read_documents(path, max_bytes), bos=BOS)
    total = num_rows(len(tokens), seq_len)
    n_eval = max(1, int(round(total * eval_fraction))) if total > 1 else 0
    if split == 0:
        return PackedTextSource(tokens, doc_ids, seq_len, 0, total - n_eval)
    return PackedTextSource(tokens, doc_ids, seq_len, total - n_eval, total)


def decode_row(record: bytes) -> dict[str, np.ndarray]:
    """ArrayRecord row (tokens then doc ids, int32) -> training example."""
    row = np.frombuffer(record, ROW_DTYPE)
    half = row.shape[0] // 2
    return row_to_example(row[:half], row[half:])


def shard_files(directory: str, split: int) -> list[str]:
    """The ArrayRecord shards of one split written by ``prepare``."""
    prefix = ("train", "eval")[split]
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"data.text.arrayrecord_dir={directory!r} does not exist; write shards with "
            f"`python -m sessa_jax.data.text prepare --input PATH --output {directory} --seq_len T`"
        )
    files = sorted(os.path.join(directory, f) for f in os.listdir(directory)
                   if f.startswith(prefix + "-") and f.endswith(".array_record"))
    if not files:
        raise FileNotFoundError(f"data.text.arrayrecord_dir={directory!r} has no {prefix}-*.array_record shards")
    return files


def shard_seq_len(record: bytes) -> int:
    """seq_len T of a stored row (T + 1 tokens then T + 1 doc ids, int32)."""
    return len(record) // (2 * np.dtype(ROW_DTYPE).itemsize) - 1


def _is_shard(name: str) -> bool:
    return name.startswith(("train-", "eval-")) and name.endswith(".array_record")


def prepare(input_path: str, output_dir: str, seq_len: int, rows_per_shard: int = 4096,
            max_bytes: int = 0, eval_fraction: float = 0.01, overwrite: bool = False) -> dict[str, int]:
    """Packs the corpus at ``input_path`` and writes ArrayRecord shards; returns row counts.

    ``output_dir`` must be missing or empty; ``overwrite=True`` replaces a directory that
    holds only shards (stale shards would otherwise be read as data). Shards are written to
    a sibling temporary directory and moved into place when all are complete, so a failure
    leaves ``output_dir`` as it was.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    for name, value in (("seq_len", seq_len), ("rows_per_shard", rows_per_shard)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"prepare: --{name} must be >= 1; got {value!r}")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"prepare: --eval_fraction must lie in (0, 1); got {eval_fraction}")
    output_dir = os.path.abspath(output_dir)
    existing = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"prepare: --output {output_dir!r} is a file; pass a directory")
    if existing and not overwrite:
        raise ValueError(f"prepare: --output {output_dir!r} is not empty ({len(existing)} entries, e.g. "
                         f"{existing[0]!r}); pass --overwrite to replace its shards, or choose a new directory")
    foreign = [n for n in existing if not _is_shard(n)]
    if foreign:
        raise ValueError(f"prepare: --output {output_dir!r} holds files that are not shards ({foreign[:3]}); "
                         f"--overwrite replaces shard directories only: choose a new directory")
    tmp = f"{output_dir}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        counts = {}
        for split, name in ((0, "train"), (1, "eval")):
            src = load_text_source(input_path, seq_len, max_bytes, eval_fraction, split)
            for shard, start in enumerate(range(0, len(src), rows_per_shard)):
                writer = ArrayRecordWriter(os.path.join(tmp, f"{name}-{shard:05d}.array_record"), "group_size:1")
                for r in range(start, min(start + rows_per_shard, len(src))):
                    i = (src.row_start + r) * seq_len
                    row = np.concatenate([src.tokens[i:i + seq_len + 1], src.doc_ids[i:i + seq_len + 1]])
                    writer.write(row.astype(ROW_DTYPE).tobytes())
                writer.close()
            counts[name] = len(src)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sessa_jax.data.text")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="pack a corpus into ArrayRecord shards")
    p.add_argument("--input", default="", help="file or directory; empty = built-in corpus")
    p.add_argument("--output", required=True)
    p.add_argument("--seq_len", type=int, required=True)
    p.add_argument("--rows_per_shard", type=int, default=4096)
    p.add_argument("--max_bytes", type=int, default=0)
    p.add_argument("--eval_fraction", type=float, default=0.01)
    p.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty --output")
    args = parser.parse_args(argv)
    try:
        counts = prepare(args.input, args.output, args.seq_len, args.rows_per_shard, args.max_bytes,
                         args.eval_fraction, args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} train and {counts['eval']} eval rows of seq_len={args.seq_len} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
