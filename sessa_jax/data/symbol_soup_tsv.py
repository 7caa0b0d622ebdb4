"""SymbolSoup in the published file format: text rendering, parsing, TSV export and reading.

The published script writes ``<task>_train.tsv``, ``<task>_val.tsv``, ``<task>_test.tsv``
(tab-separated, header ``Text  Answer``, a multi-line quoted text and ``CLASS_k``) and
``<task>_labels.tsv`` (``Label  ClassId``). ``export`` writes the same files from our
generator; ``read_tsv`` reads either program's files into token ids and labels, and
``TsvSource`` serves them to the training pipeline.

    python -m sessa_jax.data.symbol_soup_tsv --output_dir data/soup --seed 0 \\
        --num_train_samples 20000 --num_valid_samples 2000 --num_test_samples 2000 \\
        --min_tokens 400 --max_tokens 600
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import os
import re

import numpy as np

from sessa_jax.data import symbol_soup as ss

HEADER = ("Text", "Answer")
FILE_SPLITS = ("train", "val", "test")  # file-name suffixes of splits 0/1/2
_TOKEN_RE = re.compile("|".join(re.escape(t) for t in sorted(ss.SPECIALS, key=len, reverse=True)) + "|.", re.S)


def class_name(label: int) -> str:
    """``CLASS_k``, the published name of class ``k``."""
    return f"CLASS_{label}"


def parse_class(name: str) -> int:
    """Class index of a ``CLASS_k`` answer; ValueError names the bad value."""
    prefix, _, k = name.strip().partition("_")
    if prefix != "CLASS" or not k.isdigit() or not 0 <= int(k) < ss.NUM_CLASSES:
        raise ValueError(f"SymbolSoup answer {name!r} is not one of CLASS_0 .. CLASS_{ss.NUM_CLASSES - 1}")
    return int(k)


def render(tokens: np.ndarray) -> str:
    """Token ids (1..23) -> the published text."""
    return "".join(ss.TEXT_TOKENS[int(t) - 1] for t in tokens)


def tokenize(text: str) -> np.ndarray:
    """The published tokenization: specials are one token each, every other character one token.

    Raises ValueError for characters outside the 23 text tokens.
    """
    pieces = _TOKEN_RE.findall(text)
    try:
        return np.asarray([ss.TOKEN_ID[t] for t in pieces], np.int32)
    except KeyError as e:
        raise ValueError(
            f"SymbolSoup text has {e.args[0]!r}, which is none of the 23 text tokens "
            f"{list(ss.TEXT_TOKENS)}; is this a SymbolSoup file?"
        ) from None


def blocks_of(tokens: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(noise blocks, styled blocks in order) as symbol indices 0..15, from a text's token ids."""
    tokens = np.asarray(tokens)
    marks = np.flatnonzero((tokens == ss.BOS) | (tokens == ss.SEP1) | (tokens == ss.SEP2) | (tokens == ss.SEP))
    if len(marks) != 6 or tokens[marks].tolist() != [ss.BOS, ss.SEP1, ss.SEP2, ss.SEP1, ss.SEP2, ss.SEP]:
        raise ValueError("SymbolSoup text must read <bos> .. <sep1> .. <sep2> .. <sep1> .. <sep2> .. <sep> <label>")
    pieces = []
    for a, b in zip(marks[:-1], marks[1:]):
        seg = tokens[a + 1 : b]
        pieces.append((seg[(seg >= ss.SYMBOL0)] - ss.SYMBOL0).astype(np.int32))
    return [pieces[0], pieces[2], pieces[4]], [pieces[1], pieces[3]]


def write_tsv(path: str, texts: list[str], labels: list[int]) -> None:
    """One split in the published TSV format (header Text, Answer; quoted multi-line texts)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(HEADER)
        writer.writerows((t, class_name(y)) for t, y in zip(texts, labels))


def write_label_vocab(path: str) -> None:
    """The published label vocabulary file (header Label, ClassId)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(("Label", "ClassId"))
        writer.writerows((class_name(k), k) for k in range(ss.NUM_CLASSES))


def export(
    output_dir: str,
    seed: int = 0,
    sizes=ss.PUBLISHED_SPLIT_SIZES,
    min_tokens: int = 400,
    max_tokens: int = 600,
    task: str = "symbol_soup",
) -> list[str]:
    """Writes train/val/test TSVs and the label file like the published script; returns the paths."""
    paths = []
    for split, (suffix, size) in enumerate(zip(FILE_SPLITS, sizes)):
        examples = ss.generate(seed, split, size, min_tokens, max_tokens)
        path = os.path.join(output_dir, f"{task}_{suffix}.tsv")
        write_tsv(path, [render(e.tokens()) for e in examples], [e.label for e in examples])
        paths.append(path)
    paths.append(os.path.join(output_dir, f"{task}_labels.tsv"))
    write_label_vocab(paths[-1])
    return paths


def read_tsv(path: str) -> tuple[list[np.ndarray], np.ndarray]:
    """(token ids of each text, labels (N,)) of a published-format split file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SymbolSoup TSV {path!r} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or tuple(rows[0]) != HEADER:
        raise ValueError(f"{path}: the first row must be the header {HEADER}; got {rows[0] if rows else 'nothing'}")
    texts, labels = [], []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise ValueError(f"{path}: record {n} has {len(row)} fields; expected 2 (Text, Answer)")
        try:
            texts.append(tokenize(row[0]))
            labels.append(parse_class(row[1]))
        except ValueError as e:
            raise ValueError(f"{path}: record {n}: {e}") from None
    return texts, np.asarray(labels, np.int32)


def split_file(tsv_dir: str, split: int) -> str:
    """The one ``*_<train|val|test>.tsv`` file of ``split`` in ``tsv_dir``."""
    pattern = os.path.join(tsv_dir, f"*_{FILE_SPLITS[split]}.tsv")
    found = sorted(glob.glob(pattern))
    if len(found) != 1:
        raise ValueError(
            f"data.symbol_soup.tsv_dir={tsv_dir!r} must hold exactly one file matching "
            f"{os.path.basename(pattern)!r}; found {found or 'none'} (files as the published script "
            f"or `python -m sessa_jax.data.symbol_soup_tsv` write them)"
        )
    return found[0]


@dataclasses.dataclass(frozen=True)
class TsvSource:
    """Random-access source over one TSV split file; rows as ``symbol_soup.to_training_example``."""

    path: str
    seq_len: int

    def __post_init__(self):
        texts, labels = read_tsv(self.path)
        longest = max((len(t) for t in texts), default=0)
        if longest > self.seq_len:
            raise ValueError(
                f"{self.path} holds texts of up to {longest} tokens, more than data.seq_len="
                f"{self.seq_len}; set data.seq_len >= {longest}"
            )
        object.__setattr__(self, "_texts", texts)
        object.__setattr__(self, "_labels", labels)

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return ss.to_training_example(self._texts[index], int(self._labels[index]), self.seq_len)


def main(argv=None) -> None:
    """CLI with the published script's options; writes the same four files from our generator."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="symbol_soup")
    p.add_argument("--num_train_samples", type=int, default=ss.PUBLISHED_SPLIT_SIZES[0])
    p.add_argument("--num_valid_samples", type=int, default=ss.PUBLISHED_SPLIT_SIZES[1])
    p.add_argument("--num_test_samples", type=int, default=ss.PUBLISHED_SPLIT_SIZES[2])
    p.add_argument("--min_tokens", type=int, default=ss.LENGTHS["published"][0])
    p.add_argument("--max_tokens", type=int, default=ss.LENGTHS["published"][1])
    p.add_argument("--lengths", choices=sorted(ss.LENGTHS), help="preset (min_tokens, max_tokens); overrides both")
    p.add_argument("--output_dir", default="./data/symbol_soup_left_right")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    lo, hi = ss.LENGTHS[a.lengths] if a.lengths else (a.min_tokens, a.max_tokens)
    sizes = (a.num_train_samples, a.num_valid_samples, a.num_test_samples)
    for path in export(a.output_dir, a.seed, sizes, lo, hi, a.task):
        print("wrote", path)


if __name__ == "__main__":
    main()
