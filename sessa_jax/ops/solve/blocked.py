"""Blocked feedback solve: a chunked scan forward and a reverse chunked adjoint backward.

Forward (left-looking blocked substitution): for query chunk i, the strict-past softmax
statistics and r_off = A_i s over the already solved chunks come from (C, C) key tiles
j < i with an online softmax; then the diagonal tile A_ii and the C x C unit-lower-triangular
system
    (I - Gamma_i A_ii) s_i = f_i + Gamma_i r_off.
Residuals: s, the row log-sum-exp and r = A s, all O(T D).

Backward: lam = (I - Gamma A)^-T ds by a reverse scan over key chunks j,
    b_j = ds_j + sum_{i > j} A_ij^T (Gamma_i lam_i),   lam_j = (I - Gamma_j A_jj)^-T b_j,
fused with the flash-attention-style logits gradient
    dL[t, tau] = A[t, tau] (g_t . s_tau - g_t . r_t),  g = Gamma lam,
giving dk_j = dL^T q and dq += dL k. Then df = lam, dgamma_t = lam_t . r_t.

Both directions visit only the causal (C, C) tiles, in loops whose trip count is the chunk
index: no causal waste, and each tile's logits stay in cache for their few elementwise
passes (on CPU those passes, not the products, set the speed).
No array with two T-sized axes is ever built: the largest transient is (B, C, C).

A second schedule, "panels" (``_panels_forward`` / ``_panels_backward``), unrolls the chunks
and gives each its whole causal prefix as one (C, i C) product with an exact softmax: fewer,
larger operations and no online rescaling, for short sequences (``dispatch.solve_schedule``);
its largest transient is (B, C, T).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from sessa_jax.ops.masks import PAD_SEGMENT, masked_softmax, merge_chunks, pad_time, prefix_mask, row_dot, take_chunk
from sessa_jax.ops.solve.trsolve import unit_lower_solve

_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BlockedPlan:
    """Static tiling of a blocked scan: chunk (and tile) size C and chunk count."""

    chunk: int
    num_chunks: int

    @classmethod
    def make(cls, length: int, chunk_size: int) -> "BlockedPlan":
        chunk = max(1, min(chunk_size, length))
        return cls(chunk, -(-length // chunk))

    @property
    def padded_len(self) -> int:
        return self.chunk * self.num_chunks


def _diag_solve(a_ii, gamma_i, rhs, *, transpose: bool):
    """Solves (I - diag(gamma_i) a_ii) x = rhs (or its transpose); a_ii strictly lower (B,C,C)."""
    return unit_lower_solve(gamma_i[:, :, None] * a_ii, rhs, transpose=transpose)


def _tile_logits(q_i, k, k0, c: int, seg, q0, diagonal: bool):
    """Logits (B, C, C) of rows q0.. against keys k0.. and their mask (None: all allowed).

    Off-diagonal tiles lie strictly in the past, so only segment ids can mask them; the
    diagonal tile keeps keys strictly before each row.
    """
    logits = jnp.einsum("bcd,bkd->bck", q_i, take_chunk(k, k0, c), precision=_HI)
    mask = jnp.arange(c)[None, None, :] < jnp.arange(c)[None, :, None] if diagonal else None
    if seg is not None:
        same = take_chunk(seg, q0, c)[:, :, None] == take_chunk(seg, k0, c)[:, None, :]
        mask = same if mask is None else mask & same
    return logits, mask


def _finite(m):
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _forward(plan: BlockedPlan, q, k, gamma, f, seg):
    """Left-looking solve by query chunk i: the softmax statistics and A s over the solved
    past come from (C, C) key tiles j < i with an online softmax (a loop of i trips: no causal
    waste, tiles small enough to stay in cache), then the diagonal tile and its solve."""
    c = plan.chunk

    def step(s_buf, i):
        q0 = i * c
        q_i, gamma_i, f_i = take_chunk(q, q0, c), take_chunk(gamma, q0, c), take_chunk(f, q0, c)

        def past_tile(j, carry):
            m, l, acc = carry
            logits, mask = _tile_logits(q_i, k, j * c, c, seg, q0, diagonal=False)
            if mask is not None:
                logits = jnp.where(mask, logits, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1, keepdims=True))
            m_safe = _finite(m_new)
            p = jnp.exp(logits - m_safe)  # masked entries: exp(-inf) = 0
            alpha = jnp.exp(m - m_safe)  # 0 while the row has seen no key (m = -inf)
            acc = alpha * acc + jnp.einsum("bck,bkd->bcd", p, take_chunk(s_buf, j * c, c), precision=_HI)
            return m_new, alpha * l + jnp.sum(p, axis=-1, keepdims=True), acc

        b = q.shape[0]
        init = (jnp.full((b, c, 1), -jnp.inf, q.dtype), jnp.zeros((b, c, 1), q.dtype), jnp.zeros_like(f_i))
        m, l, acc = lax.fori_loop(0, i, past_tile, init)
        logits, mask = _tile_logits(q_i, k, q0, c, seg, q0, diagonal=True)
        logits = jnp.where(mask, logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1, keepdims=True))
        m_safe = _finite(m_new)
        p_ii = jnp.exp(logits - m_safe)
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + jnp.sum(p_ii, axis=-1, keepdims=True)
        safe_l = jnp.where(l > 0, l, 1.0)  # rows with no past: A row and r_off are 0
        a_ii = p_ii / safe_l
        r_off = alpha * acc / safe_l
        lse = jnp.where(l > 0, m_safe + jnp.log(safe_l), 0.0)[..., 0]
        s_i = _diag_solve(a_ii, gamma_i, f_i + gamma_i[..., None] * r_off, transpose=False)
        r_i = r_off + jnp.einsum("bcs,bsd->bcd", a_ii, s_i, precision=_HI)
        return lax.dynamic_update_slice_in_dim(s_buf, s_i, q0, axis=1), (lse, r_i)

    s_buf, (lse, r) = lax.scan(step, jnp.zeros_like(f), jnp.arange(plan.num_chunks))
    return s_buf, merge_chunks(lse), merge_chunks(r)


def blocked_backward(plan: BlockedPlan, res, ds):
    """Reverse scan over key chunks j; for each, the (C, C) tiles of the later rows i > j (a
    loop of n - 1 - j trips), then the diagonal tile with the transposed diagonal solve.

    Off-diagonal tiles need only g_i of later chunks, already known: they give b_j's sum,
    dk_j, and dq_i (added into its own rows of the dq carry, in place).
    res = (q, k, gamma, seg, s, lse, r) with q already scaled by D^-1/2.
    """
    q, k, gamma, seg, s, lse, r = res
    c, n = plan.chunk, plan.num_chunks

    def step(carry, j):
        g_buf, dq = carry
        k0 = j * c
        k_j, s_j, gamma_j = take_chunk(k, k0, c), take_chunk(s, k0, c), take_chunk(gamma, k0, c)

        def probs(i, diagonal):
            q0 = i * c
            logits, mask = _tile_logits(take_chunk(q, q0, c), k, k0, c, seg, q0, diagonal)
            a = jnp.exp(logits - take_chunk(lse, q0, c)[..., None])
            return a if mask is None else jnp.where(mask, a, 0.0)

        def tile(i, state, a, g_buf, diagonal):
            b_j, dk_j, dq = state
            q0 = i * c
            q_i, g_i, r_i = take_chunk(q, q0, c), take_chunk(g_buf, q0, c), take_chunk(r, q0, c)
            g_dot_s = jnp.einsum("bcd,bkd->bck", g_i, s_j, precision=_HI)
            dlogits = a * (g_dot_s - row_dot(g_i, r_i, keepdims=True))
            dk_j = dk_j + jnp.einsum("bck,bcd->bkd", dlogits, q_i, precision=_HI)
            dq_i = take_chunk(dq, q0, c) + jnp.einsum("bck,bkd->bcd", dlogits, k_j, precision=_HI)
            dq = lax.dynamic_update_slice_in_dim(dq, dq_i, q0, axis=1)
            if not diagonal:
                b_j = b_j + jnp.einsum("bck,bcd->bkd", a, g_i, precision=_HI)
            return b_j, dk_j, dq

        def later_tile(i, state):
            return tile(i, state, probs(i, False), g_buf, False)

        b_j, dk_j, dq = lax.fori_loop(j + 1, n, later_tile, (take_chunk(ds, k0, c), jnp.zeros_like(k_j), dq))
        # Diagonal tile: a_jj from the saved statistics solves for lam_j, then its own dL.
        a_jj = probs(j, True)
        lam_j = _diag_solve(a_jj, gamma_j, b_j, transpose=True)
        g_buf = lax.dynamic_update_slice_in_dim(g_buf, gamma_j[..., None] * lam_j, k0, axis=1)
        _, dk_j, dq = tile(j, (b_j, dk_j, dq), a_jj, g_buf, True)
        return (g_buf, dq), (lam_j, dk_j)

    (_, dq), (lam, dk) = lax.scan(step, (jnp.zeros_like(s), jnp.zeros_like(q)), jnp.arange(n), reverse=True)
    lam, dk = merge_chunks(lam), merge_chunks(dk)
    dgamma = row_dot(lam, r)
    return dq, dk, dgamma, lam


def _panel(q, k, i: int, c: int, seg):
    """Logits (B, C, (i + 1) C) of chunk i's rows against all keys up to its end, and their
    mask: keys strictly before each row, in its segment (``seg`` None: causality alone)."""
    logits = jnp.einsum("bcd,bkd->bck", q[:, i * c : (i + 1) * c], k[:, : (i + 1) * c], precision=_HI)
    return logits, prefix_mask(i * c, c, seg, strict=True)


def _panels_forward(plan: BlockedPlan, q, k, gamma, f, seg):
    """Like ``_forward`` (same outputs): chunk i's rows see their whole past in one panel,
    r_off = A[rows, :iC] s[:iC] is one product, then the diagonal solve as in the loop."""
    c = plan.chunk
    s, lses, rs = jnp.zeros_like(f), [], []
    for i in range(plan.num_chunks):
        rows, past = slice(i * c, (i + 1) * c), i * c
        a, lse = masked_softmax(*_panel(q, k, i, c, seg))  # rows without keys: zeros, lse 0
        r_off = jnp.einsum("bck,bkd->bcd", a[..., :past], s[:, :past], precision=_HI)
        a_ii = a[..., past:]
        s_i = _diag_solve(a_ii, gamma[:, rows], f[:, rows] + gamma[:, rows, None] * r_off, transpose=False)
        rs.append(r_off + jnp.einsum("bcs,bsd->bcd", a_ii, s_i, precision=_HI))
        s = s.at[:, rows].set(s_i)
        lses.append(lse)
    return s, jnp.concatenate(lses, axis=1), jnp.concatenate(rs, axis=1)


def _panels_backward(plan: BlockedPlan, res, ds):
    """Like ``blocked_backward`` (same outputs), row chunks last to first: chunk i's panel rebuilt from
    the saved log-sum-exp gives lam_i (its b_i is complete: only later rows add to it), pushes
    A[rows, :iC]^T g_i into the earlier rows' b, and gives dq_i exactly and dk over its prefix."""
    q, k, gamma, seg, s, lse, r = res
    c, n = plan.chunk, plan.num_chunks
    bacc, dk, lams, dqs = jnp.zeros_like(s), jnp.zeros_like(k), [], []
    for i in reversed(range(n)):
        rows, past, end = slice(i * c, (i + 1) * c), i * c, (i + 1) * c
        logits, mask = _panel(q, k, i, c, seg)
        a = jnp.where(mask, jnp.exp(logits - lse[:, rows, None]), 0.0)
        lam_i = _diag_solve(a[..., past:], gamma[:, rows], ds[:, rows] + bacc[:, rows], transpose=True)
        g_i = gamma[:, rows, None] * lam_i
        bacc = bacc.at[:, :past].add(jnp.einsum("bck,bcd->bkd", a[..., :past], g_i, precision=_HI))
        g_dot_s = jnp.einsum("bcd,bkd->bck", g_i, s[:, :end], precision=_HI)
        dlogits = a * (g_dot_s - row_dot(g_i, r[:, rows], keepdims=True))
        dqs.append(jnp.einsum("bck,bkd->bcd", dlogits, k[:, :end], precision=_HI))
        dk = dk.at[:, :end].add(jnp.einsum("bck,bcd->bkd", dlogits, q[:, rows], precision=_HI))
        lams.append(lam_i)
    lam, dq = jnp.concatenate(lams[::-1], axis=1), jnp.concatenate(dqs[::-1], axis=1)
    return dq, dk, row_dot(lam, r), lam


SCHEDULES = {"loop": (_forward, blocked_backward), "panels": (_panels_forward, _panels_backward)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _solve(schedule, plan, q, k, gamma, f, seg):
    return SCHEDULES[schedule][0](plan, q, k, gamma, f, seg)[0]


def _solve_fwd(schedule, plan, q, k, gamma, f, seg):
    s, lse, r = SCHEDULES[schedule][0](plan, q, k, gamma, f, seg)
    return s, (q, k, gamma, seg, s, lse, r)


def _solve_bwd(schedule, plan, res, ds):
    dq, dk, dgamma, df = SCHEDULES[schedule][1](plan, res, ds)
    return dq, dk, dgamma, df, None


_solve.defvjp(_solve_fwd, _solve_bwd)


def blocked_feedback_solve(q_b, k_b, gamma, f, segment_ids, chunk_size: int, dtype, schedule: str = "loop"):
    """Blocked solve on validated inputs; q_b/k_b/f (B,T,D), gamma (B,T), segment_ids (B,T)
    ints or None (one sequence per row: tiles are masked by causality alone, which is cheaper).
    ``schedule``: "loop" (tile loops, O(C^2) transients) or "panels" (unrolled causal-prefix
    panels, O(C T) transients; for short sequences).

    Pads T to a multiple of the chunk (padded rows come after every real row, get their own
    segment and gamma = 0, so they never reach real rows), folds D^-1/2 into q and solves in
    ``dtype``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown solve schedule {schedule!r}; choose one of {tuple(SCHEDULES)}")
    b, t, d = f.shape
    plan = BlockedPlan.make(t, chunk_size)
    tp = plan.padded_len

    def pad(x):
        return pad_time(x.astype(dtype), tp)

    seg = None if segment_ids is None else pad_time(segment_ids.astype(jnp.int32), tp, PAD_SEGMENT)
    q = pad(q_b) * (1.0 / jnp.sqrt(jnp.asarray(d, dtype)))
    s = _solve(schedule, plan, q, pad(k_b), pad(gamma), pad(f), seg)
    return s[:, :t]
