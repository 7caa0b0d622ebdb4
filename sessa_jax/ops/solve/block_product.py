"""XLA twin of the block-product kernels (``block_product_tpu``): one off-diagonal block of the
recursive solve's pushes, A[R, K] s[K], whose keys all precede its rows."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from sessa_jax.ops.solve.precision import chained_dot, logits_dot


def block_probs(q_rows, seg_rows, m_rows, logl_rows, k_keys, seg_keys, *, scale: float, tier: str,
                platform: str | None = None, fuse_exp: bool = True):
    """A[R, K] = exp((q k^T * scale - m) - logl) where the segments match, else 0; (B, R, K) float32.

    q_rows (B, R, D), seg/m/logl_rows (B, R); k_keys (B, K, D), seg_keys (B, K); every key precedes
    every row. ``tier``: the logits product's precision tier (``precision.logits_dot``).
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
    if seg_rows is None:
        return jnp.exp(z)
    return jnp.where(seg_rows[:, :, None] == seg_keys[:, None, :], jnp.exp(z), 0.0)


def block_product(q_rows, seg_rows, m_rows, logl_rows, k_keys, seg_keys, s_keys, *, scale: float, tier: str,
                  logits_tier: str | None = None, platform: str | None = None, fuse_exp: bool = True):
    """A[R, K] @ s[K] (``block_probs``), (B, R, D) in s_keys' dtype; s_keys (B, K, D).

    ``tier``: the chained product's precision tier (``precision.chained_dot``); ``logits_tier``: the
    logits product's (default ``tier``). Same arguments and result as ``tpu_block_product``.
    """
    probs = block_probs(q_rows, seg_rows, m_rows, logl_rows, k_keys, seg_keys, scale=scale,
                        tier=tier if logits_tier is None else logits_tier, platform=platform, fuse_exp=fuse_exp)
    return chained_dot("bpk,bkd->bpd", probs, s_keys, tier, platform)
