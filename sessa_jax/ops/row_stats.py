"""Row statistics of the feedback softmax, computed before the solve (the pure-XLA version).

For each row t the strict-past softmax of the feedback branch has max m_t and normaliser
l_t = sum_tau exp(L[t, tau] - m_t) over the allowed keys tau < t of t's segment, with
L = scale * q k^T. Neither depends on s, so one fully parallel pass finds them and the solve
that follows is linear: A[t, tau] = exp((L[t, tau] - m_t) - logl_t). Storing (m, logl) rather
than their sum keeps the exponent's rounding at the size of L - m (KERNELS.md 3.3).

Work is exactly the causal half of the logits (1U). It is cut into the solve's own blocks:
the diagonal leaves, all at once, and per power-of-two level the off-diagonal blocks of that
size, batched together and walked in row panels, so no buffer holds two T-sized axes.
Rows with no allowed key get m = 0 and logl = EMPTY_LOGL, which makes every A entry 0.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from sessa_jax.ops.precision import plain_dot

EMPTY_LOGL = 1e30


def leaf_mask(seg, leaf: int):
    """(B, n, Cs, Cs) allowed pairs inside each diagonal leaf: key before row, same segment."""
    b, tp = seg.shape
    s = seg.reshape(b, tp // leaf, leaf)
    causal = jnp.arange(leaf)[None, :] < jnp.arange(leaf)[:, None]
    return causal[None, None] & (s[:, :, :, None] == s[:, :, None, :])


def leaf_logits(q, k, leaf: int, scale: float, tier: str):
    """(B, n, Cs, Cs) float32 logits scale * q_i k_i^T of every diagonal leaf i."""
    b, tp, d = q.shape
    qi = q.reshape(b, tp // leaf, leaf, d)
    ki = k.reshape(b, tp // leaf, leaf, d)
    return plain_dot("bnid,bnjd->bnij", qi, ki, tier) * scale


def _masked_max_sum(logits, mask):
    """Row max and sum of exp(logits - max) over ``mask``; (-inf, 0) for empty rows."""
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    m = jnp.max(jnp.where(mask, logits, neg), axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    l = jnp.sum(jnp.where(mask, jnp.exp(logits - m_safe[..., None]), 0.0), axis=-1)
    return m, l


def _merge(m1, l1, m2, l2):
    """Combines two partial (max, sum) statistics of the same rows."""
    m = jnp.maximum(m1, m2)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w1 = jnp.where(jnp.isfinite(m1), jnp.exp(m1 - m_safe), 0.0)
    w2 = jnp.where(jnp.isfinite(m2), jnp.exp(m2 - m_safe), 0.0)
    return m, l1 * w1 + l2 * w2


def _block_stats(q_rows, seg_rows, k_keys, seg_keys, scale, tier, panel: int):
    """(max, sum) of rows (..., R, D) over keys (..., K, D), all keys before all rows.

    Rows are walked in panels of ``panel`` so the logits buffer is (..., panel, K).
    """
    def stats(qr, sr):
        logits = plain_dot("...rd,...kd->...rk", qr, k_keys, tier) * scale
        return _masked_max_sum(logits, sr[..., :, None] == seg_keys[..., None, :])

    rows = q_rows.shape[-2]
    if rows <= panel:
        return stats(q_rows, seg_rows)
    full = rows // panel
    lead = q_rows.shape[:-2]
    qp = q_rows[..., : full * panel, :].reshape(*lead, full, panel, q_rows.shape[-1])
    sp = seg_rows[..., : full * panel].reshape(*lead, full, panel)
    ax = len(lead)
    m, l = lax.map(lambda xs: stats(*xs), (jnp.moveaxis(qp, ax, 0), jnp.moveaxis(sp, ax, 0)))
    m = jnp.moveaxis(m, 0, ax).reshape(*lead, full * panel)
    l = jnp.moveaxis(l, 0, ax).reshape(*lead, full * panel)
    if full * panel < rows:
        m_t, l_t = stats(q_rows[..., full * panel:, :], seg_rows[..., full * panel:])
        m = jnp.concatenate([m, m_t], axis=-1)
        l = jnp.concatenate([l, l_t], axis=-1)
    return m, l


def _level_stats(q, k, seg, width: int, scale, tier, panel: int):
    """(max, sum) (B, Tp) of every row over its level block of ``width`` keys (-inf, 0 if none).

    The blocks of one level pair keys [2m W, (2m+1) W) with rows [(2m+1) W, (2m+2) W), plus
    a clipped last block when Tp is not a multiple of 2W.
    """
    b, tp, d = q.shape
    dt = jnp.promote_types(jnp.promote_types(q.dtype, k.dtype), jnp.float32)
    pairs = tp // (2 * width)
    m_parts, l_parts = [], []
    if pairs:
        def halves(x):
            x = x[:, : 2 * pairs * width].reshape(b, pairs, 2, width, *x.shape[2:])
            return x[:, :, 0], x[:, :, 1]

        (k_keys, _), (_, q_rows) = halves(k), halves(q)
        seg_keys, seg_rows = halves(seg)
        m, l = _block_stats(q_rows, seg_rows, k_keys, seg_keys, scale, tier, panel)
        empty = jnp.full_like(m, -jnp.inf)
        m_parts.append(jnp.stack([empty, m], axis=2).reshape(b, 2 * pairs * width))
        l_parts.append(jnp.stack([jnp.zeros_like(l), l], axis=2).reshape(b, 2 * pairs * width))
    start = 2 * pairs * width
    tail_rows = tp - start - width
    if tail_rows > 0:
        keys = slice(start, start + width)
        rows = slice(start + width, tp)
        m, l = _block_stats(q[:, rows], seg[:, rows], k[:, keys], seg[:, keys], scale, tier, panel)
        m_parts += [jnp.full((b, width), -jnp.inf, dt), m]
        l_parts += [jnp.zeros((b, width), dt), l]
    elif tp > start:
        m_parts.append(jnp.full((b, tp - start), -jnp.inf, dt))
        l_parts.append(jnp.zeros((b, tp - start), dt))
    return jnp.concatenate(m_parts, axis=1), jnp.concatenate(l_parts, axis=1)


def finish_stats(m, l):
    """(m, logl) from (max, sum); rows without keys get (0, EMPTY_LOGL)."""
    has = l > 0
    return jnp.where(has, m, 0.0), jnp.where(has, jnp.log(jnp.where(has, l, 1.0)), EMPTY_LOGL)


def row_statistics(q, k, seg, *, leaf: int, scale: float, tier: str, panel: int, diag_logits=None):
    """Softmax row statistics (m, logl), each (B, Tp) float32 (float64 under x64).

    q, k: (B, Tp, D) with Tp a multiple of ``leaf``; seg: (B, Tp) int segment ids. Row t's
    allowed keys are tau < t with seg[tau] == seg[t]. ``panel`` bounds the rows of one
    logits buffer. ``diag_logits`` may pass ``leaf_logits(q, k, leaf, scale, tier)`` when
    the caller already has them.
    """
    b, tp, _ = q.shape
    if diag_logits is None:
        diag_logits = leaf_logits(q, k, leaf, scale, tier)
    m, l = _masked_max_sum(diag_logits, leaf_mask(seg, leaf))
    m, l = m.reshape(b, tp), l.reshape(b, tp)
    width = leaf
    while width < tp:
        m_w, l_w = _level_stats(q, k, seg, width, scale, tier, panel)
        m, l = _merge(m, l, m_w, l_w)
        width *= 2
    return finish_stats(m, l)
