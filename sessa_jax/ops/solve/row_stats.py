"""Row statistics of the feedback softmax, computed before the solve (the pure-XLA version).

For each row t the strict-past softmax of the feedback branch has max m_t and normaliser
l_t = sum_tau exp(L[t, tau] - m_t) over the allowed keys tau < t of t's segment, with
L = scale * q k^T. Neither depends on s, so one fully parallel pass finds them and the solve
that follows is linear: A[t, tau] = exp((L[t, tau] - m_t) - logl_t). Storing (m, logl) rather
than their sum keeps the exponent's rounding at the size of L - m.

Work is exactly the causal half of the logits (1U). It is cut into the solve's own blocks
(``schedule.PushSchedule``): the diagonal leaves, all at once, then one loop over the
off-diagonal blocks in tiles, so no buffer holds two T-sized axes.
Rows with no allowed key get m = 0 and logl = EMPTY_LOGL, which makes every A entry 0.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from sessa_jax.ops.masks import take_chunk
from sessa_jax.ops.solve.precision import logits_dot
from sessa_jax.ops.solve.schedule import PushSchedule

EMPTY_LOGL = 1e30


def leaf_mask(seg, leaf: int):
    """(B, n, Cs, Cs) allowed pairs inside each diagonal leaf: key before row, same segment;
    (1, 1, Cs, Cs) causality alone when ``seg`` is None (one sequence per row)."""
    causal = jnp.arange(leaf)[None, :] < jnp.arange(leaf)[:, None]
    if seg is None:
        return causal[None, None]
    b, tp = seg.shape
    s = seg.reshape(b, tp // leaf, leaf)
    return causal[None, None] & (s[:, :, :, None] == s[:, :, None, :])


def leaf_logits(q, k, leaf: int, scale: float, tier: str, platform: str | None = None):
    """(B, n, Cs, Cs) float32 logits scale * q_i k_i^T of every diagonal leaf i."""
    b, tp, d = q.shape
    qi = q.reshape(b, tp // leaf, leaf, d)
    ki = k.reshape(b, tp // leaf, leaf, d)
    return logits_dot("bnid,bnjd->bnij", qi, ki, tier, platform) * scale


def _masked_max_sum(logits, mask):
    """Row max and sum of exp(logits - max) over ``mask``; (-inf, 0) for empty rows. ``mask``
    None: every entry is allowed (no select, so the exponential can fuse with the product)."""
    if mask is None:
        m = jnp.max(logits, axis=-1)
        return m, jnp.sum(jnp.exp(logits - m[..., None]), axis=-1)
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


def finish_stats(m, l):
    """(m, logl) from (max, sum); rows without keys get (0, EMPTY_LOGL)."""
    has = l > 0
    return jnp.where(has, m, 0.0), jnp.where(has, jnp.log(jnp.where(has, l, 1.0)), EMPTY_LOGL)


def _tile_stats(q, k, seg, scale, tier, platform):
    """tile_fn for ``PushSchedule.visit``: merges one block's (max, sum) into its rows."""

    def tile(carry, r0, rows, k0, keys):
        m, l = carry
        logits = logits_dot("brd,bkd->brk", take_chunk(q, r0, rows), take_chunk(k, k0, keys), tier, platform) * scale
        mask = None if seg is None else take_chunk(seg, r0, rows)[:, :, None] == take_chunk(seg, k0, keys)[:, None, :]
        m_b, l_b = _masked_max_sum(logits, mask)
        m_r, l_r = _merge(take_chunk(m, r0, rows), take_chunk(l, r0, rows), m_b, l_b)
        return (
            lax.dynamic_update_slice_in_dim(m, m_r, r0, axis=1),
            lax.dynamic_update_slice_in_dim(l, l_r, r0, axis=1),
        )

    return tile


def row_statistics(
    q,
    k,
    seg,
    *,
    leaf: int,
    scale: float,
    tier: str,
    schedule: PushSchedule,
    platform: str | None = None,
    diag_logits=None,
):
    """Softmax row statistics (m, logl), each (B, Tp) float32 (float64 under x64).

    q, k: (B, Tp, D) with Tp = schedule.num_leaves * leaf; seg: (B, Tp) int segment ids, or
    None for one sequence per row. Row t's allowed keys are tau < t with seg[tau] == seg[t]
    (any tau < t without ``seg``). ``tier``/``platform`` pick the logits precision
    (``sessa_jax.ops.solve.precision``). ``diag_logits`` may pass
    ``leaf_logits(q, k, leaf, scale, tier, platform)`` when the caller already has them.
    The blocks are independent; they are walked in the solve's own order and tiles (the
    schedule's static blocks, if any, after the loop).
    """
    b, tp, _ = q.shape
    if diag_logits is None:
        diag_logits = leaf_logits(q, k, leaf, scale, tier, platform)
    m, l = _masked_max_sum(diag_logits, leaf_mask(seg, leaf))
    carry = (m.reshape(b, tp), l.reshape(b, tp))
    n = schedule.num_leaves
    if n > 1:
        tile = _tile_stats(q, k, seg, scale, tier, platform)

        def step(c, xs):
            j, branch = xs
            return schedule.visit(branch, j, c, leaf, tile), None

        carry, _ = lax.scan(step, carry, (jnp.arange(1, n), jnp.asarray(schedule.branch[1:n])))

        def barrier(c):  # one static tile after the other (schedule.PushSchedule.visit_static)
            nonlocal q, k
            c, q, k = lax.optimization_barrier((c, q, k))
            return c

        def static_tile(c, *offsets):  # reads q and k as they left the last barrier
            return _tile_stats(q, k, seg, scale, tier, platform)(c, *offsets)

        for j in schedule.static_blocks:
            carry = schedule.visit_static(j, carry, leaf, static_tile, barrier)
    return finish_stats(*carry)
