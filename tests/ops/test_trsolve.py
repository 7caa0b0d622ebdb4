"""The matmul-based unit-lower-triangular solve against LAPACK-style triangular_solve."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from sessa_jax.golden import relative_error
from sessa_jax.ops.solve.trsolve import unit_lower_inverse, unit_lower_solve


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


@pytest.mark.parametrize("c", [1, 5, 16, 17, 32, 100, 512])
def test_inverse_matches_triangular_solve_x64(c):
    with jax.enable_x64(True):
        n = _feedback_matrix(c, jnp.float64)
        eye = jnp.broadcast_to(jnp.eye(c), n.shape)
        ref = lax.linalg.triangular_solve(eye - n, eye, left_side=True, lower=True, unit_diagonal=True)
        x = jax.jit(unit_lower_inverse)(n)
        assert x.shape == n.shape
        assert relative_error(x, ref) <= 1e-12
        assert bool(jnp.all(jnp.triu(x, 1) == 0))  # exactly lower triangular


def test_inverse_float32_is_faithful():
    n = _feedback_matrix(256, jnp.float32)
    with jax.enable_x64(True):
        n64 = n.astype(jnp.float64)
        eye = jnp.broadcast_to(jnp.eye(256), n.shape)
        ref = lax.linalg.triangular_solve(eye - n64, eye, left_side=True, lower=True, unit_diagonal=True)
    assert relative_error(jax.jit(unit_lower_inverse)(n), ref) <= 1e-6


def test_inverse_merges_use_the_given_dot():
    """``dot`` runs the pairwise merges: a one-pass bf16 dot shows up as bf16-sized error, the
    solve's fp32-faithful dot (``RecursivePlan.faithful``) stays at the exact inverse's."""
    from sessa_jax.ops.solve.precision import chained_dot
    from sessa_jax.ops.solve.recursive import RecursivePlan

    n = _feedback_matrix(256, jnp.float32)
    with jax.enable_x64(True):
        n64 = n.astype(jnp.float64)
        eye = jnp.broadcast_to(jnp.eye(256), n.shape)
        ref = lax.linalg.triangular_solve(eye - n64, eye, left_side=True, lower=True, unit_diagonal=True)
    one_pass = lambda spec, a, b: chained_dot(spec, a, b, "bfloat16")  # noqa: E731
    faithful = RecursivePlan.make(256, 256, 256, "bf16x3", "cpu", 1.0).faithful
    assert relative_error(jax.jit(lambda n: unit_lower_inverse(n, one_pass))(n), ref) >= 1e-4
    assert relative_error(jax.jit(lambda n: unit_lower_inverse(n, faithful))(n), ref) <= 1e-6


@pytest.mark.parametrize("c", [5, 16, 17, 100, 256])
def test_inverse_row_scale_is_the_scaled_matrix(c):
    """``row_scale`` r gives (I - diag(r) a)^-1 with the same numbers as passing diag(r) a (each
    block scaled as it is sliced multiplies the same two floats), and against LAPACK in x64."""
    ka, kr = jax.random.split(jax.random.PRNGKey(c + 7))
    a = jnp.tril(jax.random.uniform(ka, (2, c, c)) / c, -1)
    r = 0.999 * jnp.sign(jax.random.normal(kr, (2, c)))
    scaled = jax.jit(lambda a, r: unit_lower_inverse(a, row_scale=r))(a, r)
    assert bool(jnp.all(scaled == jax.jit(unit_lower_inverse)(r[..., None] * a)))
    with jax.enable_x64(True):
        a64, r64 = a.astype(jnp.float64), r.astype(jnp.float64)
        eye = jnp.broadcast_to(jnp.eye(c), a.shape)
        ref = lax.linalg.triangular_solve(
            eye - r64[..., None] * a64, eye, left_side=True, lower=True, unit_diagonal=True
        )
        assert relative_error(jax.jit(lambda a, r: unit_lower_inverse(a, row_scale=r))(a64, r64), ref) <= 1e-12
