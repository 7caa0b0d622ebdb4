"""Dense oracles: materialise the T x T matrices, exactly as the published code does.

These are the reference every faster path is tested against; they use O(B T^2) memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sessa_jax.ops.masks import block_mask, compute_dtype, masked_softmax

_HI = jax.lax.Precision.HIGHEST


def feedback_matrix(q_b, k_b, segment_ids):
    """A (B, T, T): strict-past softmax of q_b k_b^T / sqrt(D); empty rows are zero."""
    b, t, d = q_b.shape
    pos = jnp.arange(t)
    logits = jnp.einsum("btd,bsd->bts", q_b, k_b, precision=_HI) / jnp.sqrt(jnp.asarray(d, q_b.dtype))
    mask = block_mask(pos, pos, segment_ids, segment_ids, strict=True)
    probs, _ = masked_softmax(logits, mask)
    return probs


def dense_feedback_solve(q_b, k_b, gamma, f, segment_ids):
    """s = (I - diag(gamma) A)^-1 f with a dense unit-lower-triangular solve."""
    dt = compute_dtype(q_b, k_b, gamma, f)
    q_b, k_b, gamma, f32 = (x.astype(dt) for x in (q_b, k_b, gamma, f))
    a = feedback_matrix(q_b, k_b, segment_ids)
    t = f.shape[1]
    m = jnp.eye(t, dtype=dt)[None] - gamma[:, :, None] * a
    s = jax.scipy.linalg.solve_triangular(m, f32, lower=True, unit_diagonal=True)
    return s.astype(f.dtype)


def dense_causal_attention(q, k, v, segment_ids):
    """Causal (diagonal included) GQA attention: q (B,T,H,K), k/v (B,T,Hkv,K) -> (B,T,H,K)."""
    b, t, h, kd = q.shape
    hkv = k.shape[2]
    dt = compute_dtype(q, k, v)
    qg = q.astype(dt).reshape(b, t, hkv, h // hkv, kd) / jnp.sqrt(jnp.asarray(kd, dt))
    logits = jnp.einsum("bqhgk,bshk->bhgqs", qg, k.astype(dt), precision=_HI)
    pos = jnp.arange(t)
    mask = block_mask(pos, pos, segment_ids, segment_ids, strict=False)[:, None, None]
    probs, _ = masked_softmax(logits, mask)
    out = jnp.einsum("bhgqs,bshk->bqhgk", probs, v.astype(dt), precision=_HI)
    return out.reshape(b, t, h, kd).astype(v.dtype)
