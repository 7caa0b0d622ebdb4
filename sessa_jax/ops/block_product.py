"""XLA twins of the recursive solve's block-product epilogues: the P tile of a block of A made
from its logits with the known row statistics, and the logits gradient dL on the same tile.

These are the functions the XLA path of the recursive solve runs (``_recursive``); the Mosaic
GPU kernels of ``block_product_gpu`` compute the same tiles in a GEMM epilogue and are tested
against them.

* ``block_probs``: P = exp((scale q k^T - m) - logl) on a (rows, keys) panel, masked where the
  rows' and keys' segment ids differ (and, ``causal``, where key >= row).
* ``probs_grad``: dL = P * (g s^T - rowsum(g * r)), the logits gradient of the solve, with g s^T
  at the non-chained tier (``precision.difference_dot``: g rounded once, s split hi + lo, for
  bf16 inputs).
* ``split_dot``: a bf16x3 product whose left operand comes already split into bf16 hi + lo parts
  (what a kernel that writes P as two bf16 tiles hands to XLA).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from sessa_jax.ops.precision import difference_dot, logits_dot, split_bf16

_BF16 = jnp.bfloat16


def block_probs(q_p, k_keys, m_p, logl_p, seg_p, seg_keys, *, scale: float, tier: str, platform: str,
                fuse_exp: bool = True, causal: bool = False):
    """A[rows, keys] of one panel from the known statistics, (B, P, K) float32 (float64 under x64).

    q_p (B, P, D) and k_keys (B, K, D): the rows' queries and the keys (float32 or bf16);
    m_p, logl_p (B, P): the rows' softmax max and log-normaliser; seg_p (B, P), seg_keys (B, K):
    segment ids, or both None (one sequence per row: no segment mask at all, so that the
    compiler can fuse the exponential into the logits product; a select on segment ids stops
    that fusion). ``causal``: also zero key index >= row index (a diagonal panel, P == K; the
    solve's pushed blocks lie below the diagonal and need no causal mask). The logits take
    ``precision.logits_dot`` at ``tier``. ``fuse_exp`` False keeps the exponential out of the
    logits product (an optimization barrier on the logits, unmasked panels only): for a product
    that splits P into bf16 hi + lo parts, where XLA's GPU compiler would otherwise write P in
    float32 from the logits product and read it once per part.
    """
    logits = logits_dot("bpd,bkd->bpk", q_p, k_keys, tier, platform) * scale
    if seg_p is None and not fuse_exp:
        logits = lax.optimization_barrier(logits)
    z = (logits - m_p[..., None]) - logl_p[..., None]
    allowed = None if seg_p is None else seg_p[:, :, None] == seg_keys[:, None, :]
    if causal:
        p, k = logits.shape[1:]
        tril = (lax.broadcasted_iota(jnp.int32, (p, k), 1) < lax.broadcasted_iota(jnp.int32, (p, k), 0))[None]
        allowed = tril if allowed is None else allowed & tril
    if allowed is None:
        return jnp.exp(z)
    return jnp.where(allowed, jnp.exp(z), 0.0)


def probs_grad(spec: str, probs, g, r, s, tier: str, platform: str):
    """dL = P * (g s^T - rowsum(g_used * r)): the logits gradient of the solve on one tile.

    ``spec``: the einsum of g s^T (e.g. "bpd,bkd->bpk"); probs: that tile of A (float32); g, r:
    the rows' (..., P, D) gradient and r = A s; s: the keys' (..., K, D) solution. g s^T runs at
    the non-chained ``tier`` (``precision.difference_dot``), and rowsum(g * r) takes g as that
    product used it. Returns dL in probs' dtype's accumulation (float32, float64 under x64).
    """
    g_used, g_dot_s = difference_dot(spec, g, s, tier, platform)
    return probs * (g_dot_s - jnp.sum(g_used * r, axis=-1, keepdims=True))


def block_probs_and_grad(q_p, k_keys, m_p, logl_p, seg_p, seg_keys, g_p, r_p, s_keys, *, scale: float, tier: str,
                         plain_tier: str, platform: str):
    """(P, dL) of one pushed panel of the backward, (B, P, K) each: ``block_probs`` at ``tier``
    and ``probs_grad`` of it at ``plain_tier``. g_p, r_p (B, P, D): the rows' g and r; s_keys
    (B, K, D): the keys' s (float32)."""
    probs = block_probs(q_p, k_keys, m_p, logl_p, seg_p, seg_keys, scale=scale, tier=tier, platform=platform)
    return probs, probs_grad("bpd,bkd->bpk", probs, g_p, r_p, s_keys, plain_tier, platform)


def split_dot(spec: str, a_hi, a_lo, b):
    """einsum(spec, a, b) in bf16x3 for a = a_hi + a_lo given as bf16 parts (a_lo None: a is bf16)
    and float32 (or bf16) b: a_hi b_hi + a_hi b_lo + a_lo b_hi with float32 accumulation. Equals
    ``precision.chained_dot(spec, a, b, "bf16x3", "gpu")`` (the explicit split) when the parts
    are ``precision.split_bf16(a)``."""
    b_hi, b_lo = split_bf16(b)
    out = jnp.einsum(spec, a_hi, b_hi, preferred_element_type=jnp.float32)
    if b_lo is not None:
        out = out + jnp.einsum(spec, a_hi, b_lo, preferred_element_type=jnp.float32)
    if a_lo is not None:
        out = out + jnp.einsum(spec, a_lo, b_hi, preferred_element_type=jnp.float32)
    return out
