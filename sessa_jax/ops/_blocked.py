"""Blocked feedback solve: a chunked scan forward and a reverse chunked adjoint backward.

Forward (left-looking blocked substitution): for query chunk i, compute the strict-past
softmax row block A_i over the keys before chunk i's end, read the already solved
states r_off = A_i s (states of unsolved chunks are still zero in the buffer), then solve
the C x C unit-lower-triangular diagonal system
    (I - Gamma_i A_ii) s_i = f_i + Gamma_i r_off.
Residuals: s, the row log-sum-exp and r = A s, all O(T D).

Backward (SPEC section 2): lam = (I - Gamma A)^-T ds by a reverse scan over key chunks j,
    b_j = ds_j + sum_{i > j} A_ij^T (Gamma_i lam_i),   lam_j = (I - Gamma_j A_jj)^-T b_j,
fused with the flash-attention-style logits gradient for key chunk j,
    dL[t, tau] = A[t, tau] (g_t . s_tau - g_t . r_t),  g = Gamma lam,
giving dk_j = dL^T q and accumulating dq += dL k_j. Then df = lam, dgamma_t = lam_t . r_t.
No array with two T-sized axes is ever built: the largest transient is (B, C, T).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from sessa_jax.ops.trsolve import unit_lower_solve
from sessa_jax.ops.masks import (
    PAD_SEGMENT,
    ChunkGroup,
    block_mask,
    chunk_groups,
    masked_softmax,
    merge_chunks,
    pad_time,
    probs_from_lse,
    take_chunk,
)

_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BlockedPlan:
    """Static tiling of a blocked scan: chunk size C, chunk count and key-length groups."""

    chunk: int
    num_chunks: int
    groups: tuple[ChunkGroup, ...]

    @classmethod
    def make(cls, length: int, chunk_size: int, max_groups: int = 4) -> "BlockedPlan":
        chunk = max(1, min(chunk_size, length))
        n = -(-length // chunk)
        return cls(chunk, n, chunk_groups(n, chunk, max_groups))

    @property
    def padded_len(self) -> int:
        return self.chunk * self.num_chunks


def _diag_solve(a_ii, gamma_i, rhs, *, transpose: bool):
    """Solves (I - diag(gamma_i) a_ii) x = rhs (or its transpose); a_ii strictly lower (B,C,C)."""
    return unit_lower_solve(gamma_i[:, :, None] * a_ii, rhs, transpose=transpose)


def _forward(plan: BlockedPlan, q, k, gamma, f, seg):
    c = plan.chunk
    s_buf = jnp.zeros_like(f)
    lse_parts, r_parts = [], []
    for grp in plan.groups:
        keys, seg_keys = k[:, : grp.key_len], seg[:, : grp.key_len]
        key_pos = jnp.arange(grp.key_len)

        def step(s_buf, i, keys=keys, seg_keys=seg_keys, key_pos=key_pos, key_len=grp.key_len):
            start = i * c
            q_i, gamma_i, f_i = take_chunk(q, start, c), take_chunk(gamma, start, c), take_chunk(f, start, c)
            logits = jnp.einsum("bcd,bkd->bck", q_i, keys, precision=_HI)
            mask = block_mask(start + jnp.arange(c), key_pos, take_chunk(seg, start, c), seg_keys, strict=True)
            a, lse = masked_softmax(logits, mask)
            r_off = jnp.einsum("bck,bkd->bcd", a, s_buf[:, :key_len], precision=_HI)
            a_ii = lax.dynamic_slice_in_dim(a, start, c, axis=2)
            s_i = _diag_solve(a_ii, gamma_i, f_i + gamma_i[..., None] * r_off, transpose=False)
            r_i = r_off + jnp.einsum("bcs,bsd->bcd", a_ii, s_i, precision=_HI)
            return lax.dynamic_update_slice_in_dim(s_buf, s_i, start, axis=1), (lse, r_i)

        s_buf, (lse_g, r_g) = lax.scan(step, s_buf, jnp.arange(grp.first, grp.stop))
        lse_parts.append(merge_chunks(lse_g))
        r_parts.append(merge_chunks(r_g))
    return s_buf, jnp.concatenate(lse_parts, axis=1), jnp.concatenate(r_parts, axis=1)


def _backward(plan: BlockedPlan, res, ds):
    q, k, gamma, seg, s, lse, r = res
    c = plan.chunk
    g_buf = jnp.zeros_like(s)
    dq = jnp.zeros_like(q)
    lam_parts, dk_parts = [], []
    for grp in reversed(plan.groups):
        row0 = grp.first * c
        q_rows, lse_rows, seg_rows, r_rows = q[:, row0:], lse[:, row0:], seg[:, row0:], r[:, row0:]
        row_pos = row0 + jnp.arange(q_rows.shape[1])

        def step(carry, j, q_rows=q_rows, lse_rows=lse_rows, seg_rows=seg_rows, r_rows=r_rows,
                 row_pos=row_pos, row0=row0):
            g_buf, dq = carry
            start = j * c
            k_j, s_j, gamma_j = take_chunk(k, start, c), take_chunk(s, start, c), take_chunk(gamma, start, c)
            logits = jnp.einsum("brd,bcd->brc", q_rows, k_j, precision=_HI)
            mask = block_mask(row_pos, start + jnp.arange(c), seg_rows, take_chunk(seg, start, c), strict=True)
            a = probs_from_lse(logits, lse_rows, mask)
            b_j = take_chunk(ds, start, c) + jnp.einsum("brc,brd->bcd", a, g_buf[:, row0:], precision=_HI)
            a_jj = lax.dynamic_slice_in_dim(a, start - row0, c, axis=1)
            lam_j = _diag_solve(a_jj, gamma_j, b_j, transpose=True)
            g_buf = lax.dynamic_update_slice_in_dim(g_buf, gamma_j[..., None] * lam_j, start, axis=1)
            g_rows = g_buf[:, row0:]
            g_dot_s = jnp.einsum("brd,bcd->brc", g_rows, s_j, precision=_HI)
            delta = jnp.sum(g_rows * r_rows, axis=-1, keepdims=True)
            dlogits = a * (g_dot_s - delta)
            dk_j = jnp.einsum("brc,brd->bcd", dlogits, q_rows, precision=_HI)
            dq = dq.at[:, row0:].add(jnp.einsum("brc,bcd->brd", dlogits, k_j, precision=_HI))
            return (g_buf, dq), (lam_j, dk_j)

        (g_buf, dq), (lam_g, dk_g) = lax.scan(
            step, (g_buf, dq), jnp.arange(grp.first, grp.stop), reverse=True
        )
        lam_parts.insert(0, merge_chunks(lam_g))
        dk_parts.insert(0, merge_chunks(dk_g))
    lam = jnp.concatenate(lam_parts, axis=1)
    dk = jnp.concatenate(dk_parts, axis=1)
    dgamma = jnp.sum(lam * r, axis=-1)
    return dq, dk, dgamma, lam


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _solve(plan, q, k, gamma, f, seg):
    return _forward(plan, q, k, gamma, f, seg)[0]


def _solve_fwd(plan, q, k, gamma, f, seg):
    s, lse, r = _forward(plan, q, k, gamma, f, seg)
    return s, (q, k, gamma, seg, s, lse, r)


def _solve_bwd(plan, res, ds):
    dq, dk, dgamma, df = _backward(plan, res, ds)
    return dq, dk, dgamma, df, None


_solve.defvjp(_solve_fwd, _solve_bwd)


def blocked_feedback_solve(q_b, k_b, gamma, f, segment_ids, chunk_size: int, dtype):
    """Blocked solve on validated inputs; q_b/k_b/f (B,T,D), gamma/segment_ids (B,T).

    Pads T to a multiple of the chunk (padded rows get their own segment and gamma = 0,
    so they never reach real rows), folds D^-1/2 into q and solves in ``dtype``.
    """
    b, t, d = f.shape
    plan = BlockedPlan.make(t, chunk_size)
    tp = plan.padded_len

    def pad(x):
        return pad_time(x.astype(dtype), tp)

    seg = pad_time(segment_ids.astype(jnp.int32), tp, PAD_SEGMENT)
    q = pad(q_b) * (1.0 / jnp.sqrt(jnp.asarray(d, dtype)))
    s = _solve(plan, q, pad(k_b), pad(gamma), pad(f), seg)
    return s[:, :t]
