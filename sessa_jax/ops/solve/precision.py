"""Precision tiers of the recursive feedback solve's matrix products.

The products that chain along the recurrence (s feeds the next push, lambda the next transposed
push, the leaf solves multiply by the inverted diagonal blocks) take the solve's tier:

* ``"float32"``: fp32 (float64 under x64) products, ``Precision.HIGHEST``.
* ``"bf16x3"``: each fp32 operand split into bf16 hi + lo, three bf16 passes (hi.hi, hi.lo,
  lo.hi) with fp32 accumulation; an explicit split on GPU and CPU (rounded on the bits,
  ``bf16_round_bits``, so that no compiler rewrite can drop the low parts), ``Precision.HIGH``
  on TPU.
* ``"bfloat16"``: the pushes in two bf16 passes, forward P s with P split into hi + lo and s
  rounded to bf16 once (``push_dot``), backward A^T g with P rounded once and g split
  (``transposed_push_dot``), where bf16x3 takes three; the leaf products (the
  forward's leaf products Y_i rhs, which give s_i and r_i, and the backward's Y_i^T products)
  as in bf16x3 (``leaf_tier``; on a GPU the compiler's three-pass algorithm, ``leaf_dot``). The
  logits gradient dL = A * (g s^T - rowsum(g * r)) needs s and r = A s to better than bf16: with
  the leaf products in one pass dq leaves its bound where every row attends to the previous
  token (a chain inside the leaves), and with P rounded once in the pushes where one key takes a
  large share of every row (that weight's rounding is most of each row's error in r, which
  rowsum(g * r) carries into the row's dq), and with g rounded once in
  the transposed pushes where such a key takes most of every row (g varies slowly along time,
  so neighbouring rows round it alike, and the key's column sums them all).

The logits enter an exponential: bf16 q, k take one bf16 pass (exact with fp32 accumulation);
float32 q, k take fp32-faithful products in the float32 and bf16x3 tiers and one bf16 pass in the
bfloat16 tier (``logits_dot``). The products that do not chain (g s^T, dq, dk) take the chained
tier for float32 inputs; for bf16 inputs dq and dk take one bf16 pass and g s^T two
(``nonchained_tier``, ``difference_dot``). Accumulation is float32 (float64 under x64) in every
tier. "auto" resolves by platform and compute dtype (``ops.platforms.PLATFORM_PATHS``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from sessa_jax.ops.platforms import PLATFORM_PATHS, platform_kind, platform_paths
from sessa_jax.options import FEEDBACK_PRECISIONS as PRECISIONS
from sessa_jax.options import PRECISION_TIERS as TIERS

__all__ = [
    "PRECISIONS",
    "TIERS",
    "auto_precision",
    "bf16_round_bits",
    "chained_dot",
    "difference_dot",
    "difference_g",
    "leaf_dot",
    "leaf_tier",
    "logits_dot",
    "nonchained_tier",
    "platform_kind",
    "push_dot",
    "resolve_precision",
    "split_bf16",
    "transposed_push_dot",
]

_BF16 = jnp.bfloat16


# The tier "auto" gives bf16 compute on GPU/TPU (``PLATFORM_PATHS``).
BF16_AUTO_TIER = PLATFORM_PATHS["gpu"].bfloat16_tier


def auto_precision(platform: str | None = None, compute_dtype=None) -> str:
    """The tier ``"auto"`` runs on ``platform`` (a JAX platform name; None: the default backend)
    for ``compute_dtype`` (the dtype of the solve's inputs q_b, k_b and f; None: float32):
    ``PLATFORM_PATHS[platform].bfloat16_tier`` for bf16, ``float32_tier`` otherwise."""
    paths = platform_paths(platform)
    if compute_dtype is not None and jnp.dtype(compute_dtype) == _BF16:
        return paths.bfloat16_tier
    return paths.float32_tier


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


def leaf_tier(tier: str) -> str:
    """Tier of the leaf products (the forward's Y_i rhs, which gives s_i and r_i, the backward's
    Y_i^T products): bf16x3 in the bfloat16 tier too, which runs only the pushes
    in fewer passes (two each, P s forward and A^T g backward; see the module docstring)."""
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
        return jnp.einsum(
            spec, a.astype(acc), b.astype(acc), precision=lax.Precision.HIGHEST, preferred_element_type=acc
        )
    if tier == "bfloat16":
        return jnp.einsum(spec, a.astype(_BF16), b.astype(_BF16), preferred_element_type=acc)
    if tier != "bf16x3":
        raise ValueError(f"unknown precision tier {tier!r}; choose one of {TIERS}")
    if platform_kind(platform) == "tpu":
        return jnp.einsum(spec, a, b, precision=lax.Precision.HIGH, preferred_element_type=acc)
    return _bf16x3(spec, a, b, acc)


def push_dot(spec: str, p, s, tier: str, platform: str | None = None):
    """einsum(spec, p, s) for the forward's pushes P s (p: a float32 P tile, s: the keys' solution);
    fp32 (or f64) out.

    At ``"bfloat16"`` with float32 accumulation: P split into bf16 hi + lo (``split_bf16``), s
    rounded to bf16 once, two bf16 passes P_hi bf16(s) + P_lo bf16(s). With one pass of bf16(P),
    the weight of a key that takes a large share of the rows (an attention sink) carries most of
    each row's error in r = A s, which the backward's logits gradient then meets (see the module
    docstring; an unbiased rounding of P in one pass does worse, docs/performance.md). Other
    tiers: ``chained_dot``.
    """
    return _two_pass_dot(spec, p, s, tier, platform, split_left=True)


def transposed_push_dot(spec: str, p, g, tier: str, platform: str | None = None):
    """einsum(spec, p, g) for the backward's pushes A^T g (p: a P tile, g = gamma * lambda of its
    rows); fp32 (or f64) out.

    At ``"bfloat16"`` with float32 accumulation: P rounded to bf16 once, g split into bf16 hi + lo
    (``split_bf16``), two bf16 passes bf16(P)^T g_hi + bf16(P)^T g_lo. One pass of bf16(g) would
    round g, which varies slowly along time, the same way in neighbouring rows, and a key that
    takes a large share of every row sums those roundings over all of them (see the module
    docstring). Other tiers: ``chained_dot``.
    """
    return _two_pass_dot(spec, p, g, tier, platform, split_left=False)


def _two_pass_dot(spec: str, a, b, tier: str, platform: str | None, *, split_left: bool):
    """einsum(spec, a, b) with one operand split into bf16 hi + lo (``split_bf16``; a with
    ``split_left``, else b) and the other rounded to bf16 once: two bf16 passes, at ``"bfloat16"``
    with float32 accumulation; ``chained_dot`` otherwise. The pushes' product (``push_dot``,
    ``transposed_push_dot``)."""
    acc = _wide(a, b)
    if tier != "bfloat16" or acc == jnp.float64:
        return chained_dot(spec, a, b, tier, platform)
    hi, lo = split_bf16(a if split_left else b)
    rounded = (b if split_left else a).astype(_BF16)

    def dot(part):
        pair = (part, rounded) if split_left else (rounded, part)
        return jnp.einsum(spec, *pair, preferred_element_type=acc)

    out = dot(hi)
    return out if lo is None else out + dot(lo)


def leaf_dot(spec: str, a, b, tier: str, platform: str | None = None):
    """einsum(spec, a, b) for the leaf products at their tier ``tier`` (``leaf_tier`` of the solve's
    tier); fp32 (or f64) out.

    ``chained_dot``, except that bf16x3 on a GPU runs as the compiler's own three-pass algorithm
    (``lax.DotAlgorithmPreset.BF16_BF16_F32_X3``: the same products hi.hi + hi.lo + lo.hi, split
    inside the GEMM kernel), as bf16x3 on a TPU runs as ``Precision.HIGH``: the explicit split
    costs a conversion pass over each operand per product, and the leaf products run once per
    leaf. Off the accelerators (CPU) the explicit split, which the accuracy tables measure."""
    acc = _wide(a, b)
    if tier == "bf16x3" and acc == jnp.float32 and platform_kind(platform) == "gpu":
        preset = lax.DotAlgorithmPreset.BF16_BF16_F32_X3
        return jnp.einsum(spec, a.astype(acc), b.astype(acc), precision=preset, preferred_element_type=acc)
    return chained_dot(spec, a, b, tier, platform)


def logits_dot(spec: str, q, k, tier: str, platform: str | None = None):
    """einsum for the logits q k^T in ``tier`` (see the module docstring); fp32 (or f64) out."""
    acc = _wide(q, k)
    if acc == jnp.float64 or (q.dtype == k.dtype == _BF16) or tier == "bfloat16":
        return chained_dot(spec, q, k, "bfloat16" if tier != "float32" else tier, platform)
    if platform_kind(platform) == "gpu":
        return jnp.einsum(spec, q, k, precision=lax.DotAlgorithmPreset.BF16_BF16_F32_X6, preferred_element_type=acc)
    return jnp.einsum(spec, q.astype(acc), k.astype(acc), precision=lax.Precision.HIGHEST, preferred_element_type=acc)


def difference_g(g, tier: str, acc):
    """g as ``difference_dot`` multiplies it, in ``acc`` (the product's accumulation dtype): at the
    ``"bfloat16"`` tier with float32 accumulation g rounded to bf16 once, else g unchanged. The
    logits gradient's rowsum(g * r) must take this g, so that it cancels against g s^T."""
    if tier != "bfloat16" or acc == jnp.float64:
        return g.astype(acc)
    return (g.astype(jnp.float32) if g.dtype == _BF16 else bf16_round_bits(g)).astype(acc)


def difference_dot(spec: str, g, s, tier: str, platform: str | None = None):
    """einsum(spec, g, s) for g s^T in the logits gradient A * (g s^T - rowsum(g * r)), whose
    rowsum must take g as ``difference_g`` gives it; fp32 (or f64) out.

    ``tier``: the non-chained tier (``nonchained_tier``). At ``"bfloat16"`` (bf16 inputs), g is
    rounded to bf16 once and s is split into bf16 hi + lo: two bf16 passes, s to ~2^-16, so the
    small difference g_i . (s_j - r_i) keeps the accuracy of g's own rounding (a relative error of
    the row, as harmless as bf16 rounding of a flash-attention dO). Other tiers: ``chained_dot``.
    At that tier s may also come split already, as the pair ``split_bf16(s)`` (a caller that
    multiplies many tiles of one s splits it once).
    """
    if isinstance(s, tuple):
        if tier != "bfloat16" or g.dtype == jnp.float64:
            raise ValueError(
                f"s given as split_bf16 parts needs the bfloat16 tier and float32 g, got {tier!r}, {g.dtype}"
            )
        s_hi, s_lo = s
        acc = jnp.promote_types(g.dtype, jnp.float32)
    else:
        acc = _wide(g, s)
        if tier != "bfloat16" or acc == jnp.float64:
            return chained_dot(spec, g, s, tier, platform)
        s_hi, s_lo = split_bf16(s)
    g_b = difference_g(g, tier, acc).astype(_BF16)
    out = jnp.einsum(spec, g_b, s_hi, preferred_element_type=acc)
    if s_lo is not None:
        out = out + jnp.einsum(spec, g_b, s_lo, preferred_element_type=acc)
    return out


def nonchained_tier(tier: str, input_dtype) -> str:
    """Tier of the products that do not chain (g s^T, dq, dk): "bfloat16" when the solve's inputs
    are bf16 (one bf16 pass for dq and dk, two for g s^T: ``difference_dot``), else the chained tier."""
    if tier != "float32" and jnp.dtype(input_dtype) == _BF16:
        return "bfloat16"
    return tier
