"""Single-token attention reads against a decode cache, O(L D) per step."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sessa_jax.ops.masks import compute_dtype, masked_softmax

_HI = jax.lax.Precision.HIGHEST


def attend_cached(q, k_cache, v_cache, index):
    """Forward attention of one new query over cached keys 0..index (inclusive).

    q (B, 1, H, K), k_cache/v_cache (B, L, Hkv, K) already holding the new key at
    ``index``; returns (B, 1, H, K) in v_cache.dtype.
    """
    b, _, h, kd = q.shape
    hkv = k_cache.shape[2]
    dt = compute_dtype(q, k_cache, v_cache)
    qg = q.astype(dt).reshape(b, 1, hkv, h // hkv, kd) / jnp.sqrt(jnp.asarray(kd, dt))
    logits = jnp.einsum("bqhgk,bshk->bhgqs", qg, k_cache.astype(dt), precision=_HI)
    mask = (jnp.arange(k_cache.shape[1]) <= index)[None, None, None, None, :]
    p, _ = masked_softmax(logits, mask)
    out = jnp.einsum("bhgqs,bshk->bqhgk", p, v_cache.astype(dt), precision=_HI)
    return out.reshape(b, 1, h, kd).astype(v_cache.dtype)


def feedback_read_cached(q_b, k_cache, s_cache, index):
    """sum_{tau < index} softmax(q_b . k_b[tau] / sqrt(D)) s[tau]: (B, 1, D), zero at index 0.

    q_b (B, 1, D); k_cache (B, L, D); s_cache (B, L, D) float32 solved states.
    """
    d = q_b.shape[-1]
    dt = compute_dtype(q_b, k_cache, s_cache)
    logits = jnp.einsum("bqd,bsd->bqs", q_b.astype(dt), k_cache.astype(dt), precision=_HI)
    logits = logits / jnp.sqrt(jnp.asarray(d, dt))
    mask = (jnp.arange(k_cache.shape[1]) < index)[None, None, :]
    p, _ = masked_softmax(logits, mask)
    return jnp.einsum("bqs,bsd->bqd", p, s_cache.astype(dt), precision=_HI)
