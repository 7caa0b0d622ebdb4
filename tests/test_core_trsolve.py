"""The matmul-based unit-lower-triangular solve against LAPACK-style triangular_solve."""

import jax
import jax.numpy as jnp
import pytest
from _parity import rel_err
from jax import lax

from sessa_jax.ops.trsolve import unit_lower_solve


@pytest.mark.parametrize("c", [1, 2, 7, 16, 17, 64, 100])
@pytest.mark.parametrize("transpose", [False, True])
def test_matches_triangular_solve_x64(c, transpose):
    with jax.enable_x64(True):
        ka, kg, kb = jax.random.split(jax.random.PRNGKey(c), 3)
        # N = diag(gamma) A with A row-stochastic over the strict past and |gamma| < 1.
        logits = 3.0 * jax.random.normal(ka, (2, c, c), jnp.float64)
        strict = jnp.tril(jnp.ones((c, c), bool), -1)
        a = jnp.nan_to_num(jnp.where(strict, jax.nn.softmax(jnp.where(strict, logits, -jnp.inf), -1), 0.0))
        gamma = 0.999 * jnp.sign(jax.random.normal(kg, (2, c), jnp.float64))
        n = gamma[:, :, None] * a
        b = jax.random.normal(kb, (2, c, 5), jnp.float64)
        ref = lax.linalg.triangular_solve(jnp.eye(c) - n, b, left_side=True, lower=True,
                                          transpose_a=transpose, unit_diagonal=True)
        solve = jax.jit(unit_lower_solve, static_argnames="transpose")
        assert rel_err(solve(n, b, transpose=transpose), ref) <= 1e-12
