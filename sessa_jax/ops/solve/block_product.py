"""XLA twins of the block-product kernels: one off-diagonal block of the recursive solve's pushes,
A[R, K] s[K], whose keys all precede its rows (``block_product_tpu``), and the P and dL tiles of
such a block that the Mosaic GPU GEMM-with-epilogue kernels write (``block_product_gpu``). The
recursive solve's XLA path runs these functions; the kernels are tested against them.

* ``block_probs``: P = exp((scale q k^T - m) - logl) on a (rows, keys) panel, masked where the
  rows' and keys' segment ids differ (and, ``causal``, where key >= row).
* ``block_product``: P s in the push tier (``precision.push_dot``).
* ``row_delta``, ``probs_grad`` / ``block_probs_and_grad``: dL = P * (g s^T - rowsum(g * r)), the
  logits gradient of the solve, with g s^T at the non-chained tier (``precision.difference_dot``:
  g rounded once, s split hi + lo, for bf16 inputs) and rowsum(g * r) given per row.
* ``split_dot``: a bf16x3 product whose left operand comes already split into bf16 hi + lo parts
  (what a kernel that writes P as two bf16 tiles hands to XLA), or, ``round_b``, the bfloat16
  tier's two passes of those parts with the right operand rounded once.
* ``split_block_product``: ``split_dot`` on ``block_probs``, the twin of the fused forward push.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from sessa_jax.ops.solve.precision import difference_dot, difference_g, logits_dot, push_dot, split_bf16


def block_probs(
    q_rows,
    seg_rows,
    m_rows,
    logl_rows,
    k_keys,
    seg_keys,
    *,
    scale: float,
    tier: str,
    platform: str | None = None,
    fuse_exp: bool = True,
    causal: bool = False,
):
    """A[R, K] = exp((q k^T * scale - m) - logl) where the segments match, else 0; (B, R, K) float32.

    q_rows (B, R, D), seg/m/logl_rows (B, R); k_keys (B, K, D), seg_keys (B, K); every key precedes
    every row, unless ``causal``: then also 0 where key index >= row index (a diagonal panel,
    R == K; the solve's pushed blocks need no causal mask). ``tier``: the logits product's
    precision tier (``precision.logits_dot``).
    ``seg_rows`` and ``seg_keys`` None (one sequence per row): no mask at all, so that the compiler
    can fuse the exponential into the logits product (a select on segment ids stops that fusion).
    ``fuse_exp`` False keeps it out (an optimization barrier on the logits): for a product that
    splits A into bf16 hi + lo parts, where XLA's GPU compiler would otherwise write A in float32
    from the logits product and read it once per part; unfused, one pass makes both parts.
    """
    logits = logits_dot("bpd,bkd->bpk", q_rows, k_keys, tier, platform) * scale
    if seg_rows is None and not fuse_exp:
        logits = lax.optimization_barrier(logits)
    z = (logits - m_rows[..., None]) - logl_rows[..., None]
    allowed = None if seg_rows is None else seg_rows[:, :, None] == seg_keys[:, None, :]
    if causal:
        rows, keys = logits.shape[1:]
        below = lax.broadcasted_iota(jnp.int32, (rows, keys), 1) < lax.broadcasted_iota(jnp.int32, (rows, keys), 0)
        allowed = below[None] if allowed is None else allowed & below[None]
    if allowed is None:
        return jnp.exp(z)
    return jnp.where(allowed, jnp.exp(z), 0.0)


def block_product(
    q_rows,
    seg_rows,
    m_rows,
    logl_rows,
    k_keys,
    seg_keys,
    s_keys,
    *,
    scale: float,
    tier: str,
    platform: str | None = None,
    fuse_exp: bool = True,
):
    """A[R, K] @ s[K] (``block_probs``), (B, R, D) in s_keys' dtype; s_keys (B, K, D).

    ``tier``: the precision tier of the product (``precision.chained_dot``) and of the logits
    (``precision.logits_dot``). Same arguments and result as ``tpu_block_product``.
    """
    probs = block_probs(
        q_rows,
        seg_rows,
        m_rows,
        logl_rows,
        k_keys,
        seg_keys,
        scale=scale,
        tier=tier,
        platform=platform,
        fuse_exp=fuse_exp,
    )
    return push_dot("bpk,bkd->bpd", probs, s_keys, tier, platform)


def row_delta(g, r, tier: str):
    """rowsum(g * r) of the logits gradient, (..., R) from g, r (..., R, D), with g as the g s^T
    product at the non-chained ``tier`` uses it (``precision.difference_g``); float32 (float64
    under x64). It depends on the row alone, so the solve forms it once per row."""
    acc = jnp.promote_types(jnp.promote_types(g.dtype, r.dtype), jnp.float32)
    return jnp.sum(difference_g(g, tier, acc) * r.astype(acc), axis=-1)


def probs_grad(spec: str, probs, g, delta, s, tier: str, platform: str | None = None):
    """dL = P * (g s^T - delta): the logits gradient of the solve on one tile.

    ``spec``: the einsum of g s^T (e.g. "bpd,bkd->bpk"); probs: that tile of A (float32); g: the
    rows' (..., R, D) gradient; delta (..., R): ``row_delta`` of g and the rows' r = A s at
    ``tier``; s: the keys' (..., K, D) solution. g s^T runs at the non-chained ``tier``
    (``precision.difference_dot``). Returns dL, float32 (float64 under x64).
    """
    return probs * (difference_dot(spec, g, s, tier, platform) - delta[..., None])


def block_probs_and_grad(
    q_rows,
    seg_rows,
    m_rows,
    logl_rows,
    k_keys,
    seg_keys,
    g_rows,
    delta_rows,
    s_keys,
    *,
    scale: float,
    tier: str,
    plain_tier: str,
    platform: str | None = None,
):
    """(P, dL) of one pushed block of the backward, (B, R, K) each: ``block_probs`` at ``tier`` and
    ``probs_grad`` of it at ``plain_tier``. g_rows (B, R, D): the rows' g; delta_rows (B, R): their
    ``row_delta``; s_keys (B, K, D): the keys' s (float32); the other arguments as in ``block_probs``."""
    probs = block_probs(
        q_rows, seg_rows, m_rows, logl_rows, k_keys, seg_keys, scale=scale, tier=tier, platform=platform
    )
    return probs, probs_grad("bpd,bkd->bpk", probs, g_rows, delta_rows, s_keys, plain_tier, platform)


def split_dot(spec: str, a_hi, a_lo, b, *, round_b: bool = False):
    """einsum(spec, a, b) in bf16x3 for a = a_hi + a_lo given as bf16 parts (a_lo None: a is bf16)
    and float32 (or bf16) b: a_hi b_hi + a_hi b_lo + a_lo b_hi with float32 accumulation. Equals
    ``precision.chained_dot(spec, a, b, "bf16x3", "gpu")`` (the explicit split) when the parts
    are ``precision.split_bf16(a)``. ``round_b``: b rounded to bf16 once instead of split, a_hi b +
    a_lo b (the bfloat16 tier's push, ``precision.push_dot``)."""
    b_hi, b_lo = (b.astype(jnp.bfloat16), None) if round_b else split_bf16(b)
    out = jnp.einsum(spec, a_hi, b_hi, preferred_element_type=jnp.float32)
    if b_lo is not None:
        out = out + jnp.einsum(spec, a_hi, b_lo, preferred_element_type=jnp.float32)
    if a_lo is not None:
        out = out + jnp.einsum(spec, a_lo, b_hi, preferred_element_type=jnp.float32)
    return out


def split_block_product(
    q_rows, seg_rows, m_rows, logl_rows, k_keys, seg_keys, s_keys, *, scale: float, split: bool = True
):
    """A[R, K] s[K] from A's P tile, (B, R, Dv) float32: P split into bf16 hi + lo and, with
    ``split``, s too (``split_dot`` on ``block_probs``: the bf16x3 tier's push, three passes); else
    s rounded to bf16 once and two passes (the bfloat16 tier's, ``precision.push_dot``). Logits in
    one bf16 pass, exact for bf16 q and k. The XLA twin of the fused Mosaic GPU kernel
    ``block_product_gpu.gpu_block_product`` and the same products as its unfused pair
    (``gpu_block_probs`` and the product)."""
    probs = block_probs(
        q_rows, seg_rows, m_rows, logl_rows, k_keys, seg_keys, scale=scale, tier="bfloat16", platform="gpu"
    )
    hi, lo = split_bf16(probs)
    return split_dot("bpk,bkd->bpd", hi, lo, s_keys, round_b=not split)
