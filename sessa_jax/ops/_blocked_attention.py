"""Blocked causal attention (flash-attention style, pure JAX) with a custom VJP.

Each query chunk of C tokens computes its exact softmax against the keys up to its
chunk's end (a (B, H, C, T_b) block, never T x T); the backward recomputes that block
from the saved log-sum-exp and accumulates dk, dv. Grouped-query attention is handled
by viewing q as (B, T, Hkv, G, K).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sessa_jax.ops._blocked import BlockedPlan
from sessa_jax.ops.masks import (
    PAD_SEGMENT,
    block_mask,
    masked_softmax,
    merge_chunks,
    pad_time,
    probs_from_lse,
    take_chunk,
)

_HI = lax.Precision.HIGHEST


def _group_keys(grp, k, v, seg):
    return k[:, : grp.key_len], v[:, : grp.key_len], seg[:, : grp.key_len], jnp.arange(grp.key_len)


def _forward(plan: BlockedPlan, q, k, v, seg):
    c = plan.chunk
    out_parts, lse_parts = [], []
    for grp in plan.groups:
        keys, vals, seg_keys, key_pos = _group_keys(grp, k, v, seg)

        def step(_, i, keys=keys, vals=vals, seg_keys=seg_keys, key_pos=key_pos):
            start = i * c
            logits = jnp.einsum("bchgk,bshk->bhgcs", take_chunk(q, start, c), keys, precision=_HI)
            mask = block_mask(start + jnp.arange(c), key_pos, take_chunk(seg, start, c), seg_keys, strict=False)
            p, lse = masked_softmax(logits, mask[:, None, None])
            return None, (jnp.einsum("bhgcs,bshk->bchgk", p, vals, precision=_HI), lse)

        _, (o_g, lse_g) = lax.scan(step, None, jnp.arange(grp.first, grp.stop))
        out_parts.append(merge_chunks(o_g))
        lse_parts.append(lse_g)  # (n_g, B, Hkv, G, C): kept chunk-major for the backward
    return jnp.concatenate(out_parts, axis=1), lse_parts


def _backward(plan: BlockedPlan, res, d_out):
    q, k, v, seg, out, lse_parts = res
    c = plan.chunk
    dk, dv = jnp.zeros_like(k), jnp.zeros_like(v)
    dq_parts = []
    for grp, lse_g in zip(plan.groups, lse_parts):
        keys, vals, seg_keys, key_pos = _group_keys(grp, k, v, seg)
        n_keys = grp.key_len

        def step(carry, xs, keys=keys, vals=vals, seg_keys=seg_keys, key_pos=key_pos, n_keys=n_keys):
            dk, dv = carry
            i, lse_i = xs
            start = i * c
            q_i, do_i = take_chunk(q, start, c), take_chunk(d_out, start, c)
            logits = jnp.einsum("bchgk,bshk->bhgcs", q_i, keys, precision=_HI)
            mask = block_mask(start + jnp.arange(c), key_pos, take_chunk(seg, start, c), seg_keys, strict=False)
            p = probs_from_lse(logits, lse_i, mask[:, None, None])
            dp = jnp.einsum("bchgk,bshk->bhgcs", do_i, vals, precision=_HI)
            delta = jnp.einsum("bchgk,bchgk->bhgc", do_i, take_chunk(out, start, c))
            dlogits = p * (dp - delta[..., None])
            dq_i = jnp.einsum("bhgcs,bshk->bchgk", dlogits, keys, precision=_HI)
            dk = dk.at[:, :n_keys].add(jnp.einsum("bhgcs,bchgk->bshk", dlogits, q_i, precision=_HI))
            dv = dv.at[:, :n_keys].add(jnp.einsum("bhgcs,bchgk->bshk", p, do_i, precision=_HI))
            return (dk, dv), dq_i

        (dk, dv), dq_g = lax.scan(step, (dk, dv), (jnp.arange(grp.first, grp.stop), lse_g))
        dq_parts.append(merge_chunks(dq_g))
    return jnp.concatenate(dq_parts, axis=1), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan, q, k, v, seg):
    return _forward(plan, q, k, v, seg)[0]


def _attend_fwd(plan, q, k, v, seg):
    out, lse_parts = _forward(plan, q, k, v, seg)
    return out, (q, k, v, seg, out, lse_parts)


def _attend_bwd(plan, res, d_out):
    dq, dk, dv = _backward(plan, res, d_out)
    return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def blocked_causal_attention(q, k, v, segment_ids, chunk_size: int, dtype):
    """Blocked causal GQA attention on validated inputs.

    q (B, T, H, K), k/v (B, T, Hkv, K), segment_ids (B, T) -> (B, T, H, K) in ``dtype``.
    """
    b, t, h, kd = q.shape
    hkv = k.shape[2]
    plan = BlockedPlan.make(t, chunk_size)
    tp = plan.padded_len
    scale = 1.0 / jnp.sqrt(jnp.asarray(kd, dtype))
    qg = pad_time(q.astype(dtype) * scale, tp).reshape(b, tp, hkv, h // hkv, kd)
    seg = pad_time(segment_ids.astype(jnp.int32), tp, PAD_SEGMENT)
    out = _attend(plan, qg, pad_time(k.astype(dtype), tp), pad_time(v.astype(dtype), tp), seg)
    return out[:, :t].reshape(b, t, h, kd)
