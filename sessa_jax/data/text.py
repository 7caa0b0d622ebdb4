"""Byte-level text: documents from files, packed into fixed-length rows with segment ids.

Tokens are bytes 0..255; every document starts with ``BOS`` (256), so ``VOCAB_SIZE`` is
257. ``path`` may be a file or a directory (read recursively, sorted, binary files
skipped); every file is read whole (a file that cannot be read is an error), and a corpus
larger than ``max_bytes`` is an error (nothing is dropped silently). An empty path selects a
built-in corpus present on every machine: the Python standard library's own ``.py`` files,
of which the first ``max_bytes`` bytes in sorted path order are used (the stated sampling
rule). For large corpora, ``prepare`` writes packed rows to ArrayRecord shards once, and
training reads them through ``open_shards``:

    python -m sessa_jax.data.text prepare --input DIR --output SHARDS --seq_len 512
    python -m sessa_jax.data.text verify --dir SHARDS     # the checks training makes at open, timed

``prepare`` also writes ``manifest.json``: seq_len, the tokenizer (kind, vocabulary, BOS, the
SHA-256 of its model file) and, per shard, its records, bytes and CRC-32. ``open_shards``
checks it against the run before anything is read: the tokenizer and seq_len must match; every
shard must be listed, present, of its recorded size and record count (O(shards): catches
zero-byte, truncated, missing, extra and stale shards) and, unless ``verify_checksums`` is off,
of its recorded CRC-32 (reads every byte once per process, ~2 GB/s of CPU: catches flipped
bytes). One error names every bad file. Each row read is range-checked: an id outside
``[0, vocab)`` raises naming the shard and record.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
import zlib

import numpy as np

from sessa_jax.data.corpus import UnreadableFileError, builtin_corpus_dir, iter_documents, list_files, read_documents  # noqa: F401  (this module's interface)
from sessa_jax.data.packing import num_rows, pack_documents, row_to_example
from sessa_jax.data.tokenizers import make_tokenizer

BOS = 256
VOCAB_SIZE = 257
ROW_DTYPE = np.int32  # a stored row: tokens (T+1) then doc ids (T+1)


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
        return row_to_example(self.tokens[i : i + self.seq_len + 1], self.doc_ids[i : i + self.seq_len + 1])


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


def corpus_files(path: str, max_bytes: int) -> tuple[str, list[str]]:
    """(root, files) that ``iter_documents`` reads for ``path`` ('' = built-in corpus): the built-in
    corpus is its ``.py`` files up to the first whose end passes ``max_bytes``."""
    builtin = not path
    root = builtin_corpus_dir() if builtin else path
    files = list_files(root)
    if builtin:
        files, kept, total = [f for f in files if f.endswith(".py")], [], 0
        for f in files:
            kept.append(f)
            total += file_size(f)
            if max_bytes and total >= max_bytes:
                break
        files = kept
    return (root if os.path.isdir(root) else os.path.dirname(root)), files


def file_size(path: str) -> int:
    """Size in bytes; -1 when it cannot be read (``iter_documents`` names such a file)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return -1  # unreadable: iter_documents names it when it reaches it


def decode_row(record: bytes) -> dict[str, np.ndarray]:
    """ArrayRecord row (tokens then doc ids, int32) -> training example."""
    row = np.frombuffer(record, ROW_DTYPE)
    half = row.shape[0] // 2
    return row_to_example(row[:half], row[half:])


MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
ANY_TOKENIZER = object()  # verify_shards(tokenizer=ANY_TOKENIZER): the manifest's tokenizer is not compared
SPLITS = ("train", "eval")


class ShardError(ValueError):
    """Shards that do not match their manifest or the run (names every bad file and the fix)."""


def shard_files(directory: str, split: int) -> list[str]:
    """The ArrayRecord shards of one split present in ``directory`` (sorted paths)."""
    prefix = SPLITS[split]
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"data.text.arrayrecord_dir={directory!r} does not exist; write shards with "
            f"`python -m sessa_jax.data.text prepare --input PATH --output {directory} --seq_len T`"
        )
    files = sorted(
        os.path.join(directory, f)
        for f in os.listdir(directory)
        if f.startswith(prefix + "-") and f.endswith(".array_record")
    )
    if not files:
        raise FileNotFoundError(f"data.text.arrayrecord_dir={directory!r} has no {prefix}-*.array_record shards")
    return files


def shard_seq_len(record: bytes) -> int:
    """seq_len T of a stored row (T + 1 tokens then T + 1 doc ids, int32)."""
    return len(record) // (2 * np.dtype(ROW_DTYPE).itemsize) - 1


def _is_shard(name: str) -> bool:
    return name.startswith(tuple(f"{s}-" for s in SPLITS)) and name.endswith(".array_record")


def file_crc32(path: str, block: int = 8 << 20) -> int:
    """CRC-32 of a file's bytes, read in ``block``-byte pieces."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc


@functools.lru_cache(maxsize=4096)
def _cached_crc32(path: str, size: int, mtime_ns: int, inode: int) -> int:
    """``file_crc32`` once per process for a file's (size, mtime, inode): a run opens each split more
    than once (eval, train, again at a resume)."""
    return file_crc32(path)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_identity(tokenizer) -> dict:
    """What shards record of the tokenizer that made them: kind, vocab_size, bos_id, the model
    file's base name and SHA-256 ("" for bytes). ``tokenizer`` None = bytes."""
    if tokenizer is None or tokenizer.kind == "bytes":
        return dict(kind="bytes", vocab_size=VOCAB_SIZE, bos_id=BOS, file="", sha256="")
    st = os.stat(tokenizer.path)
    return dict(
        kind=tokenizer.kind,
        vocab_size=int(tokenizer.vocab_size),
        bos_id=int(tokenizer.bos_id),
        file=os.path.basename(tokenizer.path),
        sha256=_file_sha256(os.path.abspath(tokenizer.path), st.st_size, st.st_mtime_ns),
    )


def _describe_tokenizer(t: dict) -> str:
    if t.get("kind") == "bytes":
        return f"bytes (vocab {t.get('vocab_size')})"
    return (
        f"{t.get('kind')} {t.get('file')!r} (vocab {t.get('vocab_size')}, bos {t.get('bos_id')}, "
        f"sha256 {str(t.get('sha256'))[:12]}...)"
    )


def read_manifest(directory: str) -> dict:
    """The ``manifest.json`` of a shard directory; ShardError when it is missing or unreadable."""
    path = os.path.join(directory, MANIFEST)
    fix = (
        f"write the shards again with `python -m sessa_jax.data.text prepare --input CORPUS --output "
        f"{directory} --seq_len T --overwrite` (with the run's --tokenizer)"
    )
    if not os.path.isfile(path):
        raise ShardError(
            f"data.text.arrayrecord_dir={directory!r} has no {MANIFEST} (shards written by an older "
            f"version, or not by prepare), so they cannot be checked; {fix}"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("shards"), list):
            raise ValueError(f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    except (OSError, ValueError, AttributeError) as e:
        raise ShardError(f"{path!r} cannot be read as a shard manifest ({e}); {fix}") from e
    return manifest


def verify_shards(directory: str, seq_len: int, tokenizer=None, verify_checksums: bool = True) -> dict:
    """Checks a shard directory against its manifest and the run; returns the manifest.

    In order: the manifest exists; its seq_len equals ``seq_len``; its tokenizer is
    ``tokenizer`` (kind, vocabulary, BOS, model file hash; None = bytes, ``ANY_TOKENIZER`` =
    not compared); then every shard file of both splits: listed in the manifest, present, of
    the recorded byte size and record count, and (``verify_checksums``) of the recorded
    CRC-32. A ShardError lists every bad file.
    Cost: one stat and one index read per shard, plus one sequential read of every byte
    when ``verify_checksums`` (cached per process by size, mtime and inode).
    """
    from array_record.python.array_record_module import ArrayRecordReader

    manifest = read_manifest(directory)

    def prepare_again(extra: str = "") -> str:
        return (
            f"write the shards again with `python -m sessa_jax.data.text prepare --input CORPUS --output "
            f"{directory} --seq_len {seq_len}{extra} --overwrite`"
        )

    fix = prepare_again()
    if manifest.get("seq_len") != seq_len:
        raise ShardError(
            f"data.text.arrayrecord_dir={directory!r} holds rows of seq_len={manifest.get('seq_len')} (its "
            f"{MANIFEST}), but data.seq_len={seq_len}; set data.seq_len={manifest.get('seq_len')} or {fix}"
        )
    saved = manifest.get("tokenizer", {})
    run = saved if tokenizer is ANY_TOKENIZER else tokenizer_identity(tokenizer)
    if any(saved.get(k) != run.get(k) for k in ("kind", "vocab_size", "bos_id", "sha256")):
        raise ShardError(
            f"data.text.arrayrecord_dir={directory!r} was prepared with the tokenizer {_describe_tokenizer(saved)}, "
            f"but this run uses {_describe_tokenizer(run)}: its token ids would mean other text (or lie outside "
            f"the vocabulary); set data.tokenizer.kind and data.tokenizer.path to the tokenizer the shards were "
            f"prepared with, or "
            + prepare_again(
                f" --tokenizer {run['kind']}"
                + (f" --tokenizer_path {tokenizer.path}" if run["kind"] != "bytes" else "")
            )
        )
    listed = {e["name"]: e for e in manifest["shards"]}
    on_disk = sorted(n for n in os.listdir(directory) if _is_shard(n))
    problems = [
        f"  {n}: not in {MANIFEST} (a stale shard or one from another prepare)" for n in on_disk if n not in listed
    ]
    for name, entry in sorted(listed.items()):
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
        except OSError as e:
            problems.append(f"  {name}: missing ({e.strerror or e})")
            continue
        if st.st_size != entry["bytes"]:
            how = "empty" if st.st_size == 0 else "truncated" if st.st_size < entry["bytes"] else "grown"
            problems.append(f"  {name}: {st.st_size} bytes, {MANIFEST} records {entry['bytes']} ({how})")
            continue
        try:
            reader = ArrayRecordReader(path)
            try:
                records = reader.num_records()
            finally:
                reader.close()
        except Exception as e:  # noqa: BLE001 - any failure to read the index means a damaged file
            problems.append(f"  {name}: its record index cannot be read ({type(e).__name__}: {e})")
            continue
        if records != entry["records"]:
            problems.append(f"  {name}: {records} records, {MANIFEST} records {entry['records']}")
            continue
        if verify_checksums:
            try:
                crc = _cached_crc32(os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
            except OSError as e:
                problems.append(f"  {name}: cannot be read ({e.strerror or e})")
                continue
            if crc != entry["crc32"]:
                problems.append(
                    f"  {name}: CRC-32 {crc:08x}, {MANIFEST} records {entry['crc32']:08x} (bytes changed since prepare)"
                )
    if problems:
        raise ShardError(
            f"data.text.arrayrecord_dir={directory!r}: {len(problems)} shard file(s) do not match {MANIFEST}:\n"
            + "\n".join(problems)
            + f"\nFix: restore them from the original copy, or {fix}"
        )
    return manifest


class ShardSource:
    """Random access to the rows of one split of verified shards (``open_shards``).

    ``source[i]`` is a training example; a record that cannot be read, or holds a token id
    outside ``[0, vocab_size)``, raises ShardError naming the shard and the record.
    """

    def __init__(self, directory: str, entries: list[dict], seq_len: int, vocab_size: int, tokenizer: dict):
        import grain

        self.directory, self.entries, self.seq_len, self.vocab_size = directory, entries, seq_len, vocab_size
        self._tokenizer = tokenizer
        paths = [os.path.join(directory, e["name"]) for e in entries]
        try:
            self._records = grain.sources.ArrayRecordDataSource(paths)
        except Exception as e:  # noqa: BLE001 - a damaged index (checksums off): find and name the file(s)
            bad = []
            for path in paths:
                try:
                    grain.sources.ArrayRecordDataSource([path])
                except Exception:  # noqa: BLE001
                    bad.append(path)
            raise ShardError(
                f"{', '.join(repr(b) for b in bad) or directory!r} cannot be opened ({type(e).__name__}: "
                f"{e}); the shard is damaged: restore it or prepare the shards again"
            ) from e
        self._starts = np.cumsum([0] + [e["records"] for e in entries])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _where(self, index: int) -> tuple[str, int]:
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.entries[k]["name"], index - int(self._starts[k])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        try:
            record = self._records[index]
        except Exception as e:  # noqa: BLE001 - a damaged record: name the file it is in
            name, j = self._where(index)
            raise ShardError(
                f"{os.path.join(self.directory, name)!r}: record {j} cannot be read ({type(e).__name__}: "
                f"{e}); the shard is damaged: restore it or prepare the shards again"
            ) from e
        row = np.frombuffer(record, ROW_DTYPE)
        half = self.seq_len + 1
        if row.shape[0] != 2 * half:
            name, j = self._where(index)
            raise ShardError(
                f"{os.path.join(self.directory, name)!r}: record {j} holds {row.shape[0]} int32 values, "
                f"expected {2 * half} for seq_len={self.seq_len}; the shard is damaged"
            )
        tokens = row[:half]
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            name, j = self._where(index)
            bad = low if low < 0 else high
            raise ShardError(
                f"{os.path.join(self.directory, name)!r}: record {j} holds token id {bad}, outside [0, "
                f"{self.vocab_size}) of the run's vocabulary (shards prepared with "
                f"{_describe_tokenizer(self._tokenizer)}); the shard is damaged or was written by another "
                f"tool: prepare the shards again with the run's tokenizer"
            )
        return row_to_example(tokens, row[half:])


def open_shards(directory: str, split: int, seq_len: int, tokenizer=None, verify_checksums: bool = True) -> ShardSource:
    """The rows of ``split`` (0 train, 1 eval) of the shards in ``directory``, after
    ``verify_shards`` (which checks both splits, so one error names every bad file)."""
    shard_files(directory, split)  # a missing directory or split: the FileNotFoundError with the fix
    manifest = verify_shards(directory, seq_len, tokenizer, verify_checksums)
    entries = [e for e in manifest["shards"] if e["split"] == SPLITS[split]]
    ident = manifest["tokenizer"]
    return ShardSource(directory, entries, seq_len, ident["vocab_size"], ident)


def prepare(
    input_path: str,
    output_dir: str,
    seq_len: int,
    rows_per_shard: int = 4096,
    max_bytes: int = 0,
    eval_fraction: float = 0.01,
    overwrite: bool = False,
    tokenizer=None,
) -> dict[str, int]:
    """Packs the corpus at ``input_path`` (tokenized by ``tokenizer``, None = bytes) and writes
    ArrayRecord shards and their ``manifest.json``; returns row counts.

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
        raise ValueError(
            f"prepare: --output {output_dir!r} is not empty ({len(existing)} entries, e.g. "
            f"{existing[0]!r}); pass --overwrite to replace its shards, or choose a new directory"
        )
    foreign = [n for n in existing if not _is_shard(n) and n != MANIFEST]
    if foreign:
        raise ValueError(
            f"prepare: --output {output_dir!r} holds files that are not shards ({foreign[:3]}); "
            f"--overwrite replaces shard directories only: choose a new directory"
        )
    tmp = f"{output_dir}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        counts, shards = _write_shards(input_path, tmp, seq_len, rows_per_shard, max_bytes, eval_fraction, tokenizer)
        manifest = dict(
            format=MANIFEST_FORMAT,
            seq_len=seq_len,
            row_dtype=np.dtype(ROW_DTYPE).name,
            tokenizer=tokenizer_identity(tokenizer),
            rows=counts,
            shards=[
                dict(
                    name=name,
                    split=split,
                    records=records,
                    bytes=os.path.getsize(os.path.join(tmp, name)),
                    crc32=file_crc32(os.path.join(tmp, name)),
                )
                for name, split, records in shards
            ],
        )
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def _write_shards(input_path, output_dir, seq_len, rows_per_shard, max_bytes, eval_fraction, tokenizer):
    """Writes the shards; returns the row counts per split and [(file name, split, records)]."""
    from array_record.python.array_record_module import ArrayRecordWriter

    total = sum(len(d) for d in _token_docs(input_path, max_bytes, tokenizer))
    rows = num_rows(total, seq_len)
    n_eval = max(1, int(round(rows * eval_fraction))) if rows > 1 else 0
    if rows - n_eval < 1:
        raise ValueError(
            f"the text corpus ({total} tokens) is too small for one row of seq_len={seq_len} in each "
            f"split (train and eval); use more text or a shorter --seq_len"
        )
    counts, writer, name, shards = {"train": 0, "eval": 0}, None, None, []
    for r, row in enumerate(_packed_rows(_token_docs(input_path, max_bytes, tokenizer), seq_len)):
        split = "train" if r < rows - n_eval else "eval"
        if split != name or counts[split] % rows_per_shard == 0:
            if writer is not None:
                writer.close()
            name = split
            shards.append([f"{split}-{counts[split] // rows_per_shard:05d}.array_record", split, 0])
            writer = ArrayRecordWriter(os.path.join(output_dir, shards[-1][0]), "group_size:1")
        writer.write(row.astype(ROW_DTYPE).tobytes())
        counts[split] += 1
        shards[-1][2] += 1
    if writer is not None:
        writer.close()
    return counts, [tuple(s) for s in shards]


def _token_docs(path: str, max_bytes: int, tokenizer):
    """BOS-prefixed int32 ids of each document, one file at a time."""
    for doc in iter_documents(path, max_bytes):
        ids = (
            doc.astype(np.int32) if tokenizer is None or tokenizer.kind == "bytes" else tokenizer.encode(doc.tobytes())
        )
        if len(ids):
            yield np.concatenate([[BOS if tokenizer is None else tokenizer.bos_id], ids]).astype(np.int32)


def _packed_rows(docs, seq_len: int):
    """Rows (tokens then doc ids, 2 * (T + 1)) of the packed stream; row i is its window
    [i T, i T + T + 1), as in ``sessa_jax.data.packing``."""
    tok, ids = np.zeros(0, np.int32), np.zeros(0, np.int64)
    for d, doc in enumerate(docs):
        tok, ids = np.concatenate([tok, doc]), np.concatenate([ids, np.full(len(doc), d, np.int64)])
        while len(tok) >= seq_len + 1:
            yield np.concatenate([tok[: seq_len + 1], ids[: seq_len + 1]])
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
    v = sub.add_parser("verify", help="check shards against their manifest (as training does at open)")
    v.add_argument("--dir", required=True)
    v.add_argument("--seq_len", type=int, default=0, help="the run's seq_len (0 = the manifest's)")
    v.add_argument("--tokenizer", default="", help="the run's tokenizer kind ('' = not checked)")
    v.add_argument("--tokenizer_path", default="")
    v.add_argument("--no_checksums", action="store_true", help="skip the CRC-32 read of every byte")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            return _verify_command(args, make_tokenizer)
        counts = prepare(
            args.input,
            args.output,
            args.seq_len,
            args.rows_per_shard,
            args.max_bytes,
            args.eval_fraction,
            args.overwrite,
            make_tokenizer(args.tokenizer, args.tokenizer_path),
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} train and {counts['eval']} eval rows of seq_len={args.seq_len} to {args.output}")
    return 0


def _verify_command(args, make_tokenizer) -> int:
    import time

    manifest = read_manifest(args.dir)
    seq_len = args.seq_len or manifest.get("seq_len")
    tokenizer = make_tokenizer(args.tokenizer, args.tokenizer_path) if args.tokenizer else ANY_TOKENIZER
    start = time.perf_counter()
    verify_shards(args.dir, seq_len, tokenizer, verify_checksums=not args.no_checksums)
    seconds = time.perf_counter() - start
    size = sum(e["bytes"] for e in manifest["shards"])
    print(
        f"{len(manifest['shards'])} shards ({size / 1e6:.1f} MB, {sum(manifest['rows'].values())} rows of "
        f"seq_len={seq_len}, tokenizer {_describe_tokenizer(manifest['tokenizer'])}) match {MANIFEST}"
        f"{'' if args.no_checksums else ', CRC-32 included'}; checked in {seconds:.3f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
