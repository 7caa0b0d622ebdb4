"""The matmul-based unit-lower-triangular solve against LAPACK-style triangular_solve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sessa_jax.golden import relative_error
from sessa_jax.ops.solve.trsolve import lower_resolvent, unit_lower_solve


def _feedback_matrix(c: int, dtype):
    """N = diag(gamma) A with A row-stochastic over the strict past and |gamma| = 0.999."""
    ka, kg = jax.random.split(jax.random.PRNGKey(c), 2)
    logits = 3.0 * jax.random.normal(ka, (2, c, c), dtype)
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    a = jnp.nan_to_num(jnp.where(strict, jax.nn.softmax(jnp.where(strict, logits, -jnp.inf), -1), 0.0))
    gamma = 0.999 * jnp.sign(jax.random.normal(kg, (2, c), dtype))
    return gamma[:, :, None] * a


@pytest.mark.parametrize("c", [1, 2, 7, 16, 17, 64, 100])
@pytest.mark.parametrize("transpose", [False, True])
def test_matches_triangular_solve_x64(c, transpose):
    with jax.enable_x64(True):
        n = _feedback_matrix(c, jnp.float64)
        b = jax.random.normal(jax.random.PRNGKey(c + 1), (2, c, 5), jnp.float64)
        ref = lax.linalg.triangular_solve(
            jnp.eye(c) - n, b, left_side=True, lower=True, transpose_a=transpose, unit_diagonal=True
        )
        solve = jax.jit(unit_lower_solve, static_argnames="transpose")
        assert relative_error(solve(n, b, transpose=transpose), ref) <= 1e-12


def _resolvent_x64(a, r):
    """Y = a (I - diag(r) a)^-1 by LAPACK-style triangular_solve, float64: X = (I - diag(r) a)^-1,
    then a X."""
    eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
    x = lax.linalg.triangular_solve(eye - r[..., None] * a, eye, left_side=True, lower=True, unit_diagonal=True)
    return jnp.einsum("bij,bjk->bik", a, x, precision=lax.Precision.HIGHEST)


def _feedback_parts(c: int, dtype):
    """(A, gamma) of ``_feedback_matrix``: A row-stochastic over the strict past, |gamma| = 0.999."""
    n = _feedback_matrix(c, dtype)
    gamma = 0.999 * jnp.sign(jax.random.normal(jax.random.split(jax.random.PRNGKey(c), 2)[1], (2, c), dtype))
    return n / gamma[:, :, None], gamma


@pytest.mark.parametrize("c", [1, 5, 16, 17, 32, 100, 512])
def test_resolvent_matches_triangular_solve_x64(c):
    with jax.enable_x64(True):
        a, r = _feedback_parts(c, jnp.float64)
        y = jax.jit(lower_resolvent)(a, r)
        assert y.shape == a.shape
        assert relative_error(y, _resolvent_x64(a, r), floor=1e-30) <= 1e-12  # c = 1: Y = 0
        assert bool(jnp.all(jnp.triu(y) == 0))  # exactly strictly lower triangular
        # X = I + diag(r) Y is the inverse of I - diag(r) a
        x = jnp.eye(c) + r[..., None] * y
        assert (
            relative_error(
                jnp.einsum("bij,bjk->bik", jnp.eye(c) - r[..., None] * a, x), jnp.broadcast_to(jnp.eye(c), a.shape)
            )
            <= 1e-12
        )


@pytest.mark.parametrize("c", [5, 100, 256])
def test_resolvent_with_zero_and_mixed_row_scales_x64(c):
    """No division by the row scales: zero rows of gamma give Y's rows equal to A's (X's rows the
    identity's), and random scales in (-1, 1) match LAPACK."""
    ka, kr = jax.random.split(jax.random.PRNGKey(c + 7))
    with jax.enable_x64(True):
        a = jnp.tril(jax.random.uniform(ka, (2, c, c), jnp.float64) / c, -1)
        r = jnp.where(jnp.arange(c) % 3 == 0, 0.0, 0.999 * jnp.tanh(jax.random.normal(kr, (2, c), jnp.float64)))
        y = jax.jit(lower_resolvent)(a, r)
        assert relative_error(y, _resolvent_x64(a, r)) <= 1e-12
        assert bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("c", [1, 17, 32, 100, 512])
def test_resolvent_with_solved_base_blocks_matches_triangular_solve(c):
    """``base_solve``: the SOLVE_LEAF-row diagonal blocks by one batched triangular solve instead of
    the series, then the same merges: the exact resolvent in float64, fp32-faithful in float32."""
    with jax.enable_x64(True):
        a, r = _feedback_parts(c, jnp.float64)
        ref = _resolvent_x64(a, r)
        y = jax.jit(lambda a, r: lower_resolvent(a, r, base_solve=True))(a, r)
        assert relative_error(y, ref, floor=1e-30) <= 1e-12
        assert bool(jnp.all(jnp.triu(y) == 0))
        y32 = jax.jit(lambda a, r: lower_resolvent(a, r, base_solve=True))(a.astype(jnp.float32), r.astype(jnp.float32))
        assert relative_error(y32.astype(jnp.float64), ref, floor=1e-30) <= 1e-6


@pytest.mark.parametrize("base_solve", [False, True])
def test_resolvent_split_top_is_the_same_blocks(base_solve):
    """``split_top``: (diag, low) hold Y11 over Y22 and Y21 of the same Y, bit for bit; c not a
    power of two, or too small to split, is refused by name."""
    a, r = _feedback_parts(256, jnp.float32)
    y = jax.jit(lambda a, r: lower_resolvent(a, r, base_solve=base_solve))(a, r)
    diag, low = jax.jit(lambda a, r: lower_resolvent(a, r, base_solve=base_solve, split_top=True))(a, r)
    assert diag.shape == (2, 256, 128) and low.shape == (2, 128, 128)
    np.testing.assert_array_equal(diag, jnp.concatenate([y[:, :128, :128], y[:, 128:, 128:]], axis=1))
    np.testing.assert_array_equal(low, y[:, 128:, :128])
    assert bool(jnp.all(y[:, :128, 128:] == 0))
    for c in (96, 32 if base_solve else 16):
        a_c, r_c = _feedback_parts(c, jnp.float32)
        with pytest.raises(ValueError, match="split_top needs c a power of two"):
            lower_resolvent(a_c, r_c, base_solve=base_solve, split_top=True)


def test_resolvent_float32_is_faithful():
    a, r = _feedback_parts(256, jnp.float32)
    with jax.enable_x64(True):
        ref = _resolvent_x64(a.astype(jnp.float64), r.astype(jnp.float64))
    assert relative_error(jax.jit(lower_resolvent)(a, r), ref) <= 1e-6


def test_resolvent_merges_use_the_given_dot():
    """``dot`` runs the pairwise merges: a one-pass bf16 dot shows up as bf16-sized error, the
    bf16x3 tier's dot (``RecursivePlan.inversion``, fp32-faithful there) stays at the exact
    resolvent's."""
    from sessa_jax.ops.solve.precision import chained_dot
    from sessa_jax.ops.solve.recursive import RecursivePlan

    a, r = _feedback_parts(256, jnp.float32)
    with jax.enable_x64(True):
        ref = _resolvent_x64(a.astype(jnp.float64), r.astype(jnp.float64))
    one_pass = lambda spec, a, b: chained_dot(spec, a, b, "bfloat16")  # noqa: E731
    faithful = RecursivePlan.make(256, 256, 256, "bf16x3", "cpu", 1.0).inversion
    assert relative_error(jax.jit(lambda a, r: lower_resolvent(a, r, one_pass))(a, r), ref) >= 1e-4
    assert relative_error(jax.jit(lambda a, r: lower_resolvent(a, r, faithful))(a, r), ref) <= 1e-6


@pytest.mark.parametrize("regime", ["sharp", "previous_token"])
def test_bfloat16_tier_merges_keep_the_leaf_product_at_its_own_error(regime):
    """The bfloat16 tier merges at bf16x3 (``RecursivePlan.inversion``), not fp32-faithfully: Y_i
    then carries bf16x3-sized error, yet Y_i rhs_i at the leaf products' bf16x3 stays within 2x of
    the same product of the exact Y_i (float64, rounded to float32), on a 512-row leaf with
    gamma +-0.999 and sharp or previous-token weights (the errors are ~1e-5, against ~2e-3 that
    f's bf16 rounding gives s)."""
    from sessa_jax.ops.solve.precision import leaf_dot
    from sessa_jax.ops.solve.recursive import RecursivePlan

    c = 512
    ka, kg, kb = jax.random.split(jax.random.PRNGKey(7), 3)
    logits = (16.0 if regime == "sharp" else 1.0) * jax.random.normal(ka, (2, c, c), jnp.float32)
    if regime == "previous_token":
        logits = logits + 12.0 * jnp.eye(c, k=-1)
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    # each row also normalises over a past of c keys outside the leaf, as a leaf after the first does
    past = jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    a = jnp.where(strict, jnp.exp(logits - jnp.logaddexp(past, _masked_logsumexp(logits, strict))), 0.0)
    r = 0.999 * jnp.sign(jax.random.normal(kg, (2, c), jnp.float32))
    rhs = jax.random.normal(kb, (2, c, 64), jnp.float32)
    with jax.enable_x64(True):
        y64 = _resolvent_x64(a.astype(jnp.float64), r.astype(jnp.float64))
        ref = jnp.einsum("bij,bjd->bid", y64, rhs.astype(jnp.float64))
        exact_y = y64.astype(jnp.float32)
    plan = RecursivePlan.make(c, c, c, "bfloat16", "cpu", 1.0)
    y = jax.jit(lambda a, r: lower_resolvent(a, r, plan.inversion))(a, r)
    product = jax.jit(lambda y, b: leaf_dot("bij,bjd->bid", y, b, plan.leaf_tier, "cpu"))
    with jax.enable_x64(True):
        own = relative_error(product(exact_y, rhs).astype(jnp.float64), ref)
        got = relative_error(product(y, rhs).astype(jnp.float64), ref)
        y_error = relative_error(y.astype(jnp.float64), y64)
    assert 1e-7 < y_error <= 2e-5  # bf16x3 merges, not fp32-faithful ones (~3e-8)
    assert got <= 2 * own, (got, own)


def _masked_logsumexp(logits, mask):
    return jax.scipy.special.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
