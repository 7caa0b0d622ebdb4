"""Accuracy of the recursive solve for bf16 training, against a float64 oracle and bf16 attention.

With bf16 q_b, k_b, f and cotangent (what a bf16 model feeds the solve), every tier that runs on
an accelerator must give dq, dk, dgamma and df within 2x of bf16 causal attention's own error on
the same inputs (flash-style: P and dS rounded to bf16), and s within 2x of the error that f's
own bf16 rounding gives it, in the hard regimes (``benchmarks.solve_accuracy`` builds the
inputs, the oracle and attention's errors). "auto" picks the leanest tier that does so for bf16
compute on GPU/TPU; the rule is checked here with the platform passed in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import jaxpr_work, solve_accuracy
from sessa_jax.ops import dispatch
from sessa_jax.ops.solve import precision

CASES = [(t, regime) for t in (512, 2048) for regime in solve_accuracy.REGIMES]
ACCELERATOR_TIERS = ("bf16x3", "bfloat16")


def _tiers(t: int):
    """Every tier at T=512; the accelerator tiers at T=2048 (float32 is the CPU's, and costly)."""
    return precision.TIERS if t == 512 else ACCELERATOR_TIERS


@pytest.fixture(scope="module")
def measured():
    """measured(t, regime): the errors of ``solve_accuracy.measure``, computed once per case."""
    cache = {}

    def get(t, regime):
        if (t, regime) not in cache:
            extra = (solve_accuracy.ONE_PASS_FORWARD,) if (t, regime) == (512, "prev") else ()
            cache[(t, regime)] = solve_accuracy.measure(regime, t, _tiers(t) + extra)
        return cache[(t, regime)]

    return get


def _misses(row, tier):
    """{quantity: (error, bound)} of ``tier`` in one measured case, for each bound it misses."""
    lim = solve_accuracy.bounds(row)
    return {name: (row[tier][name], lim[name]) for name in lim if not row[tier][name] <= lim[name]}


@pytest.mark.parametrize("regime", solve_accuracy.REGIMES)
def test_the_inputs_are_float32_whatever_the_x64_setting(regime):
    """Under global x64 JAX's defaults would make the inputs, and so the solve, float64, which the
    accuracy tables would then silently measure: the inputs are the same float32 arrays either way."""
    plain = solve_accuracy.regime_inputs(regime, 32, d=8)
    with jax.enable_x64(True):
        wide = solve_accuracy.regime_inputs(regime, 32, d=8)
    for a, b in zip(plain, wide):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # a float64 oracle at T = 8192: about two minutes
def test_long_hub_keeps_the_bounds_and_needs_the_two_pass_pushes():
    """At T = 8192 (16 leaves of 512) in the hub regime both accelerator tiers keep every bound;
    with the bfloat16 tier's forward pushes in one pass of bf16(P) instead of P split hi + lo,
    dq leaves its bound (docs/design.md, "Accuracy"): the rounding of the hub's weight, the same
    in every row, accumulates along the sequence."""
    row = solve_accuracy.measure("hub", 8192, ACCELERATOR_TIERS + (solve_accuracy.ONE_PASS_PUSHES,), leaf=512)
    for tier in ACCELERATOR_TIERS:
        assert _misses(row, tier) == {}, (tier, row)
    assert "dq" in _misses(row, solve_accuracy.ONE_PASS_PUSHES), row


@pytest.mark.slow  # a dense float64 oracle at T = 16384: about a minute and several GiB
def test_hub_at_16384_keeps_the_bounds():
    """At T = 16384 (16 leaves of 1024, the GPU's leaf) in the hub regime both accelerator tiers
    keep every bound; the bfloat16 tier's dk is the closest (docs/design.md, "Longer sequences")."""
    row = solve_accuracy.measure("hub", 16384, ACCELERATOR_TIERS, leaf=1024)
    for tier in ACCELERATOR_TIERS:
        assert _misses(row, tier) == {}, (tier, row)


@pytest.mark.slow  # a float64 oracle at T = 8192: about a minute
def test_sink_keeps_the_bounds_and_needs_both_two_pass_pushes():
    """An attention sink (key 0 takes about 0.9 of every row) at T = 8192, the GPU's leaf of 1024:
    both accelerator tiers keep every bound; with the bfloat16 tier's transposed pushes in one
    pass of bf16(g) df leaves its bound, and with its forward pushes in one pass of bf16(P) dq and
    dk do (docs/design.md, "Longer sequences")."""
    diagnostics = (solve_accuracy.ONE_PASS_PUSHES, solve_accuracy.ONE_PASS_PULLS)
    row = solve_accuracy.measure(solve_accuracy.SINK, 8192, ACCELERATOR_TIERS + diagnostics, leaf=1024)
    for tier in ACCELERATOR_TIERS:
        assert _misses(row, tier) == {}, (tier, row)
    assert {"dq", "dk"} <= set(_misses(row, solve_accuracy.ONE_PASS_PUSHES)), row
    assert "df" in _misses(row, solve_accuracy.ONE_PASS_PULLS), row


@pytest.mark.parametrize("t,regime", CASES)
def test_gradients_within_twice_bf16_attention(measured, t, regime):
    row = measured(t, regime)
    assert 8 <= t // row["leaf"] <= 16
    # bf16 attention's own error is at least what casting its bf16 outputs costs (~2^-9 / sqrt(3)),
    # so the bounds are bf16-sized, not loose.
    assert min(row["attention"].values()) >= 1e-3, row["attention"]
    for tier in _tiers(t):
        assert _misses(row, tier) == {}, (tier, row)


def test_auto_picks_the_leanest_tier_for_bf16():
    """bf16 compute on GPU/TPU runs the tier with the least forward + backward work (bf16-pass
    equivalents, counted from the program); the case tests above hold it, and every accelerator
    tier, to the bounds in every regime."""
    t, leaf = 512, 32
    x = jax.ShapeDtypeStruct((1, t, 64), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((1, t), jnp.float32)
    work = {
        tier: jaxpr_work.count_work(solve_accuracy.solve_fn(tier, leaf, t), x, x, g, x, x).pass_flops
        for tier in precision.TIERS
    }
    assert work["bfloat16"] < work["bf16x3"] < work["float32"], work
    assert precision.BF16_AUTO_TIER == min(work, key=work.get) and precision.BF16_AUTO_TIER in ACCELERATOR_TIERS
    for platform in ("gpu", "cuda", "tpu"):
        assert precision.auto_precision(platform, jnp.bfloat16) == precision.BF16_AUTO_TIER
        assert precision.resolve_precision("auto", platform, jnp.bfloat16) == precision.BF16_AUTO_TIER


def test_auto_rule_by_platform_and_compute_dtype():
    for platform in ("gpu", "tpu"):
        assert precision.auto_precision(platform, jnp.float32) == "bf16x3"
        assert precision.auto_precision(platform, None) == "bf16x3"
        assert precision.resolve_precision("bf16x3", platform, jnp.bfloat16) == "bf16x3"  # explicit wins
    for dtype in (jnp.bfloat16, jnp.float32, None):
        assert precision.auto_precision("cpu", dtype) == "float32"


@pytest.mark.parametrize(
    "dtypes,expected",
    [
        ((jnp.bfloat16, jnp.bfloat16, jnp.bfloat16), precision.BF16_AUTO_TIER),
        ((jnp.float32, jnp.float32, jnp.float32), "bf16x3"),
        ((jnp.bfloat16, jnp.bfloat16, jnp.float32), "bf16x3"),  # float32 f: float32 compute
    ],
)
def test_feedback_solve_resolves_auto_by_input_dtypes(monkeypatch, dtypes, expected):
    """On a GPU (platform passed through ``dispatch.platform_kind``), feedback_solve hands the
    recursive solve the tier of the inputs' compute dtype."""
    seen = {}

    def spy(q_b, k_b, gamma, f, segment_ids, **kw):
        seen.update(kw)
        return f

    monkeypatch.setattr(dispatch, "platform_kind", lambda platform=None: "gpu")
    monkeypatch.setattr(dispatch, "recursive_feedback_solve", spy)
    q, k, f = (jnp.zeros((1, 8, 4), dt) for dt in dtypes)
    dispatch.feedback_solve(q, k, jnp.zeros((1, 8)), f, method="auto")
    assert seen["tier"] == expected and seen["platform"] == "gpu"


def test_one_pass_forward_breaks_the_gradient(measured):
    """Why the bfloat16 tier keeps its leaf products at bf16x3: with them in one pass too, the
    within-leaf part of s and r = A s carries bf16 error, and dq in the previous-token regime (a
    chain that runs inside the leaves) leaves the bound while s stays within its own."""
    row = measured(512, "prev")
    lim = solve_accuracy.bounds(row)
    one_pass = row[solve_accuracy.ONE_PASS_FORWARD]
    assert one_pass["s"] <= lim["s"] and row["bfloat16"]["dq"] <= lim["dq"]
    assert one_pass["dq"] > 2 * lim["dq"], (one_pass, lim)
    np.testing.assert_array_less(row["bfloat16"]["s"], one_pass["s"])


@pytest.mark.parametrize("tier", ACCELERATOR_TIERS)
def test_tpu_kernel_path_meets_the_bounds(tier):
    """kernels="pallas" (the TPU kernels, interpret mode here) gets the same two-pass g s^T: the
    hub regime (most of its weight is in the pushed blocks, which the kernels compute), where one
    pass fails, at leaf 128 (the kernels' key block)."""
    row = solve_accuracy.measure("hub", 512, (tier,), leaf=128, kernels="pallas")
    assert _misses(row, tier) == {}, row
