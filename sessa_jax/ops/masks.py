"""Masks and chunk plans shared by every attention-like op.

Masks are always built per block from position indices and segment ids (never as a
T x T array) so that blocked paths stay O(C T) in memory.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

# Segment id given to the time padding of blocked paths: no real token shares it.
PAD_SEGMENT = -(2**31)


def block_mask(q_pos, k_pos, q_seg, k_seg, *, strict: bool):
    """Boolean mask (B, Cq, Ck) of allowed (query, key) pairs.

    q_pos (Cq,), k_pos (Ck,): absolute token indices; q_seg (B, Cq), k_seg (B, Ck):
    segment ids, or both None (one sequence per row: causality alone, shape (1, Cq, Ck)).
    ``strict`` = key strictly before the query (feedback branch); otherwise the diagonal is
    included (forward causal attention). Keys must share the query's segment.
    """
    if strict:
        causal = k_pos[None, :] < q_pos[:, None]
    else:
        causal = k_pos[None, :] <= q_pos[:, None]
    if q_seg is None:
        return causal[None]
    same = q_seg[:, :, None] == k_seg[:, None, :]
    return causal[None] & same


def prefix_mask(row0: int, rows: int, seg, *, strict: bool):
    """``block_mask`` of rows [row0, row0 + rows) against every key before their end, the
    panels of the blocked paths: (B, rows, row0 + rows), or (1, ...) when ``seg`` is None."""
    end = row0 + rows
    seg_q, seg_k = (None, None) if seg is None else (seg[:, row0:end], seg[:, :end])
    return block_mask(row0 + jnp.arange(rows), jnp.arange(end), seg_q, seg_k, strict=strict)


def masked_softmax(logits, mask):
    """Row softmax over the last axis restricted to ``mask``; all-masked rows give zeros.

    Returns (probs, lse) with lse = log sum exp over the allowed entries (0 for empty
    rows, which are recognised by the mask, never by lse). Computed in logits.dtype
    (callers pass float32 or wider).
    """
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    masked = jnp.where(mask, logits, neg)
    m = jnp.max(masked, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(masked - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    safe_l = jnp.where(l > 0, l, 1.0)
    lse = jnp.where(l > 0, m + jnp.log(safe_l), 0.0)[..., 0]
    return p / safe_l, lse


def default_segment_ids(batch: int, length: int):
    """All tokens in one segment: int32 ones of shape (B, T)."""
    return jnp.ones((batch, length), jnp.int32)


def pad_time(x, padded_len: int, value=0):
    """Pads axis 1 (time) of ``x`` to ``padded_len`` with ``value``."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, padded_len - x.shape[1])
    return jnp.pad(x, widths, constant_values=value)


def compute_dtype(*arrays):
    """float32, or float64 when any input is float64 (jax_enable_x64 runs)."""
    dt = jnp.float32
    for a in arrays:
        dt = jnp.promote_types(dt, a.dtype)
    return dt


def take_chunk(x, start, size: int):
    """x[:, start:start + size] along time (axis 1) for a traced ``start``."""
    return lax.dynamic_slice_in_dim(x, start, size, axis=1)


def merge_chunks(x):
    """Stacked per-chunk scan outputs (n, B, C, ...) -> (B, n * C, ...)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def row_dot(a, b, keepdims: bool = False):
    """sum(a * b, axis=-1) as a batched dot product (a, b (..., D) -> (...) or (..., 1)).

    XLA's CPU backend runs the fused multiply-and-reduce of ``jnp.sum(a * b, -1)`` much slower
    than the same contraction written as a dot_general.
    """
    out = jnp.einsum("...d,...d->...", a, b, precision=lax.Precision.HIGHEST)
    return out[..., None] if keepdims else out
