"""Unit-lower-triangular solves built from matmuls (XLA's triangular_solve is row by row on CPU).

Solves (I - N) x = b or (I - N)^T x = b for strictly lower N (B, c, c) and b (B, c, D) by
divide and conquer on halves (the off-diagonal block becomes one matmul) down to leaves
of at most ``LEAF`` rows, where the exact nilpotent series
    (I - N)^-1 = (I + N)(I + N^2)(I + N^4) ...   (ceil(log2 c) factors)
is applied. Sessa's N = diag(gamma) A has row sums |N| <= gamma_max < 1, so no power grows.

``lower_resolvent`` forms Y = A (I - diag(r) A)^-1 itself, from which (I - diag(r) A)^-1 =
I + diag(r) Y, bottom-up: every LEAF-sized diagonal block by the series at once (or, with
``base_solve``, every SOLVE_LEAF-sized one by one batched triangular solve), then each level
merges pairs of diagonal blocks,
    [[I - N11, 0], [-N21, I - N22]]^-1 = [[X11, 0], [X22 N21 X11, X22]]   (N = diag(r) A),
with all pairs of a level in one batched product. The halves of a block do not wait for each
other, so the program is a few operations per level (log2(c / LEAF) levels) instead of a
sequential recursion over c / LEAF leaves.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

LEAF = 16
SOLVE_LEAF = 32  # the diagonal blocks of lower_resolvent(base_solve=True)
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


def lower_resolvent(a, row_scale, dot=None, base_solve: bool = False, split_top: bool = False):
    """Y = a (I - diag(row_scale) a)^-1 for strictly lower a (B, c, c) and row scales (B, c):
    (B, c, c), strictly lower, by pairwise merges of diagonal blocks.

    With X = (I - diag(r) a)^-1 = I + diag(r) Y, a unit-lower solve and the product a x of its
    solution come from one product by Y: for u = Y b, x = X b = b + r * u and a x = u; and
    X^T w = w + Y^T (r * w). No division by r, which may be 0. The merges of a level,
        Y21 = (I + Y22 diag(r2)) a21 (I + diag(r1) Y11),
    take two products, ``dot(spec, a, b)`` (a precision tier's einsum, e.g.
    ``RecursivePlan.inversion``; default exact, ``Precision.HIGHEST``), with all pairs of a level in
    one batched product; the 16-row leaves (a series, then their product by a) are always exact.
    ``base_solve``: the first level's blocks are SOLVE_LEAF rows instead, each Y_p taken exactly as
    Y_p^T = (I - diag(r_p) a_p)^-T a_p^T by one batched unit-lower triangular solve (a library call
    on a GPU, cuBLAS's batched trsm: one launch where the series and the merges below SOLVE_LEAF
    take about a dozen). Each block of a is scaled where it is sliced: no scaled copy of a is made.

    ``split_top`` (c a power of two, at least twice the first level's blocks): Y returned without
    its last concatenation, as (diag, low): diag (B, c, c / 2) holds Y's two diagonal halves, Y11
    over Y22, and low (B, c / 2, c / 2) its lower-left block Y21 (the upper-right one is zero), so
    that a consumer reading Y by blocks takes them where the merges left them instead of from a
    copy of all of Y."""
    dot = _exact if dot is None else dot
    bsz, c, _ = a.shape
    first = SOLVE_LEAF if base_solve else LEAF
    if split_top and (c & (c - 1) or c < 2 * first):
        raise ValueError(f"lower_resolvent: split_top needs c a power of two >= {2 * first}; got c={c}")
    size = c if c <= LEAF else LEAF
    while size < c:
        size *= 2
    a = jnp.pad(a, ((0, 0), (0, size - c), (0, size - c)))  # zero rows and columns: zero blocks of Y
    row_scale = jnp.pad(row_scale, ((0, 0), (0, size - c)))
    leaf = min(size, first)
    m = size // leaf
    a_blocks = _diagonal_blocks(a, leaf).reshape(bsz * m, leaf, leaf)
    eye = jnp.broadcast_to(jnp.eye(leaf, dtype=a.dtype), (bsz * m, leaf, leaf))
    n_blocks = _diagonal_blocks(a, leaf, row_scale=row_scale).reshape(bsz * m, leaf, leaf)
    if base_solve:
        y_t = lax.linalg.triangular_solve(
            eye - n_blocks,
            jnp.swapaxes(a_blocks, 1, 2),
            left_side=True,
            lower=True,
            transpose_a=True,
            unit_diagonal=True,
        )
        y = jnp.swapaxes(y_t, 1, 2).reshape(bsz, m, leaf, leaf)
    else:
        y = _mm(a_blocks, _series(n_blocks, eye, transpose=False)).reshape(bsz, m, leaf, leaf)
    s = leaf
    while s < size:
        m //= 2
        a21 = _diagonal_blocks(a, 2 * s, offset=s).reshape(bsz * m, s, s)  # rows of the lower half, cols of the upper
        r1, r2 = (row_scale.reshape(bsz * m, 2, s)[:, h] for h in (0, 1))
        y11, y22 = (y[:, h::2].reshape(bsz * m, s, s) for h in (0, 1))
        # X11 = I + diag(r1) Y11 and I + Y22 diag(r2) formed as the products' operands: one fusion
        # makes both (the same sums added to the products' results cost passes of their own)
        eye = jnp.eye(s, dtype=a.dtype)
        y21 = dot("bij,bjd->bid", eye + y22 * r2[:, None, :], dot("bij,bjd->bid", a21, eye + r1[..., None] * y11))
        if split_top and 2 * s == size:
            return y.reshape(bsz, size, s), y21
        top = jnp.concatenate([y11, jnp.zeros_like(y11)], axis=2)
        y = jnp.concatenate([top, jnp.concatenate([y21, y22], axis=2)], axis=1).reshape(bsz, m, 2 * s, 2 * s)
        s *= 2
    return y.reshape(bsz, size, size)[:, :c, :c]
