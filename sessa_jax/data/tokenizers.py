"""Tokenizers for text runs: bytes, a sentencepiece ``.model`` or a HF ``tokenizer.json``.

``data.tokenizer.kind`` picks one; ``data.tokenizer.path`` names the model file. Every
tokenizer maps one document (bytes) to int32 ids and back, has a ``bos_id`` that starts each
packed document, a ``vocab_size`` that covers every id it emits (the model's vocabulary
follows it), and a ``token_bytes()`` table (V,) of UTF-8 bytes per id for bits per byte.

* ``bytes``: ids 0..255 are the bytes, 256 is BOS (vocabulary 257). Exact round trip.
* ``sentencepiece``: a user's model, or one fitted offline on the run's corpus with
  ``sessa-train tokenizer train --input CORPUS --output spm.model --vocab_size 4096``
  (BPE, byte fallback and identity normalisation, so every text round-trips exactly).
  With ``kind=sentencepiece`` and an empty ``path`` the training loop fits one on the
  corpus into ``WORKDIR/tokenizer.model`` at the first start.
* ``tokenizers``: a HF ``tokenizer.json`` (``tokenizers.Tokenizer.from_file``). Its BOS is
  the first of ``<|endoftext|>``, ``<s>``, ``<bos>``, ``[BOS]``, ``<|begin_of_text|>`` it
  defines; without one, BOS is a new id ``vocab_size`` (vocabulary + 1).

Training reads the corpus line by line (``sentence_iterator``), so fitting a tokenizer never
holds the corpus in memory; text sources tokenize one file at a time.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator

import numpy as np

from sessa_jax.data.corpus import iter_documents
from sessa_jax.options import TOKENIZER_KINDS as KINDS

HF_BOS_NAMES = ("<|endoftext|>", "<s>", "<bos>", "[BOS]", "<|begin_of_text|>")


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus BOS 256."""

    kind = "bytes"
    bos_id = 256
    vocab_size = 257

    def encode(self, text: bytes | str) -> np.ndarray:
        """One document -> int32 ids (T,), no BOS."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """ids -> text; ids >= 256 (BOS, padding) are dropped."""
        return bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes per id (V,): 1 for byte ids, 0 for BOS."""
        return np.r_[np.ones(256, np.int32), np.zeros(1, np.int32)]


class SentencePieceTokenizer:
    """A sentencepiece model file; BOS is the model's bos (else eos, else a new id)."""

    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        _require_file(
            path, "sentencepiece .model", "fit one with `sessa-train tokenizer train --input CORPUS --output spm.model`"
        )
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        n = self.sp.get_piece_size()
        special = [i for i in (self.sp.bos_id(), self.sp.eos_id()) if i >= 0]
        self.bos_id = special[0] if special else n
        self.vocab_size = n if special else n + 1

    def encode(self, text: bytes | str) -> np.ndarray:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes | bytearray) else text
        return np.asarray(self.sp.encode(text), np.int32)

    def decode(self, ids) -> str:
        n = self.sp.get_piece_size()
        return self.sp.decode([int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < n and i != self.bos_id])

    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.sp.get_piece_size()):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            out[i] = 1 if self.sp.is_byte(i) else len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out


class HFTokenizer:
    """A HF ``tokenizers`` ``tokenizer.json``."""

    kind = "tokenizers"

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        _require_file(path, "HF tokenizer.json", "save one with `tokenizers.Tokenizer.save(path)`")
        self.path = path
        self.tok = Tokenizer.from_file(path)
        n = self.tok.get_vocab_size(with_added_tokens=True)
        found = [self.tok.token_to_id(t) for t in HF_BOS_NAMES if self.tok.token_to_id(t) is not None]
        self.bos_id = found[0] if found else n
        self.vocab_size = n if found else n + 1
        self._n = n

    def encode(self, text: bytes | str) -> np.ndarray:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes | bytearray) else text
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self._n and i != self.bos_id])

    def token_bytes(self) -> np.ndarray:
        # A token's own decoded text; exact for byte-level and sentencepiece-style vocabularies
        # up to the bytes of a multi-byte character split across tokens.
        pieces = self.tok.decode_batch([[i] for i in range(self._n)], skip_special_tokens=True)
        out = np.zeros(self.vocab_size, np.int32)
        out[: self._n] = [len(p.encode("utf-8")) for p in pieces]
        return out


def _require_file(path: str, what: str, fix: str) -> None:
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"data.tokenizer.path={path!r} is not a {what} file; {fix}")


def make_tokenizer(kind: str = "bytes", path: str = ""):
    """The tokenizer of ``data.tokenizer`` (``kind`` in KINDS; ``path`` its model file)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    if kind == "tokenizers":
        return HFTokenizer(path)
    raise ValueError(f"data.tokenizer.kind={kind!r} is unknown; choose one of {KINDS}")


# sentencepiece drops every line longer than its max_sentence_length (bytes); lines are cut to
# this length before it sees them, so a corpus of long lines (minified JSON, one paragraph per
# file) is fitted on all its text instead of on nothing.
MAX_LINE_BYTES = 8192


def split_line(line: str, limit: int = MAX_LINE_BYTES) -> list[str]:
    """``line`` cut into pieces of at most ``limit`` UTF-8 bytes, at the last space of each piece
    when it has one (else at a character boundary); the pieces concatenate to ``line``."""
    data = line.encode("utf-8")
    if len(data) <= limit:
        return [line]
    pieces = []
    while len(data) > limit:
        cut = limit
        while cut > 0 and (data[cut] & 0xC0) == 0x80:  # never inside a multi-byte character
            cut -= 1
        space = data.rfind(b" ", 0, cut)
        cut = space + 1 if space > 0 else cut
        pieces.append(data[:cut].decode("utf-8"))
        data = data[cut:]
    return pieces + ([data.decode("utf-8")] if data else [])


def iter_lines(path: str, max_bytes: int = 0) -> Iterator[str]:
    """Non-empty lines of the text files at ``path`` ('' = built-in corpus), streamed, each cut to
    at most ``MAX_LINE_BYTES`` bytes (``split_line``); stops after the file that passes
    ``max_bytes`` (0 = all): fitting a tokenizer may sample."""
    total = 0
    for doc in iter_documents(path, 0):  # 0: no size error; the sample cap is applied here
        for line in bytes(doc).decode("utf-8", errors="replace").splitlines():
            if line.strip():
                yield from split_line(line)
        total += len(doc)
        if max_bytes and total >= max_bytes:
            return


def _fit_error(e: Exception, vocab_size: int, input_path: str) -> str:
    """A sentencepiece training failure as its cause and the fix (its own message kept at the end)."""
    msg = str(e)
    where = repr(input_path or "the built-in corpus")
    need = re.search(r"required_chars\. \d+ vs (\d+)", msg)
    if need:
        return (
            f"the corpus {where} has more distinct characters than vocab_size={vocab_size} can hold "
            f"(sentencepiece needs {need.group(1)} pieces for them); raise --vocab_size to at least "
            f"{need.group(1)}"
        )
    if "sentences_.empty()" in msg:
        return f"sentencepiece found no usable lines in {where}; pass a corpus with text in it"
    if "Vocabulary size too high" in msg:
        return (
            f"the corpus {where} is too small to merge up to vocab_size={vocab_size}; lower --vocab_size "
            f"or use more text"
        )
    return f"sentencepiece could not fit vocab_size={vocab_size} on {where}"


def train_sentencepiece(
    input_path: str,
    output: str,
    vocab_size: int = 4096,
    model_type: str = "bpe",
    max_bytes: int = 20_000_000,
    num_threads: int = 2,
) -> SentencePieceTokenizer:
    """Fits a sentencepiece model on the corpus at ``input_path`` offline; writes ``output``.

    Byte fallback, identity normalisation and no dummy prefix make every text round-trip exactly
    and its pieces sum to its bytes; ids: unk 0,
    bos 1, eos 2. ``max_bytes`` caps the text read for fitting (0 = all of it).
    """
    import sentencepiece as spm

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 260:
        raise ValueError(
            f"tokenizer vocab_size={vocab_size!r} must be an integer >= 260 "
            f"(256 byte-fallback pieces + unk/bos/eos + at least one merge)"
        )
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"tokenizer model_type={model_type!r} must be 'bpe' or 'unigram'")
    if not output.endswith(".model"):
        raise ValueError(f"tokenizer output={output!r} must end in .model (sentencepiece writes PREFIX.model)")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_lines(input_path, max_bytes),
            model_prefix=output[: -len(".model")],
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            hard_vocab_limit=False,
            max_sentence_length=MAX_LINE_BYTES,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"{_fit_error(e, vocab_size, input_path)} (sentencepiece: {e})") from e
    return SentencePieceTokenizer(output)


def main(argv: list[str] | None = None) -> int:
    """``sessa-train tokenizer train ...``: fit a sentencepiece model offline."""
    parser = argparse.ArgumentParser(prog="sessa-train tokenizer", description="fit a sentencepiece model offline")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fit a sentencepiece model on a local corpus")
    p.add_argument("--input", default="", help="text file or directory ('' = the built-in corpus)")
    p.add_argument("--output", required=True, help="PATH.model to write")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--model_type", default="bpe", choices=("bpe", "unigram"))
    p.add_argument("--max_bytes", type=int, default=20_000_000, help="cap on text read for fitting (0 = all)")
    args = parser.parse_args(argv)
    try:
        tok = train_sentencepiece(args.input, args.output, args.vocab_size, args.model_type, args.max_bytes)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output}: {tok.vocab_size} ids (bos {tok.bos_id}); use it with "
        f"--config.data.tokenizer.kind=sentencepiece --config.data.tokenizer.path={args.output}"
    )
    return 0


def ensure_tokenizer(cfg, workdir: str, log=print):
    """``cfg`` with ``data.tokenizer.path`` filled in: for a text run with ``kind=sentencepiece``
    and no path, fits one on the run's corpus into ``WORKDIR/tokenizer.model`` (once: a resumed
    run reuses the file). Process 0 fits; the others wait (the workdir must be shared). In a
    ``gs://`` workdir the model is kept in the bucket and read from a local copy
    (``train.workdir.local_dir``)."""
    import jax
    import ml_collections as mc

    tok = cfg.data.tokenizer
    if cfg.data.task != "text" or tok.kind != "sentencepiece" or tok.path:
        return cfg
    # Imported here: ``sessa_jax.train``'s __init__ imports the run config, which imports this module.
    from sessa_jax.train import workdir as wd

    workdir = wd.normalize(workdir)
    saved = wd.join(workdir, "tokenizer.model")
    path = os.path.join(wd.local_dir(workdir), "tokenizer.model")  # == saved, unless the workdir is a bucket
    if jax.process_index() == 0 and not wd.exists(saved):
        log(
            f"fitting a sentencepiece tokenizer (vocab {tok.vocab_size}) on "
            f"{cfg.data.text.path or 'the built-in corpus'} -> {saved}"
        )
        train_sentencepiece(cfg.data.text.path, path, tok.vocab_size, max_bytes=cfg.data.text.max_bytes)
        if saved != path:
            wd.write_bytes(saved, wd.read_bytes(path))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sessa_jax tokenizer fitted")
    if saved != path:  # sentencepiece reads a local file: every process takes the workdir's copy
        os.makedirs(os.path.dirname(path), exist_ok=True)
        wd.write_bytes(path, wd.read_bytes(saved))
    out = mc.ConfigDict(cfg.to_dict())
    out.data.tokenizer.path = path
    return out
