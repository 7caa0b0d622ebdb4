"""Unit-lower-triangular solves built from matmuls (XLA's triangular_solve is row by row on CPU).

Solves (I - N) x = b or (I - N)^T x = b for strictly lower N (B, c, c) and b (B, c, D) by
divide and conquer on halves (the off-diagonal block becomes one matmul) down to leaves
of at most ``LEAF`` rows, where the exact nilpotent series
    (I - N)^-1 = (I + N)(I + N^2)(I + N^4) ...   (ceil(log2 c) factors)
is applied. Sessa's N = diag(gamma) A has row sums |N| <= gamma_max < 1, so no power grows.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

LEAF = 16
_HI = lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.einsum("bij,bjd->bid", a, b, precision=_HI)


def _series(n, b, transpose: bool):
    p = jnp.swapaxes(n, 1, 2) if transpose else n
    x = b
    steps = math.ceil(math.log2(n.shape[-1])) if n.shape[-1] > 1 else 0
    for k in range(steps):
        x = x + _mm(p, x)
        if k + 1 < steps:
            p = _mm(p, p)
    return x


def unit_lower_solve(n, b, *, transpose: bool = False):
    """x with (I - n) x = b (or (I - n)^T x = b); n strictly lower (B, c, c), b (B, c, D)."""
    c = n.shape[-1]
    if c <= LEAF:
        return _series(n, b, transpose)
    h = c // 2
    n11, n21, n22 = n[:, :h, :h], n[:, h:, :h], n[:, h:, h:]
    if not transpose:
        x1 = unit_lower_solve(n11, b[:, :h])
        x2 = unit_lower_solve(n22, b[:, h:] + _mm(n21, x1))
    else:
        x2 = unit_lower_solve(n22, b[:, h:], transpose=True)
        x1 = unit_lower_solve(n11, b[:, :h] + _mm(jnp.swapaxes(n21, 1, 2), x2), transpose=True)
    return jnp.concatenate([x1, x2], axis=1)
