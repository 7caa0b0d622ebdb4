"""Memory tail of the feedback solve: uniform feedback routing gives a t^-(1 - gamma) influence."""

import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.ops import feedback_solve

T = 4096


def _closed_form(gamma: float, t: int) -> np.ndarray:
    # s_0 = 1, s_t = gamma / t * sum_{tau < t} s_tau (A uniform over the strict past).
    s = np.zeros(t)
    s[0] = 1.0
    running = 1.0
    for i in range(1, t):
        s[i] = gamma / i * running
        running += s[i]
    return s


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_influence_follows_power_law(gamma):
    zeros = jnp.zeros((1, T, 1), jnp.float32)
    f = zeros.at[0, 0, 0].set(1.0)  # the solve is linear in f, so s(e_0) = d s / d f_0
    s = feedback_solve(zeros, zeros, jnp.full((1, T), gamma, jnp.float32), f, method="blocked", chunk_size=256)
    influence = np.abs(np.asarray(s[0, :, 0], np.float64))
    np.testing.assert_allclose(influence, _closed_form(gamma, T), rtol=1e-4)
    t = np.arange(256, T)
    slope = np.polyfit(np.log(t), np.log(influence[256:]), 1)[0]
    assert abs(slope - (-(1.0 - gamma))) <= 0.05, slope
