"""Precision tiers of the recursive feedback solve (KERNELS.md section 3.3).

The solve chains products: s feeds the next push (P s forward), lambda the next transposed
push (P^T g backward), and the leaf solves multiply by the inverted diagonal blocks. Rounding in
those products compounds along the recurrence, so they get their own tier:

* ``"float32"``: exact fp32 (or float64 under x64) arithmetic, ``Precision.HIGHEST``. The CPU
  default: there every dot runs at full precision anyway.
* ``"bf16x3"``: each fp32 operand split into bf16 hi + lo, three bf16 passes (hi.hi, hi.lo,
  lo.hi) with fp32 accumulation: an explicit split on GPU and CPU (plain bf16 matrix products;
  CPU ignores dot precision, so the split is also what lets the tests measure this tier there),
  ``Precision.HIGH`` on TPU; never TF32x3, which costs twice as much. On an H100 the explicit
  split ran the solve 12% faster than XLA's ``DotAlgorithmPreset.BF16_BF16_F32_X3`` (34.2 vs
  38.7 ms forward + backward, B=8, T=8192, D=1024), but its first version lost the low parts
  there (3e-3 instead of 5e-6): XLA's GPU compiler rewrote ``float32(bfloat16(x))`` to ``x``
  (excess precision), so lo = x - hi became 0. The split now rounds on the bits
  (``bf16_round_bits``), which no such rewrite touches (``benchmarks/gpu_compile.py --dump``
  shows the low parts in the H100-compiled program). ``GPU_BF16X3 = "preset"`` switches the
  GPU back to XLA's preset (``scripts/gpu_bf16x3_split_check.py`` compares both on a device).
  The GPU and TPU default for float32 compute: ~5e-6 relative error in the sharp gamma = +-0.999
  stress case.
* ``"bfloat16"``: one bf16 pass for the backward's transposed pushes A^T g, the bulk of the
  backward's chained work; everything else as in bf16x3 (``solution_tier``). The forward cannot
  be leaner: the logits gradient dL = A * (g s^T - rowsum(g * r)) takes the difference of
  g_i . s_j and g_i . r_i with r = A s, a weighted mean of s, and s varies slowly along time (gamma
  near 1 makes it a running sum), so the difference is small and r must equal A s to better than
  bf16: with one-pass pushes in the forward, s stays within 2x of the error f's own bf16 rounding
  gives it, but dq reaches ~8x bf16 attention's own error when every row attends to the previous
  token (``benchmarks/solve_accuracy.py --tiers bfloat16-fwd1``). The GPU and TPU default for
  bf16 compute (``auto_precision``).

The logits enter an exponential, so their error is not averaged away: bf16 q, k take one
bf16 pass (the products are exact with fp32 accumulation); float32 q, k take fp32-faithful
products (six bf16 passes) in the float32 and bf16x3 tiers and one bf16 pass in the bfloat16
tier. The other products that do not chain (g s^T, dq, dk) use the tier's chained rule for
float32 inputs; for bf16 inputs (``nonchained_tier``) dq and dk take one bf16 pass (like a
flash-attention backward, whose dS is rounded to bf16 too) and g s^T two (``difference_dot``: g
rounded once, s split hi + lo), since one pass would leave ~2^-9 |g| |s| in the small difference
above. Accumulation is float32 (float64 under x64) in every tier.

``auto_precision`` picks the tier of ``"auto"`` by platform and compute dtype: bf16 compute on
GPU/TPU runs the leanest tier whose s and gradients stay as accurate as bf16 allows (its
gradients within 2x of bf16 causal attention's own error on the same inputs, s within 2x of the
error f's own bf16 rounding gives it); float32 compute runs bf16x3 on GPU/TPU; the CPU runs
float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

TIERS = ("float32", "bf16x3", "bfloat16")
# How a GPU runs the bf16x3 tier for two float32 operands: "split" (explicit hi/lo bf16 products,
# the default) or "preset" (XLA's DotAlgorithmPreset.BF16_BF16_F32_X3); see the module notes.
GPU_BF16X3 = "split"
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


# The tier "auto" picks for bf16 compute on GPU/TPU: the leanest whose s and gradients meet the
# bounds in ``auto_precision`` in every regime of ``benchmarks/solve_accuracy.py``.
BF16_AUTO_TIER = "bfloat16"


def auto_precision(platform: str | None = None, compute_dtype=None) -> str:
    """The tier ``"auto"`` runs: float32 on CPU; on GPU/TPU ``BF16_AUTO_TIER`` for bf16 compute
    (the leanest tier whose gradients stay within 2x of bf16 causal attention's own error and s
    within 2x of what f's own bf16 rounding does to it), bf16x3 otherwise (float32 compute).

    ``platform``: a JAX platform name (None: the default backend); ``compute_dtype``: the model's
    compute dtype, the dtype of the solve's inputs q_b, k_b and f (None: float32).
    """
    if platform_kind(platform) == "cpu":
        return "float32"
    if compute_dtype is not None and jnp.dtype(compute_dtype) == _BF16:
        return BF16_AUTO_TIER
    return "bf16x3"


def resolve_precision(precision: str, platform: str | None = None, compute_dtype=None) -> str:
    """Maps ``"auto"`` to ``auto_precision(platform, compute_dtype)``; checks the name."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"feedback precision {precision!r} is not one of {PRECISIONS}; use 'auto' (float32 on CPU; "
            f"on GPU/TPU {BF16_AUTO_TIER} for bf16 compute, bf16x3 for float32), 'float32', 'bf16x3' or 'bfloat16'"
        )
    if precision != "auto":
        return precision
    return auto_precision(platform, compute_dtype)


def solution_tier(tier: str) -> str:
    """Tier of the products that form s and r = A s (the forward's pushes and leaf solves) and of
    the backward's leaf products X_i^T: bf16x3 in the bfloat16 tier too, which only runs the
    backward's transposed pushes A^T g in one pass (see the module notes)."""
    return "bf16x3" if tier == "bfloat16" else tier


def bf16_round_bits(x):
    """float32 x rounded to bfloat16 (round to nearest, ties to even), returned as float32.

    Computed on the bits (add half an ulp of bf16, clear the low 16 bits), because XLA's GPU
    compiler, which may keep values in higher precision than asked (``xla_allow_excess_precision``,
    on by default), rewrites ``float32(bfloat16(x))`` to ``x``, which would make the low part
    x - float32(bfloat16(x)) exactly zero. Integer arithmetic has no such rewrite. Equals
    ``x.astype(bfloat16).astype(float32)`` for every finite x and for infinities.
    """
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    half = jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))
    return lax.bitcast_convert_type((bits + half) & jnp.uint32(0xFFFF0000), jnp.float32)


def split_bf16(x):
    """(hi, lo) bf16 parts of x with hi + lo = x to ~2^-16 relative; lo is None when x is bf16.

    hi is x rounded to bf16; lo = x - hi is exact in float32, then rounded to bf16."""
    if x.dtype == _BF16:
        return x, None
    x32 = x.astype(jnp.float32)
    hi = bf16_round_bits(x32)
    return hi.astype(_BF16), (x32 - hi).astype(_BF16)


def _bf16x3(spec: str, a, b, acc):
    a_hi, a_lo = split_bf16(a)
    b_hi, b_lo = split_bf16(b)
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
    if kind == "gpu" and GPU_BF16X3 == "preset" and a.dtype != _BF16 and b.dtype != _BF16:
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


def difference_dot(spec: str, g, s, tier: str, platform: str | None = None):
    """(g as used, einsum(spec, g, s)) for g s^T in the logits gradient A * (g s^T - rowsum(g * r)),
    whose caller must form rowsum(g * r) from the returned g; fp32 (or f64) out.

    ``tier``: the non-chained tier (``nonchained_tier``). At ``"bfloat16"`` (bf16 inputs), g is
    rounded to bf16 once and returned, and s is split into bf16 hi + lo: two bf16 passes, s to
    ~2^-16, so the small difference g_i . (s_j - r_i) keeps the accuracy of g's own rounding (a
    relative error of the row, as harmless as bf16 rounding of a flash-attention dO). Other tiers:
    g unchanged and ``chained_dot``.
    """
    acc = _wide(g, s)
    if tier != "bfloat16" or acc == jnp.float64:
        return g, chained_dot(spec, g, s, tier, platform)
    g_hi = g.astype(jnp.float32) if g.dtype == _BF16 else bf16_round_bits(g)
    s_hi, s_lo = split_bf16(s)
    out = jnp.einsum(spec, g_hi.astype(_BF16), s_hi, preferred_element_type=acc)
    if s_lo is not None:
        out = out + jnp.einsum(spec, g_hi.astype(_BF16), s_lo, preferred_element_type=acc)
    return g_hi.astype(acc), out


def nonchained_tier(tier: str, input_dtype) -> str:
    """Tier of the products that do not chain (g s^T, dq, dk): "bfloat16" when the solve's inputs
    are bf16 (one bf16 pass for dq and dk, two for g s^T: ``difference_dot``), else the chained tier."""
    if tier != "float32" and jnp.dtype(input_dtype) == _BF16:
        return "bfloat16"
    return tier
