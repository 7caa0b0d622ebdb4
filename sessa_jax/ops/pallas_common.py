"""Tile math shared by the Pallas feedback-solve kernels (GPU/Triton and TPU/Mosaic).

Everything here is jnp-level and works on values already loaded from refs, so the same
functions run inside a Triton kernel, a Mosaic kernel, and their interpret modes.

Conventions (per batch element, query chunk i of C rows, key chunk j of C columns):
  logits L_ij = scale * q_i k_j^T, mask = (tau < t) & (same segment),
  row statistics m, l, lse are (C, 1) float32 columns,
  A_ij = exp(L_ij - lse_i) on the mask, exactly 0 elsewhere (empty rows: lse = +BIG).
All accumulation is float32; `prec` is the precision of the float32-operand dots.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

F32 = jnp.float32
# Finite stand-ins for -inf / +inf: exp(MASK - m) underflows to 0 without NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
EMPTY_LSE = 0.7 * float(np.finfo(np.float32).max)


def dot(a, b, prec, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b (optionally transposed operands) with float32 accumulation."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=F32)


def logits_precision(dtype, prec):
    """bfloat16/float16 logits use the native MXU/tensor-core path; float32 uses `prec`."""
    return lax.Precision.DEFAULT if jnp.dtype(dtype).itemsize < 4 else prec


def tile_logits(q, k, scale, prec):
    """scale * q k^T in float32 (q, k in their storage dtype)."""
    return dot(q, k, logits_precision(q.dtype, prec), trans_b=True) * scale


def tile_mask(q_start, k_start, rows: int, cols: int, q_seg=None, k_seg=None):
    """(rows, cols) bool: strict causality plus segment equality (q_seg (rows,1), k_seg (1,cols))."""
    t = q_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    tau = k_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    mask = tau < t
    if q_seg is not None:
        mask = jnp.logical_and(mask, q_seg == k_seg)
    return mask


def online_update(m, l, logits, mask):
    """One flash-style online-softmax step; returns (m_new, l_new, p, alpha).

    p are the unnormalised weights relative to m_new (exactly 0 where masked) and alpha the
    factor that rescales anything accumulated relative to the old m.
    """
    masked = jnp.where(mask, logits, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(masked, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(masked - m_new), 0.0)
    l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    return m_new, l_new, p, alpha


def series_steps(chunk: int) -> int:
    """Number of doubling steps so that 2**steps >= chunk (N is nilpotent of order <= chunk)."""
    return max(0, math.ceil(math.log2(chunk))) if chunk > 1 else 0


def unit_lower_solve(n, b, prec, *, transpose: bool = False):
    """(I - N)^-1 b, or (I - N)^-T b, for strictly lower N by the log-depth product.

    (I - N)^-1 = prod_k (I + N^(2^k)); safe because every row sum of |N| is < 1.
    """
    steps = series_steps(n.shape[0])
    for step in range(steps):
        b = b + dot(n, b, prec, trans_a=transpose)
        if step + 1 < steps:
            n = dot(n, n, prec)
    return b


def fwd_offdiag_step(m, l, acc, logits, mask, s_j, prec):
    """Adds key chunk j < i to the running (m, l, acc = sum p s_j)."""
    m_new, l_new, p, alpha = online_update(m, l, logits, mask)
    return m_new, l_new, alpha * acc + dot(p, s_j, prec)


def fwd_diag_step(m, l, acc, logits, mask, gamma, f, prec):
    """Folds the diagonal logits into (m, l), then solves the diagonal chunk.

    Returns (s_i float32 (C, Dv), lse_i (C, 1)). gamma (C, 1), f (C, Dv) float32.
    """
    m, l, p, alpha = online_update(m, l, logits, mask)
    inv_l = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)  # empty rows -> 0, never NaN
    r_off = alpha * acc * inv_l
    n = gamma * (p * inv_l)
    s = unit_lower_solve(n, f + gamma * r_off, prec)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), EMPTY_LSE)
    return s, lse


def tile_probs(logits, mask, lse):
    """Final softmax weights A_ij from saved lse (exactly 0 where masked or for empty rows)."""
    return jnp.where(mask, jnp.exp(jnp.minimum(logits - lse, 0.0)), 0.0)


def lam_offdiag_step(acc, probs, g_i, prec):
    """acc += A_ij^T g_i (the adjoint solve's contribution of a later query chunk i > j)."""
    return acc + dot(probs, g_i, prec, trans_a=True)


def lam_diag_step(acc, probs, gamma_j, ds_j, prec):
    """lam_j = (I - Gamma_j A_jj)^-T (ds_j + acc)."""
    return unit_lower_solve(gamma_j * probs, ds_j + acc, prec, transpose=True)


def dlogits(probs, g_i, s_j, delta_i, prec):
    """dL_ij = A_ij * (g_i s_j^T - Delta_i), the softmax backward of dA = g s^T."""
    return probs * (dot(g_i, s_j, prec, trans_b=True) - delta_i)
