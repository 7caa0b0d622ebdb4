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


def iter_documents(path: str, max_bytes: int):
    """Each file is one document of bytes (uint8 array), read one file at a time.

    A user ``path`` is read whole: more than ``max_bytes`` bytes of text (0 = no cap) is a
    ValueError naming the size and the keys to change. The built-in corpus (``path`` "")
    is capped instead: its first ``max_bytes`` bytes in sorted file order.
    """
    builtin = not path
    files = list_files(builtin_corpus_dir() if builtin else path)
    if builtin:
        files = [f for f in files if f.endswith(".py")]
    total, any_read = 0, False
    for i, name in enumerate(files):
        try:
            with open(name, "rb") as f:
                data = f.read(max_bytes - total if builtin and max_bytes else -1)
        except OSError:
            continue
        if not data or b"\0" in data[:1024]:  # empty or binary
            continue
        any_read = True
        yield np.frombuffer(data, np.uint8)
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
    if not any_read:
        raise ValueError(f"data.text.path={path!r} holds no readable text files (all empty or binary)")


def read_documents(path: str, max_bytes: int) -> list[np.ndarray]:
    """All documents of ``iter_documents`` in a list."""
    return list(iter_documents(path, max_bytes))


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


def load_text_source(path: str, seq_len: int, max_bytes: int, eval_fraction: float, split: int, tokenizer=None):
    """Packed rows of the corpus at ``path``; the last ``eval_fraction`` of rows is eval.

    ``tokenizer`` (``sessa_jax.data.tokenizers``; None = bytes) encodes one file at a time,
    so only token ids, never the whole text, are held.
    """
    if tokenizer is None or tokenizer.kind == "bytes":
        tokens, doc_ids = pack_documents(read_documents(path, max_bytes), bos=BOS)
    else:
        docs = (tokenizer.encode(doc.tobytes()) for doc in iter_documents(path, max_bytes))
        tokens, doc_ids = pack_documents([d for d in docs if len(d)], bos=tokenizer.bos_id)
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
            max_bytes: int = 0, eval_fraction: float = 0.01, overwrite: bool = False,
            tokenizer=None) -> dict[str, int]:
    """Packs the corpus at ``input_path`` (tokenized by ``tokenizer``, None = bytes) and writes
    ArrayRecord shards; returns row counts.

    Two streaming passes (count, then write rows as they fill) so no step holds the corpus
    or its ids; the rows and the split are the ones ``load_text_source`` builds in memory.

    ``output_dir`` must be missing or empty; ``overwrite=True`` replaces a directory that
    holds only shards (stale shards would otherwise be read as data). Shards are written to
    a sibling temporary directory and moved into place when all are complete, so a failure
    leaves ``output_dir`` as it was.
    """
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
        counts = _write_shards(input_path, tmp, seq_len, rows_per_shard, max_bytes, eval_fraction, tokenizer)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def _write_shards(input_path, output_dir, seq_len, rows_per_shard, max_bytes, eval_fraction, tokenizer):
    from array_record.python.array_record_module import ArrayRecordWriter

    total = sum(len(d) for d in _token_docs(input_path, max_bytes, tokenizer))
    rows = num_rows(total, seq_len)
    n_eval = max(1, int(round(rows * eval_fraction))) if rows > 1 else 0
    if rows - n_eval < 1:
        raise ValueError(f"the text corpus ({total} tokens) is too small for one row of seq_len={seq_len} in each "
                         f"split (train and eval); use more text or a shorter --seq_len")
    counts, writer, name = {"train": 0, "eval": 0}, None, None
    for r, row in enumerate(_packed_rows(_token_docs(input_path, max_bytes, tokenizer), seq_len)):
        split = "train" if r < rows - n_eval else "eval"
        if split != name or counts[split] % rows_per_shard == 0:
            if writer is not None:
                writer.close()
            name = split
            path = os.path.join(output_dir, f"{split}-{counts[split] // rows_per_shard:05d}.array_record")
            writer = ArrayRecordWriter(path, "group_size:1")
        writer.write(row.astype(ROW_DTYPE).tobytes())
        counts[split] += 1
    if writer is not None:
        writer.close()
    return counts


def _token_docs(path: str, max_bytes: int, tokenizer):
    """BOS-prefixed int32 ids of each document, one file at a time."""
    for doc in iter_documents(path, max_bytes):
        ids = doc.astype(np.int32) if tokenizer is None or tokenizer.kind == "bytes" else tokenizer.encode(doc.tobytes())
        if len(ids):
            yield np.concatenate([[BOS if tokenizer is None else tokenizer.bos_id], ids]).astype(np.int32)


def _packed_rows(docs, seq_len: int):
    """Rows (tokens then doc ids, 2 * (T + 1)) of the packed stream; row i is its window
    [i T, i T + T + 1), as in ``sessa_jax.data.packing``."""
    tok, ids = np.zeros(0, np.int32), np.zeros(0, np.int64)
    for d, doc in enumerate(docs):
        tok, ids = np.concatenate([tok, doc]), np.concatenate([ids, np.full(len(doc), d, np.int64)])
        while len(tok) >= seq_len + 1:
            yield np.concatenate([tok[:seq_len + 1], ids[:seq_len + 1]])
            tok, ids = tok[seq_len:], ids[seq_len:]


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
    p.add_argument("--tokenizer", default="bytes", help="bytes, sentencepiece or tokenizers")
    p.add_argument("--tokenizer_path", default="", help="the .model or tokenizer.json")
    args = parser.parse_args(argv)
    try:
        from sessa_jax.data.tokenizers import make_tokenizer

        counts = prepare(args.input, args.output, args.seq_len, args.rows_per_shard, args.max_bytes,
                         args.eval_fraction, args.overwrite, make_tokenizer(args.tokenizer, args.tokenizer_path))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} train and {counts['eval']} eval rows of seq_len={args.seq_len} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
