"""Unit-lower-triangular solves built from matmuls (XLA's triangular_solve is row by row on CPU).

Solves (I - N) x = b or (I - N)^T x = b for strictly lower N (B, c, c) and b (B, c, D) by
divide and conquer on halves (the off-diagonal block becomes one matmul) down to leaves
of at most ``LEAF`` rows, where the exact nilpotent series
    (I - N)^-1 = (I + N)(I + N^2)(I + N^4) ...   (ceil(log2 c) factors)
is applied. Sessa's N = diag(gamma) A has row sums |N| <= gamma_max < 1, so no power grows.

``unit_lower_inverse`` forms (I - N)^-1 itself (N = diag(r) A with row scales r: each block
scaled where it is sliced, so no scaled copy of A is made), bottom-up: every LEAF-sized diagonal block is
inverted by the series at once, then each level merges pairs of diagonal blocks,
    [[I - N11, 0], [-N21, I - N22]]^-1 = [[X11, 0], [X22 N21 X11, X22]],
with all pairs of a level in one batched product. The halves of a block do not wait for each
other, so the program is ~4 operations per level (log2(c / LEAF) levels) instead of a
sequential recursion over c / LEAF leaves.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

LEAF = 16
_HI = lax.Precision.HIGHEST


def _exact(spec: str, a, b):
    return jnp.einsum(spec, a, b, precision=_HI)


def _mm(a, b):
    return _exact("bij,bjd->bid", a, b)


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


def _diagonal_blocks(n, size: int, offset: int = 0, row_scale=None):
    """(B, c // size, size - offset, size - offset): block p has the rows
    [p size + offset, (p + 1) size) and the columns [p size, p size + size - offset) of n,
    each row times its ``row_scale`` (B, c) where given."""
    c = n.shape[-1]
    blocks = jnp.stack(
        [n[:, p * size + offset : (p + 1) * size, p * size : p * size + size - offset] for p in range(c // size)],
        axis=1,
    )
    if row_scale is None:
        return blocks
    return row_scale.reshape(n.shape[0], c // size, size)[:, :, offset:, None] * blocks


def unit_lower_inverse(n, dot=None, row_scale=None):
    """(I - n)^-1 for strictly lower n (B, c, c): (B, c, c), by pairwise merges of diagonal blocks.

    ``dot(spec, a, b)``: the einsum of the merges (a precision tier's, e.g. ``precision.chained_dot``
    with the solve's tier); default exact (``Precision.HIGHEST``). The 16-row leaves' series is
    always exact (products of 16 x 16 blocks, a small share of the work). ``row_scale`` (B, c):
    the inverse of I - diag(row_scale) n instead, the same numbers as passing that product, with
    each block scaled as it is sliced (the compiler fuses the scaling into the slices' consumers
    instead of writing the scaled matrix)."""
    dot = _exact if dot is None else dot
    bsz, c, _ = n.shape
    if c <= LEAF:
        n = n if row_scale is None else row_scale[..., None] * n
        return _series(n, jnp.broadcast_to(jnp.eye(c, dtype=n.dtype), n.shape), transpose=False)
    size = LEAF
    while size < c:
        size *= 2
    n = jnp.pad(n, ((0, 0), (0, size - c), (0, size - c)))  # zero rows and columns: identity blocks
    if row_scale is not None:
        row_scale = jnp.pad(row_scale, ((0, 0), (0, size - c)))
    blocks = _diagonal_blocks(n, LEAF, row_scale=row_scale)  # (B, m, LEAF, LEAF)
    m = blocks.shape[1]
    eye = jnp.broadcast_to(jnp.eye(LEAF, dtype=n.dtype), (bsz * m, LEAF, LEAF))
    x = _series(blocks.reshape(bsz * m, LEAF, LEAF), eye, transpose=False).reshape(bsz, m, LEAF, LEAF)
    s = LEAF
    while s < size:
        m //= 2
        # rows of the lower half, cols of the upper
        n21 = _diagonal_blocks(n, 2 * s, offset=s, row_scale=row_scale).reshape(bsz * m, s, s)
        x11, x22 = (x[:, h::2].reshape(bsz * m, s, s) for h in (0, 1))
        x21 = dot("bij,bjd->bid", x22, dot("bij,bjd->bid", n21, x11))
        top = jnp.concatenate([x11, jnp.zeros_like(x11)], axis=2)
        x = jnp.concatenate([top, jnp.concatenate([x21, x22], axis=2)], axis=1).reshape(bsz, m, 2 * s, 2 * s)
        s *= 2
    return x.reshape(bsz, size, size)[:, :c, :c]
