"""Multi-query associative recall (MQAR), as in the Zoology benchmark (Arora et al. 2023).

A sequence holds ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...``, then a query
region of zeros in which every key appears once more, at random even offsets, in random
order. The target at a query position is that key's value; only those positions carry
loss weight, so accuracy is measured on the answers alone. Keys are distinct and drawn
from ``[1, vocab_size // 2)``, values from ``[vocab_size // 2, vocab_size)``; 0 is filler.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sessa_jax.data.packing import single_segment


@dataclasses.dataclass(frozen=True)
class MQARSource:
    """Random-access source: example ``i`` depends only on (seed, split, i)."""

    seq_len: int
    vocab_size: int = 64
    num_kv_pairs: int = 8
    seed: int = 0
    split: int = 0  # 0 train, 1 eval: disjoint random streams
    num_records: int = 2**40

    def __post_init__(self):
        check_mqar(self.seq_len, self.vocab_size, self.num_kv_pairs)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split, int(index)])
        return mqar_example(rng, self.seq_len, self.vocab_size, self.num_kv_pairs)


def check_mqar(seq_len: int, vocab_size: int, num_kv_pairs: int, prefix: str = "data") -> None:
    """Raises ValueError, naming the config key, when no MQAR example can be built."""
    if num_kv_pairs < 1:
        raise ValueError(f"{prefix}.mqar.num_kv_pairs must be >= 1; got {num_kv_pairs}")
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(
            f"{prefix}.mqar.vocab_size={vocab_size} gives {vocab_size // 2 - 1} distinct keys, fewer than "
            f"num_kv_pairs={num_kv_pairs}; raise vocab_size to at least {2 * num_kv_pairs + 2}"
        )
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(
            f"{prefix}.seq_len={seq_len} is too short for num_kv_pairs={num_kv_pairs}: MQAR needs "
            f"seq_len >= 4 * num_kv_pairs = {4 * num_kv_pairs} (pairs, then one query slot per pair)"
        )


def mqar_example(rng: np.random.Generator, seq_len: int, vocab_size: int, num_kv_pairs: int) -> dict:
    """One example: inputs/targets/weights (seq_len,) plus segment ids and positions."""
    k = num_kv_pairs
    keys = rng.choice(np.arange(1, vocab_size // 2), size=k, replace=False)
    values = rng.integers(vocab_size // 2, vocab_size, size=k)
    inputs = np.zeros(seq_len, np.int32)
    inputs[0:2 * k:2], inputs[1:2 * k:2] = keys, values
    # Query slots at even offsets of the query region (Zoology's layout).
    slots = rng.choice((seq_len - 2 * k) // 2, size=k, replace=False)
    order = rng.permutation(k)
    query_pos = 2 * k + 2 * slots
    inputs[query_pos] = keys[order]
    targets = np.zeros(seq_len, np.int32)
    weights = np.zeros(seq_len, np.float32)
    targets[query_pos] = values[order]
    weights[query_pos] = 1.0
    return dict(inputs=inputs, targets=targets, weights=weights, **single_segment(seq_len))
