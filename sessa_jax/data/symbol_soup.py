"""SymbolSoup-style long-range classification (written from the task's description).

20 classes = 4 "left" styles x 5 "right" styles. An example is

    <bos> noise <sep1> styled <sep2> noise <sep1> styled <sep2> noise <sep> <label>

where the two styled blocks (one from the left family, one from the right family, in
random order) come from style-specific Markov chains over a 16-symbol alphabet with
motif insertions and 3% symbol noise, and noise blocks are uniform symbols. The model
reads everything up to ``<sep>`` and must predict ``<label>``; only that position
carries loss weight. The styles (chains, motifs) are fixed by ``task_seed``; examples
are fixed by (seed, split, index).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from sessa_jax.data.packing import single_segment

NUM_SYMBOLS = 16
BOS, SEP1, SEP2, SEP = 16, 17, 18, 19
NUM_LEFT, NUM_RIGHT = 4, 5
NUM_CLASSES = NUM_LEFT * NUM_RIGHT
LABEL0 = 20
VOCAB_SIZE = LABEL0 + NUM_CLASSES  # 40
NUM_SPECIAL = 7  # bos, 2 x (sep1, sep2), sep, label
MOTIF_LEN = 4


@dataclasses.dataclass(frozen=True)
class Style:
    transition: np.ndarray  # (16, 16) row-stochastic
    motif: np.ndarray  # (MOTIF_LEN,)


@functools.lru_cache(maxsize=16)
def styles(task_seed: int) -> tuple[Style, ...]:
    """The 9 styles: indices 0..3 are the left family, 4..8 the right family."""
    rng = np.random.default_rng([task_seed, 0x50C])
    out = []
    for _ in range(NUM_LEFT + NUM_RIGHT):
        transition = rng.dirichlet(np.full(NUM_SYMBOLS, 0.2), size=NUM_SYMBOLS)
        out.append(Style(transition, rng.integers(0, NUM_SYMBOLS, size=MOTIF_LEN)))
    return tuple(out)


def label_of(left: int, right: int) -> int:
    """Class index of a (left style, right style) pair."""
    return left * NUM_RIGHT + right


def styled_block(rng: np.random.Generator, style: Style, length: int, motif_prob: float, noise_prob: float):
    """Markov chain of ``style`` with motif insertions, then symbol noise."""
    out = np.empty(length, np.int32)
    cum = np.cumsum(style.transition, axis=1)
    u = rng.random(length)
    motif_at = rng.random(length) < motif_prob
    prev, t = int(rng.integers(NUM_SYMBOLS)), 0
    while t < length:
        if motif_at[t] and t + MOTIF_LEN <= length:
            out[t:t + MOTIF_LEN] = style.motif
            prev, t = int(style.motif[-1]), t + MOTIF_LEN
            continue
        prev = min(int(np.searchsorted(cum[prev], u[t], side="right")), NUM_SYMBOLS - 1)
        out[t], t = prev, t + 1
    flip = rng.random(length) < noise_prob
    out[flip] = rng.integers(0, NUM_SYMBOLS, size=int(flip.sum()))
    return out


def check_symbol_soup(seq_len: int, block_len: int, prefix: str = "data") -> None:
    """Raises ValueError, naming the config key, when no example fits in seq_len."""
    if block_len < 1:
        raise ValueError(f"{prefix}.symbol_soup.block_len must be >= 1; got {block_len}")
    need = 2 * block_len + NUM_SPECIAL - 1
    if seq_len < need:
        raise ValueError(
            f"{prefix}.seq_len={seq_len} cannot hold two styled blocks of {prefix}.symbol_soup.block_len="
            f"{block_len} plus {NUM_SPECIAL} special tokens; need seq_len >= {need} or a smaller block_len"
        )


@dataclasses.dataclass(frozen=True)
class SymbolSoupSource:
    """Random-access source: example ``i`` depends only on (task_seed, seed, split, i)."""

    seq_len: int
    block_len: int = 32
    task_seed: int = 0
    motif_prob: float = 0.05
    noise_prob: float = 0.03
    seed: int = 0
    split: int = 0
    num_records: int = 2**40

    def __post_init__(self):
        check_symbol_soup(self.seq_len, self.block_len)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split, int(index)])
        return symbol_soup_example(rng, self.seq_len, self.block_len, styles(self.task_seed),
                                   self.motif_prob, self.noise_prob)


def symbol_soup_example(rng, seq_len, block_len, style_set, motif_prob=0.05, noise_prob=0.03) -> dict:
    """One example; ``inputs`` ends with <sep> and the last target is <label>."""
    left, right = int(rng.integers(NUM_LEFT)), int(rng.integers(NUM_RIGHT))
    blocks = [styled_block(rng, style_set[left], block_len, motif_prob, noise_prob),
              styled_block(rng, style_set[NUM_LEFT + right], block_len, motif_prob, noise_prob)]
    if rng.random() < 0.5:
        blocks.reverse()
    total_noise = seq_len + 1 - NUM_SPECIAL - 2 * block_len
    cuts = np.sort(rng.integers(0, total_noise + 1, size=2))
    noise_lens = [cuts[0], cuts[1] - cuts[0], total_noise - cuts[1]]
    noise = [rng.integers(0, NUM_SYMBOLS, size=n).astype(np.int32) for n in noise_lens]
    seq = np.concatenate([
        [BOS], noise[0], [SEP1], blocks[0], [SEP2], noise[1], [SEP1], blocks[1], [SEP2], noise[2],
        [SEP, LABEL0 + label_of(left, right)],
    ]).astype(np.int32)
    weights = np.zeros(seq_len, np.float32)
    weights[-1] = 1.0
    return dict(inputs=seq[:-1], targets=seq[1:], weights=weights, **single_segment(seq_len))
