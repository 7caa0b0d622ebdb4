"""Recursive known-statistics feedback solve (KERNELS.md section 3): the accelerator path.

Forward, on q, k, f (B, Tp, D) and gamma (B, Tp) with Tp = n * Cs:
  1. (m, logl) = row statistics of the strict-past softmax (one parallel logits pass).
  2. Every diagonal leaf at once: A_ii = exp((L_ii - m) - logl) masked, X_i = (I - G_i A_ii)^-1.
  3. One ``lax.scan`` over leaves i = 0 .. n-1 (the sequential spine):
         s_i = X_i (f_i + gamma_i racc_i)
         push block j = i + 1 (``fenwick.PushSchedule``): racc[R_j] += A[R_j, K_j] s[K_j],
     where the block's shape picks a ``lax.switch`` branch and A's rows are rebuilt from the
     known statistics in panels of at most ``panel`` rows: two large matrix products.
  4. r = racc + A_ii s_i for all leaves at once.
Residuals: q, k, gamma, seg, s, r (float32) and (m, logl); never A, never X.

Backward: lam = (I - Gamma A)^-T ds by the mirror scan i = n-1 .. 0,
         lam_i = X_i^T (ds_i + bacc_i),  g_i = gamma_i lam_i,
         push block j = i:  bacc[K_j] += A^T g[R_j],  and, since everything the logits
         gradient dL = A * (g s^T - rowsum(g * r)) needs is known there, dq[R_j] += dL k,
         dk[K_j] += dL^T q, on exact extents.
Then the diagonal leaves' dL at once; df = lam, dgamma = rowsum(lam * r) (never (s - f) / gamma).
No buffer has two T-sized axes: the largest is a (B, panel, Tp/2) logits panel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from sessa_jax.ops.fenwick import PushSchedule
from sessa_jax.ops.masks import PAD_SEGMENT, merge_chunks, pad_time, take_chunk
from sessa_jax.ops.precision import chained_dot, plain_dot
from sessa_jax.ops.row_stats import leaf_logits, leaf_mask, row_statistics
from sessa_jax.ops.trsolve import unit_lower_solve


@dataclasses.dataclass(frozen=True)
class RecursivePlan:
    """Static parameters: leaf size Cs, leaf count n, row panel, precision tier, platform, scale."""

    leaf: int
    num_leaves: int
    panel: int
    tier: str
    platform: str
    scale: float

    @property
    def padded_len(self) -> int:
        return self.leaf * self.num_leaves

    @property
    def schedule(self) -> PushSchedule:
        return _schedule(self.num_leaves)


@functools.lru_cache(maxsize=256)
def _schedule(num_leaves: int) -> PushSchedule:
    return PushSchedule.make(num_leaves)


def _diag_blocks(plan: RecursivePlan, q, k, seg, m, logl, diag_logits=None):
    """A_ii (B, n, Cs, Cs): the diagonal leaves of A from the known statistics."""
    b, tp = seg.shape
    if diag_logits is None:
        diag_logits = leaf_logits(q, k, plan.leaf, plan.scale, plan.tier)
    shape = (b, plan.num_leaves, plan.leaf, 1)
    z = (diag_logits - m.reshape(shape)) - logl.reshape(shape)
    return jnp.where(leaf_mask(seg, plan.leaf), jnp.exp(z), 0.0)


def _diag_inverse(plan: RecursivePlan, a_ii, gamma):
    """X_i = (I - diag(gamma_i) A_ii)^-1 for all leaves at once, (B, n, Cs, Cs), fp32-faithful."""
    b, n, c, _ = a_ii.shape
    nil = gamma.reshape(b, n, c, 1).astype(a_ii.dtype) * a_ii
    eye = jnp.broadcast_to(jnp.eye(c, dtype=a_ii.dtype), (b * n, c, c))
    return unit_lower_solve(nil.reshape(b * n, c, c), eye).reshape(b, n, c, c)


def _panels(rows: int, panel: int):
    """Static (offset, size) row panels covering ``rows``; all full panels share one size."""
    full, tail = divmod(rows, panel) if rows > panel else (1, 0)
    size = panel if rows > panel else rows
    return full, size, tail


def _for_panels(rows: int, panel: int, body, carry):
    """Runs body(carry, offset, size) over row panels: a loop over full panels, then the tail."""
    full, size, tail = _panels(rows, panel)
    if full == 1:
        carry = body(carry, 0, size)
    else:
        carry = lax.fori_loop(0, full, lambda p, c: body(c, p * size, size), carry)
    if tail:
        carry = body(carry, full * size, tail)
    return carry


def _block_probs(plan: RecursivePlan, q_p, seg_p, m_p, logl_p, k_keys, seg_keys):
    """A[rows, keys] of one block panel (B, P, K); every key precedes every row."""
    logits = plain_dot("bpd,bkd->bpk", q_p, k_keys, plan.tier, plan.platform) * plan.scale
    z = (logits - m_p[..., None]) - logl_p[..., None]
    return jnp.where(seg_p[:, :, None] == seg_keys[:, None, :], jnp.exp(z), 0.0)


def _forward(plan: RecursivePlan, q, k, gamma, f, seg):
    c, n = plan.leaf, plan.num_leaves
    diag_logits = leaf_logits(q, k, c, plan.scale, plan.tier)
    m, logl = row_statistics(q, k, seg, leaf=c, scale=plan.scale, tier=plan.tier, panel=plan.panel,
                             diag_logits=diag_logits)
    a_ii = _diag_blocks(plan, q, k, seg, m, logl, diag_logits)
    x_inv = _diag_inverse(plan, a_ii, gamma)

    def push(shape):
        rows_l, keys_l = shape

        def run(j, s_buf, racc):
            k0 = (j - keys_l) * c
            k_keys, seg_keys = take_chunk(k, k0, keys_l * c), take_chunk(seg, k0, keys_l * c)
            s_keys = take_chunk(s_buf, k0, keys_l * c)

            def body(racc, off, size):
                r0 = j * c + off
                probs = _block_probs(plan, take_chunk(q, r0, size), take_chunk(seg, r0, size),
                                     take_chunk(m, r0, size), take_chunk(logl, r0, size), k_keys, seg_keys)
                update = chained_dot("bpk,bkd->bpd", probs, s_keys, plan.tier, plan.platform)
                return lax.dynamic_update_slice_in_dim(racc, take_chunk(racc, r0, size) + update, r0, axis=1)

            return _for_panels(rows_l * c, plan.panel, body, racc)

        return run

    branches = [lambda j, s_buf, racc: racc] + [push(sh) for sh in plan.schedule.shapes]
    after = jnp.asarray(plan.schedule.branch[1:] + 1)

    def step(carry, xs):
        s_buf, racc = carry
        i, branch = xs
        start = i * c
        rhs = take_chunk(f, start, c) + take_chunk(gamma, start, c)[..., None] * take_chunk(racc, start, c)
        x_i = lax.dynamic_index_in_dim(x_inv, i, axis=1, keepdims=False)
        s_i = chained_dot("bij,bjd->bid", x_i, rhs, plan.tier, plan.platform)
        s_buf = lax.dynamic_update_slice_in_dim(s_buf, s_i, start, axis=1)
        racc = lax.switch(branch, branches, i + 1, s_buf, racc)
        return (s_buf, racc), None

    zeros = jnp.zeros_like(f)
    (s, racc), _ = lax.scan(step, (zeros, zeros), (jnp.arange(n), after))
    b, tp, d = f.shape
    s_leaves = s.reshape(b, n, c, d)
    r = racc + chained_dot("bnij,bnjd->bnid", a_ii, s_leaves, plan.tier, plan.platform).reshape(b, tp, d)
    return s, r, m, logl


def _backward(plan: RecursivePlan, res, ds):
    q, k, gamma, seg, s, r, m, logl = res
    c, n = plan.leaf, plan.num_leaves
    b, tp, d = s.shape
    a_ii = _diag_blocks(plan, q, k, seg, m, logl)
    x_inv = _diag_inverse(plan, a_ii, gamma)
    acc = s.dtype

    def push(shape):
        rows_l, keys_l = shape

        def run(j, carry):
            bacc, g_buf, dq, dk = carry
            k0, kl = (j - keys_l) * c, keys_l * c
            k_keys, seg_keys, s_keys = take_chunk(k, k0, kl), take_chunk(seg, k0, kl), take_chunk(s, k0, kl)

            def body(inner, off, size):
                b_keys, dk_keys, dq = inner
                r0 = j * c + off
                q_p, g_p = take_chunk(q, r0, size), take_chunk(g_buf, r0, size)
                probs = _block_probs(plan, q_p, take_chunk(seg, r0, size), take_chunk(m, r0, size),
                                     take_chunk(logl, r0, size), k_keys, seg_keys)
                b_keys = b_keys + chained_dot("bpk,bpd->bkd", probs, g_p, plan.tier, plan.platform)
                delta = jnp.sum(g_p * take_chunk(r, r0, size), axis=-1, keepdims=True)
                g_dot_s = plain_dot("bpd,bkd->bpk", g_p, s_keys, plan.tier, plan.platform)
                dlogits = probs * (g_dot_s - delta)
                dq_p = plain_dot("bpk,bkd->bpd", dlogits, k_keys, plan.tier, plan.platform) * plan.scale
                dq = lax.dynamic_update_slice_in_dim(dq, take_chunk(dq, r0, size) + dq_p, r0, axis=1)
                dk_keys = dk_keys + plain_dot("bpk,bpd->bkd", dlogits, q_p, plan.tier, plan.platform) * plan.scale
                return b_keys, dk_keys, dq

            zeros = jnp.zeros((b, kl, d), acc)
            b_keys, dk_keys, dq = _for_panels(rows_l * c, plan.panel, body, (zeros, zeros, dq))
            bacc = lax.dynamic_update_slice_in_dim(bacc, take_chunk(bacc, k0, kl) + b_keys, k0, axis=1)
            dk = lax.dynamic_update_slice_in_dim(dk, take_chunk(dk, k0, kl) + dk_keys, k0, axis=1)
            return bacc, g_buf, dq, dk

        return run

    branches = [lambda j, carry: carry] + [push(sh) for sh in plan.schedule.shapes]
    at = jnp.asarray(plan.schedule.branch[:-1] + 1)

    def step(carry, xs):
        bacc, g_buf, dq, dk = carry
        i, branch = xs
        start = i * c
        x_i = lax.dynamic_index_in_dim(x_inv, i, axis=1, keepdims=False)
        lam_i = chained_dot("bji,bjd->bid", x_i, take_chunk(ds, start, c) + take_chunk(bacc, start, c),
                            plan.tier, plan.platform)
        g_buf = lax.dynamic_update_slice_in_dim(g_buf, take_chunk(gamma, start, c)[..., None] * lam_i, start, axis=1)
        carry = lax.switch(branch, branches, i, (bacc, g_buf, dq, dk))
        return carry, lam_i

    zeros = jnp.zeros((b, tp, d), acc)
    (_, g_buf, dq, dk), lam = lax.scan(step, (zeros, zeros, zeros, zeros), (jnp.arange(n), at), reverse=True)
    lam = merge_chunks(lam)

    # The diagonal leaves' share of the logits gradient, all leaves at once.
    g4, s4, r4 = (x.reshape(b, n, c, d) for x in (g_buf, s, r))
    delta = jnp.sum(g4 * r4, axis=-1, keepdims=True)
    dlogits = a_ii * (plain_dot("bnid,bnjd->bnij", g4, s4, plan.tier, plan.platform) - delta)
    q4, k4 = q.reshape(b, n, c, d), k.reshape(b, n, c, d)
    dq = dq + (plain_dot("bnij,bnjd->bnid", dlogits, k4, plan.tier, plan.platform) * plan.scale).reshape(b, tp, d)
    dk = dk + (plain_dot("bnij,bnid->bnjd", dlogits, q4, plan.tier, plan.platform) * plan.scale).reshape(b, tp, d)
    dgamma = jnp.sum(lam * r, axis=-1)
    return dq, dk, dgamma, lam


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _solve(plan, q, k, gamma, f, seg):
    return _forward(plan, q, k, gamma, f, seg)[0]


def _solve_fwd(plan, q, k, gamma, f, seg):
    s, r, m, logl = _forward(plan, q, k, gamma, f, seg)
    return s, (q, k, gamma, seg, s, r, m, logl)


def _solve_bwd(plan, res, ds):
    q, k = res[0], res[1]
    dq, dk, dgamma, df = _backward(plan, res, ds.astype(res[4].dtype))
    return dq.astype(q.dtype), dk.astype(k.dtype), dgamma, df, None


_solve.defvjp(_solve_fwd, _solve_bwd)


def recursive_feedback_solve(q_b, k_b, gamma, f, segment_ids, *, leaf_size: int, panel: int, tier: str,
                             platform: str, dtype):
    """Recursive solve on validated inputs; q_b/k_b/f (B,T,D), gamma/segment_ids (B,T).

    ``dtype``: accumulation dtype (float32, or float64 under x64). q_b and k_b keep their
    dtype for the logits (bf16 products are exact with fp32 accumulation); f and gamma are
    cast to ``dtype``. T is padded to a multiple of the leaf with q = k = f = gamma = 0 and a
    padding segment (padded rows come last, so they never reach real rows). Returns s (B, T, D)
    in ``dtype``.
    """
    b, t, d = f.shape
    leaf = max(1, min(leaf_size, t))
    n = -(-t // leaf)
    kdtype = q_b.dtype if q_b.dtype == k_b.dtype == jnp.bfloat16 else dtype
    plan = RecursivePlan(leaf, n, max(1, panel), tier, platform, float(d) ** -0.5)
    tp = plan.padded_len
    seg = pad_time(segment_ids.astype(jnp.int32), tp, PAD_SEGMENT)
    s = _solve(plan, pad_time(q_b.astype(kdtype), tp), pad_time(k_b.astype(kdtype), tp),
               pad_time(gamma.astype(dtype), tp), pad_time(f.astype(dtype), tp), seg)
    return s[:, :t]
