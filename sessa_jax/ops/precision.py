"""Precision tiers of the recursive feedback solve (KERNELS.md section 3.3).

The solve chains products: s feeds the next push (P s forward), lambda the next transposed
push (P^T g backward), and the leaf solves multiply by the inverted diagonal blocks. Rounding in
those products compounds along the recurrence, so they get their own tier:

* ``"float32"``: exact fp32 (or float64 under x64) arithmetic, ``Precision.HIGHEST``. The CPU
  default: there every dot runs at full precision anyway.
* ``"bf16x3"``: each fp32 operand split into bf16 hi + lo, three bf16 passes (hi.hi, hi.lo,
  lo.hi) with fp32 accumulation: ``DotAlgorithmPreset.BF16_BF16_F32_X3`` on GPU (never TF32x3,
  which costs twice as much), ``Precision.HIGH`` on TPU, and an explicit split on CPU (which
  ignores dot precision, so the split is what lets the tests measure this tier there). On an
  H100 the explicit split ran faster than the preset but lost its low-order terms there
  (3e-3 instead of 5e-6, ``scripts/gpu_bf16x3_split_check.py``), so the GPU uses the preset. The GPU and TPU default: ~5e-6 relative error
  in the sharp gamma = +-0.999 stress case.
* ``"bfloat16"``: one bf16 pass (opt-in, for bf16 training only: ~1e-3 in the stress case,
  below the bf16 noise of f itself).

The logits enter an exponential, so their error is not averaged away: bf16 q, k take one
bf16 pass (the products are exact with fp32 accumulation); float32 q, k take fp32-faithful
products (six bf16 passes) in the float32 and bf16x3 tiers and one bf16 pass in the bfloat16
tier. The other products that do not chain (g s^T, dq, dk) use one bf16 pass when the solve's
inputs are bf16 and the tier's chained rule for float32 inputs (``nonchained_tier``). Accumulation is float32 (float64 under x64)
in every tier.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

TIERS = ("float32", "bf16x3", "bfloat16")
PRECISIONS = ("auto",) + TIERS
_BF16 = jnp.bfloat16


def platform_kind(platform: str | None = None) -> str:
    """"gpu", "tpu" or "cpu" for a JAX platform name (None: the default backend, at trace time)."""
    platform = jax.default_backend() if platform is None else platform
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    if platform == "tpu":
        return "tpu"
    return "cpu"


def resolve_precision(precision: str, platform: str | None = None) -> str:
    """Maps ``"auto"`` to the tier of the platform (bf16x3 on GPU/TPU, float32 on CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"feedback precision {precision!r} is not one of {PRECISIONS}; use 'auto' (bf16x3 on "
            f"GPU/TPU, float32 on CPU), 'float32', 'bf16x3' or 'bfloat16'"
        )
    if precision != "auto":
        return precision
    return "float32" if platform_kind(platform) == "cpu" else "bf16x3"


def _split(x):
    """(hi, lo) bf16 parts of x with hi + lo = x to ~2^-16 relative; lo is None when x is bf16."""
    if x.dtype == _BF16:
        return x, None
    hi = x.astype(_BF16)
    return hi, (x - hi.astype(x.dtype)).astype(_BF16)


def _bf16x3(spec: str, a, b, acc):
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    out = jnp.einsum(spec, a_hi, b_hi, preferred_element_type=acc)
    if b_lo is not None:
        out = out + jnp.einsum(spec, a_hi, b_lo, preferred_element_type=acc)
    if a_lo is not None:
        out = out + jnp.einsum(spec, a_lo, b_hi, preferred_element_type=acc)
    return out


def _wide(a, b):
    return jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)


def chained_dot(spec: str, a, b, tier: str, platform: str | None = None):
    """einsum(spec, a, b) for a product whose result feeds the recurrence; fp32 (or f64) out.

    ``tier`` is a resolved tier (see ``resolve_precision``). Float64 operands always run exact.
    """
    acc = _wide(a, b)
    if tier == "float32" or acc == jnp.float64:
        return jnp.einsum(spec, a.astype(acc), b.astype(acc), precision=lax.Precision.HIGHEST,
                          preferred_element_type=acc)
    if tier == "bfloat16":
        return jnp.einsum(spec, a.astype(_BF16), b.astype(_BF16), preferred_element_type=acc)
    if tier != "bf16x3":
        raise ValueError(f"unknown precision tier {tier!r}; choose one of {TIERS}")
    kind = platform_kind(platform)
    if kind == "gpu" and a.dtype != _BF16 and b.dtype != _BF16:
        return jnp.einsum(spec, a, b, precision=lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
                          preferred_element_type=acc)
    if kind == "tpu":
        return jnp.einsum(spec, a, b, precision=lax.Precision.HIGH, preferred_element_type=acc)
    return _bf16x3(spec, a, b, acc)


def logits_dot(spec: str, q, k, tier: str, platform: str | None = None):
    """einsum for the logits q k^T (see the module notes); fp32 (or f64) out."""
    acc = _wide(q, k)
    if acc == jnp.float64 or (q.dtype == k.dtype == _BF16) or tier == "bfloat16":
        return chained_dot(spec, q, k, "bfloat16" if tier != "float32" else tier, platform)
    if platform_kind(platform) == "gpu":
        return jnp.einsum(spec, q, k, precision=lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
                          preferred_element_type=acc)
    return jnp.einsum(spec, q.astype(acc), k.astype(acc), precision=lax.Precision.HIGHEST,
                      preferred_element_type=acc)


def nonchained_tier(tier: str, input_dtype) -> str:
    """Tier of the products that do not chain (g s^T, dq, dk): one bf16 pass when the solve's
    inputs are bf16 (their own rounding dominates), else the chained tier."""
    if tier != "float32" and jnp.dtype(input_dtype) == _BF16:
        return "bfloat16"
    return tier
