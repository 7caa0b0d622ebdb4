"""Blocked causal attention (flash-attention style, pure JAX) with a custom VJP.

Each query chunk of C tokens computes its exact softmax against the keys up to its
chunk's end (a (B, Hkv, G, C, T_b) block, never T x T); the backward recomputes that block
from the saved log-sum-exp and accumulates dk, dv. Grouped-query attention is handled
by viewing q as (B, Hkv, G, T, K).

Written for the CPU, where this is the attention every method but "dense" runs
(benchmarks/vs_reference.py measures it inside the whole layer):
* everything is kept heads-major, (B, Hkv, [G,] T, K), so the batched products read keys
  and values in place instead of transposing the whole key block at every step;
* the forward leaves the probabilities unnormalised and divides the (C, K) output by the row
  sum instead of the (C, T_b) block: one elementwise pass over the logits fewer;
* without segment ids the mask is plain causality, built from positions inside the fused
  elementwise pass (no (B, C, T_b) boolean array);
* dk and dv accumulate in per-group buffers of the group's exact key length.
Every row sees at least its own key, so row maxima are always finite.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sessa_jax.ops._blocked import BlockedPlan
from sessa_jax.ops.masks import PAD_SEGMENT, pad_time

_HI = lax.Precision.HIGHEST


def _chunk(x, start, size: int, axis: int):
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _mask(start, c: int, key_len: int, seg, seg_keys):
    """(B or 1, 1, 1, C, key_len) allowed pairs of query chunk [start, start + c): causal, same segment."""
    causal = (jnp.arange(key_len)[None, :] <= (start + jnp.arange(c))[:, None])[None]
    if seg is None:
        return causal[:, None, None]
    same = _chunk(seg, start, c, 1)[:, :, None] == seg_keys[:, None, :]
    return (causal & same)[:, None, None]


def _forward(plan: BlockedPlan, q, k, v, seg):
    """q (B, Hkv, G, Tp, K), k/v (B, Hkv, Tp, K) -> out like q and per-group lse (n, B, Hkv, G, C)."""
    c = plan.chunk
    out_parts, lse_parts = [], []
    for grp in plan.groups:
        n_keys = grp.key_len
        keys, vals = k[:, :, :n_keys], v[:, :, :n_keys]
        seg_keys = None if seg is None else seg[:, :n_keys]

        def step(_, i, keys=keys, vals=vals, seg_keys=seg_keys, n_keys=n_keys):
            start = i * c
            logits = jnp.einsum("bhgck,bhsk->bhgcs", _chunk(q, start, c, 3), keys, precision=_HI)
            masked = jnp.where(_mask(start, c, n_keys, seg, seg_keys), logits, -jnp.inf)
            m = jnp.max(masked, axis=-1, keepdims=True)
            p = jnp.exp(masked - m)
            l = jnp.sum(p, axis=-1, keepdims=True)
            o = jnp.einsum("bhgcs,bhsk->bhgck", p, vals, precision=_HI) / l
            return None, (o, (m + jnp.log(l))[..., 0])

        _, (o_g, lse_g) = lax.scan(step, None, jnp.arange(grp.first, grp.stop))
        out_parts.append(_merge(o_g))
        lse_parts.append(lse_g)  # (n_g, B, Hkv, G, C): kept chunk-major for the backward
    return jnp.concatenate(out_parts, axis=3), lse_parts


def _merge(x):
    """(n, B, Hkv, G, C, K) chunk outputs -> (B, Hkv, G, n * C, K)."""
    n, b, h, g, c, kd = x.shape
    return jnp.moveaxis(x, 0, 3).reshape(b, h, g, n * c, kd)


def _backward(plan: BlockedPlan, res, d_out):
    q, k, v, seg, out, lse_parts = res
    c = plan.chunk
    delta = jnp.sum(d_out * out, axis=-1)  # rowsum(dP * P) = dO . O, (B, Hkv, G, Tp)
    dk, dv = jnp.zeros_like(k), jnp.zeros_like(v)
    dq_parts = []
    for grp, lse_g in zip(plan.groups, lse_parts):
        n_keys = grp.key_len
        keys, vals = k[:, :, :n_keys], v[:, :, :n_keys]
        seg_keys = None if seg is None else seg[:, :n_keys]

        def step(carry, xs, keys=keys, vals=vals, seg_keys=seg_keys, n_keys=n_keys):
            dk_g, dv_g = carry
            i, lse_i = xs
            start = i * c
            q_i, do_i = _chunk(q, start, c, 3), _chunk(d_out, start, c, 3)
            logits = jnp.einsum("bhgck,bhsk->bhgcs", q_i, keys, precision=_HI)
            mask = _mask(start, c, n_keys, seg, seg_keys)
            p = jnp.where(mask, jnp.exp(logits - lse_i[..., None]), 0.0)
            dp = jnp.einsum("bhgck,bhsk->bhgcs", do_i, vals, precision=_HI)
            dlogits = p * (dp - _chunk(delta, start, c, 3)[..., None])
            dq_i = jnp.einsum("bhgcs,bhsk->bhgck", dlogits, keys, precision=_HI)
            dk_g = dk_g + jnp.einsum("bhgcs,bhgck->bhsk", dlogits, q_i, precision=_HI)
            dv_g = dv_g + jnp.einsum("bhgcs,bhgck->bhsk", p, do_i, precision=_HI)
            return (dk_g, dv_g), dq_i

        zeros = jnp.zeros_like(keys)
        (dk_g, dv_g), dq_g = lax.scan(step, (zeros, zeros), (jnp.arange(grp.first, grp.stop), lse_g))
        dk = dk.at[:, :, :n_keys].add(dk_g)
        dv = dv.at[:, :, :n_keys].add(dv_g)
        dq_parts.append(_merge(dq_g))
    return jnp.concatenate(dq_parts, axis=3), dk, dv


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

    q (B, T, H, K), k/v (B, T, Hkv, K), segment_ids (B, T) ints or None (one sequence per
    row) -> (B, T, H, K) in ``dtype``.
    """
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
    out = _attend(plan, qg, kh, vh, seg)
    return out.transpose(0, 3, 1, 2, 4)[:, :t].reshape(b, t, h, kd)
