"""Multi-query associative recall (MQAR), as in the Zoology benchmark (Arora et al. 2023).

A sequence holds ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...``, then a query
region of zeros in which every key appears once more, at random even offsets, in random
order. The target at a query position is that key's value; only those positions carry
loss weight, so accuracy is measured on the answers alone. Keys are distinct and drawn
from ``[1, vocab_size // 2)``; values are drawn from ``[vocab_size // 2, vocab_size)``,
distinct within a sequence (Zoology's setting) unless ``distinct_values=False``; 0 is filler.

Every query is answered, so a model that knows which values are in the context but not
which key each belongs to (no association) is right on a query only by luck. The best such
predictor guesses a most frequent in-context value: ``no_association_accuracy`` gives its
expected accuracy in closed form (1 / num_kv_pairs when values are distinct) and
``frequency_baseline`` measures it on given examples.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np

from sessa_jax.data.packing import single_segment


@dataclasses.dataclass(frozen=True)
class MQARSource:
    """Random-access source: example ``i`` depends only on (seed, split, i)."""

    seq_len: int
    vocab_size: int = 64
    num_kv_pairs: int = 8
    seed: int = 0
    split: int = 0  # 0 train, 1 eval (2 test): disjoint random streams
    num_records: int = 2**40
    distinct_values: bool = True

    def __post_init__(self):
        check_mqar(self.seq_len, self.vocab_size, self.num_kv_pairs)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split, int(index)])
        return mqar_example(rng, self.seq_len, self.vocab_size, self.num_kv_pairs, self.distinct_values)


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


def mqar_example(
    rng: np.random.Generator, seq_len: int, vocab_size: int, num_kv_pairs: int, distinct_values: bool = True
) -> dict:
    """One example: inputs/targets/weights (seq_len,) plus segment ids and positions."""
    k = num_kv_pairs
    keys = rng.choice(np.arange(1, vocab_size // 2), size=k, replace=False)
    value_ids = np.arange(vocab_size // 2, vocab_size)
    values = rng.choice(value_ids, size=k, replace=False) if distinct_values else rng.choice(value_ids, size=k)
    inputs = np.zeros(seq_len, np.int32)
    inputs[0 : 2 * k : 2], inputs[1 : 2 * k : 2] = keys, values
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


def no_association_accuracy(num_kv_pairs: int, num_values: int, distinct_values: bool = True) -> float:
    """Expected accuracy of the best predictor that ignores which key goes with which value.

    Such a predictor can only guess a most frequent value of the context (ties broken at
    random); on a sequence whose most frequent value occurs ``c`` times it answers ``c`` of
    the ``K = num_kv_pairs`` queries right in expectation, so its accuracy is E[c] / K.
    Distinct values: c = 1, accuracy 1 / K. Values drawn independently and uniformly from
    ``num_values``: E[c] = sum_{m>=1} P(c >= m) with P(c <= m) from the occupancy count
    K! [x^K] (sum_{j<=m} x^j / j!)^V / V^K, computed exactly in rationals.
    """
    k, v = num_kv_pairs, num_values
    if k < 1 or v < 1 or (distinct_values and v < k):
        raise ValueError(
            f"no_association_accuracy needs 1 <= num_kv_pairs <= num_values (distinct) or both >= 1; "
            f"got num_kv_pairs={k}, num_values={v}"
        )
    if distinct_values:
        return 1.0 / k

    def at_most(m: int) -> Fraction:  # P(every value occurs at most m times)
        poly = [Fraction(1)]  # coefficients of (sum_{j<=m} x^j / j!)^V, truncated at x^K
        base = [Fraction(1, math.factorial(j)) for j in range(min(m, k) + 1)]
        for _ in range(v):
            poly = [
                sum(poly[i] * base[n - i] for i in range(max(0, n - len(base) + 1), min(n, len(poly) - 1) + 1))
                for n in range(min(k, len(poly) + len(base) - 2) + 1)
            ]
        coef = poly[k] if k < len(poly) else Fraction(0)
        return coef * math.factorial(k) / Fraction(v) ** k

    expected_max = sum(1 - at_most(m - 1) for m in range(1, k + 1))
    return float(expected_max / k)


def frequency_baseline(batch: dict[str, np.ndarray], num_kv_pairs: int) -> float:
    """Measured expected accuracy of "answer a most frequent context value" on ``batch``.

    ``batch`` holds stacked MQAR examples (``inputs``, ``targets``, ``weights``; (N, T)).
    Per sequence, the values are the inputs at the pair positions 1, 3, ..., 2K-1; a query
    whose value is among the m most frequent ones is right with probability 1/m. Returns
    the mean over all weighted (query) positions.
    """
    inputs, targets, weights = (np.asarray(batch[k]) for k in ("inputs", "targets", "weights"))
    right = total = 0.0
    for row_in, row_t, row_w in zip(inputs, targets, weights):
        vals, counts = np.unique(row_in[1 : 2 * num_kv_pairs : 2], return_counts=True)
        top = set(vals[counts == counts.max()].tolist())
        asked = row_t[row_w > 0]
        right += sum(1.0 / len(top) for a in asked if int(a) in top)
        total += len(asked)
    return right / max(total, 1.0)
