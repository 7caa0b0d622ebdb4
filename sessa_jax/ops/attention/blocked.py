"""Blocked causal attention (flash-attention style, pure JAX) with a custom VJP.

Query chunk i (C tokens) visits the (C, C) key tiles j <= i in a loop of i + 1 trips with
an online softmax (no causal waste, nothing larger than a tile per step); the backward
recomputes each tile from the saved log-sum-exp, keeps dq_i in the loop carry and adds dk,
dv into their tile's rows in place. Grouped-query attention views q as (B, Hkv, G, T, K).

Written for the CPU, where this is the attention every method but "dense" runs, and where
the elementwise passes over the logits, not the products, set the speed:
* tiles small enough to stay in cache for those passes;
* heads-major layouts, (B, Hkv, [G,] T, K), made once, so the batched products read keys and
  values in place;
* the output is normalised once per (C, K) row block, not per (C, C) probability tile;
* without segment ids only the diagonal tile is masked (by position).
The diagonal tile goes first: every row sees its own key, so row maxima are always finite.

A second schedule, "panels" (below), unrolls the query chunks and gives each its whole
causal prefix as one product: fewer, larger ops, for short sequences (``dispatch.attention_schedule``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sessa_jax.ops.masks import PAD_SEGMENT, pad_time, prefix_mask, row_dot
from sessa_jax.ops.solve.blocked import BlockedPlan

_HI = lax.Precision.HIGHEST


def _chunk(x, start, size: int, axis: int):
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _tile_mask(q0, k0, c: int, seg, diagonal: bool):
    """(B or 1, 1, 1, C, C) allowed pairs of the tile (rows q0.., keys k0..), or None when all are."""
    mask = None
    if diagonal:
        mask = (jnp.arange(c)[None, :] <= jnp.arange(c)[:, None])[None]
    if seg is not None:
        same = _chunk(seg, q0, c, 1)[:, :, None] == _chunk(seg, k0, c, 1)[:, None, :]
        mask = same if mask is None else mask & same
    return None if mask is None else mask[:, None, None]


def _logits(q_i, k, k0, c: int, seg, q0, diagonal: bool):
    """Masked logits of one (C, C) tile: (B, Hkv, G, C, C), -inf where not allowed."""
    logits = jnp.einsum("bhgck,bhsk->bhgcs", q_i, _chunk(k, k0, c, 2), precision=_HI)
    mask = _tile_mask(q0, k0, c, seg, diagonal)
    return logits if mask is None else jnp.where(mask, logits, -jnp.inf)


def _forward(plan: BlockedPlan, q, k, v, seg):
    """q (B, Hkv, G, Tp, K), k/v (B, Hkv, Tp, K) -> out like q and lse (n, B, Hkv, G, C).

    Query chunk i visits key tiles j <= i (a loop of i + 1 trips: no causal waste) with an
    online softmax; the diagonal tile goes first, so every row's running max is finite.
    """
    c = plan.chunk

    def q_step(_, i):
        q0 = i * c
        q_i = _chunk(q, q0, c, 3)
        logits = _logits(q_i, k, q0, c, seg, q0, diagonal=True)
        m = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - m)
        acc = jnp.einsum("bhgcs,bhsk->bhgck", p, _chunk(v, q0, c, 2), precision=_HI)

        def k_step(j, carry):
            m, l, acc = carry
            k0 = j * c
            logits = _logits(q_i, k, k0, c, seg, q0, diagonal=False)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1, keepdims=True))
            p = jnp.exp(logits - m_new)
            alpha = jnp.exp(m - m_new)
            acc = alpha * acc + jnp.einsum("bhgcs,bhsk->bhgck", p, _chunk(v, k0, c, 2), precision=_HI)
            return m_new, alpha * l + jnp.sum(p, axis=-1, keepdims=True), acc

        m, l, acc = lax.fori_loop(0, i, k_step, (m, jnp.sum(p, axis=-1, keepdims=True), acc))
        return None, (acc / l, (m + jnp.log(l))[..., 0])

    _, (o, lse) = lax.scan(q_step, None, jnp.arange(plan.num_chunks))
    return _merge(o), lse


def _merge(x):
    """(n, B, Hkv, G, C, K) chunk outputs -> (B, Hkv, G, n * C, K)."""
    n, b, h, g, c, kd = x.shape
    return jnp.moveaxis(x, 0, 3).reshape(b, h, g, n * c, kd)


def _backward(plan: BlockedPlan, res, d_out):
    """Per query chunk i, over key tiles j <= i: dq_i in the loop carry, dk and dv added into
    their tile's rows of full-length buffers (in place in the loop carry)."""
    q, k, v, seg, out, lse = res
    c = plan.chunk
    delta = row_dot(d_out, out)  # rowsum(dP * P) = dO . O, (B, Hkv, G, Tp)

    def q_step(carry, xs):
        i, lse_i = xs
        q0 = i * c
        q_i, do_i = _chunk(q, q0, c, 3), _chunk(d_out, q0, c, 3)
        delta_i = _chunk(delta, q0, c, 3)[..., None]

        def tile(j, carry, diagonal):
            dq_i, dk, dv = carry
            k0 = j * c
            k_j, v_j = _chunk(k, k0, c, 2), _chunk(v, k0, c, 2)
            p = jnp.exp(_logits(q_i, k, k0, c, seg, q0, diagonal) - lse_i[..., None])
            dp = jnp.einsum("bhgck,bhsk->bhgcs", do_i, v_j, precision=_HI)
            dlogits = p * (dp - delta_i)
            dq_i = dq_i + jnp.einsum("bhgcs,bhsk->bhgck", dlogits, k_j, precision=_HI)
            dk_j = _chunk(dk, k0, c, 2) + jnp.einsum("bhgcs,bhgck->bhsk", dlogits, q_i, precision=_HI)
            dv_j = _chunk(dv, k0, c, 2) + jnp.einsum("bhgcs,bhgck->bhsk", p, do_i, precision=_HI)
            return (
                dq_i,
                lax.dynamic_update_slice_in_dim(dk, dk_j, k0, axis=2),
                lax.dynamic_update_slice_in_dim(dv, dv_j, k0, axis=2),
            )

        dk, dv = carry
        state = tile(i, (jnp.zeros_like(q_i), dk, dv), diagonal=True)
        dq_i, dk, dv = lax.fori_loop(0, i, functools.partial(tile, diagonal=False), state)
        return (dk, dv), dq_i

    (dk, dv), dq = lax.scan(q_step, (jnp.zeros_like(k), jnp.zeros_like(v)), (jnp.arange(plan.num_chunks), lse))
    return _merge(dq), dk, dv


# Panel schedule: query chunk i attends to its whole causal prefix, keys [0, (i + 1) C), in
# one (C, (i + 1) C) product per head, with an exact (not online) softmax. The chunks are
# unrolled in Python (static shapes), so each panel is one large op instead of a loop of
# i + 1 small tiles, for small problems where per-tile overheads dominate. Panels hold (B, Hkv, G, C, <=T)
# logits, so callers keep it to short sequences.


def _panel(q, k, i: int, c: int, seg):
    """Logits of query chunk i against keys [0, (i + 1) C): (B, Hkv, G, C, (i + 1) C), -inf masked."""
    end = (i + 1) * c
    logits = jnp.einsum("bhgck,bhsk->bhgcs", q[:, :, :, i * c : end], k[:, :, :end], precision=_HI)
    return jnp.where(prefix_mask(i * c, c, seg, strict=False)[:, None, None], logits, -jnp.inf)


def _panels_forward(plan: BlockedPlan, q, k, v, seg):
    """Like ``_forward`` (same outputs) with one causal-prefix panel per query chunk."""
    c, outs, lses = plan.chunk, [], []
    for i in range(plan.num_chunks):
        logits = _panel(q, k, i, c, seg)
        m = jnp.max(logits, axis=-1, keepdims=True)  # finite: every row sees its own key
        p = jnp.exp(logits - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        outs.append(jnp.einsum("bhgcs,bhsk->bhgck", p, v[:, :, : (i + 1) * c], precision=_HI) / l)
        lses.append((m + jnp.log(l))[..., 0])
    return jnp.concatenate(outs, axis=3), jnp.stack(lses)


def _panels_backward(plan: BlockedPlan, res, d_out):
    """Per query chunk i: its panel's probabilities from the saved log-sum-exp give dq_i
    exactly and add into the dk, dv rows of its prefix."""
    q, k, v, seg, out, lse = res
    c = plan.chunk
    delta = row_dot(d_out, out)
    dk, dv, dqs = jnp.zeros_like(k), jnp.zeros_like(v), []
    for i in range(plan.num_chunks):
        end, rows = (i + 1) * c, slice(i * c, (i + 1) * c)
        q_i, do_i = q[:, :, :, rows], d_out[:, :, :, rows]
        p = jnp.exp(_panel(q, k, i, c, seg) - lse[i][..., None])
        dp = jnp.einsum("bhgck,bhsk->bhgcs", do_i, v[:, :, :end], precision=_HI)
        dlogits = p * (dp - delta[:, :, :, rows, None])
        dqs.append(jnp.einsum("bhgcs,bhsk->bhgck", dlogits, k[:, :, :end], precision=_HI))
        dk = dk.at[:, :, :end].add(jnp.einsum("bhgcs,bhgck->bhsk", dlogits, q_i, precision=_HI))
        dv = dv.at[:, :, :end].add(jnp.einsum("bhgcs,bhgck->bhsk", p, do_i, precision=_HI))
    return jnp.concatenate(dqs, axis=3), dk, dv


SCHEDULES = {"loop": (_forward, _backward), "panels": (_panels_forward, _panels_backward)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attend(schedule, plan, q, k, v, seg):
    return SCHEDULES[schedule][0](plan, q, k, v, seg)[0]


def _attend_fwd(schedule, plan, q, k, v, seg):
    out, lse = SCHEDULES[schedule][0](plan, q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


def _attend_bwd(schedule, plan, res, d_out):
    dq, dk, dv = SCHEDULES[schedule][1](plan, res, d_out)
    return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def blocked_causal_attention(q, k, v, segment_ids, chunk_size: int, dtype, schedule: str = "loop"):
    """Blocked causal GQA attention on validated inputs.

    q (B, T, H, K), k/v (B, T, Hkv, K), segment_ids (B, T) ints or None (one sequence per
    row) -> (B, T, H, K) in ``dtype``. ``schedule``: "loop" (tile loops, O(C^2) transients)
    or "panels" (unrolled causal-prefix panels, O(C T) transients; for short sequences).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown attention schedule {schedule!r}; choose one of {tuple(SCHEDULES)}")
    b, t, h, kd = q.shape
    hkv = k.shape[2]
    plan = BlockedPlan.make(t, chunk_size)
    tp = plan.padded_len
    scale = 1.0 / jnp.sqrt(jnp.asarray(kd, dtype))
    # Heads-major layouts, made once: (B, Hkv, G, Tp, K) and (B, Hkv, Tp, K).
    qg = pad_time(q.astype(dtype) * scale, tp).reshape(b, tp, hkv, h // hkv, kd).transpose(0, 2, 3, 1, 4)
    kh, vh = (pad_time(x.astype(dtype), tp).transpose(0, 2, 1, 3) for x in (k, v))
    # Padded keys sit after every real query, so causality alone hides them.
    seg = None if segment_ids is None else pad_time(segment_ids.astype(jnp.int32), tp, PAD_SEGMENT)
    out = _attend(schedule, plan, qg, kh, vh, seg)
    return out.transpose(0, 3, 1, 2, 4)[:, :t].reshape(b, t, h, kd)
