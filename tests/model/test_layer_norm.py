"""``layer_norm``'s hand-written backward equals flax's LayerNorm; input casts and parameter dtypes."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sessa_jax.layer_norm import LayerNorm, layer_norm


def test_layer_norm_matches_flax_x64():
    with jax.enable_x64(True):
        x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(26), (2, 7, 16), jnp.float64)
        cot = jax.random.normal(jax.random.PRNGKey(27), (2, 7, 16), jnp.float64)
        ours, theirs = LayerNorm(epsilon=1e-5, dtype=jnp.float64), nn.LayerNorm(epsilon=1e-5, dtype=jnp.float64)
        params = jax.jit(theirs.init)(jax.random.PRNGKey(0), x)
        params = jax.tree_util.tree_map(
            lambda p: p + jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params
        )
        chex.assert_trees_all_equal_shapes_and_dtypes(  # traced, not run
            jax.eval_shape(ours.init, jax.random.PRNGKey(0), x), jax.eval_shape(theirs.init, jax.random.PRNGKey(0), x)
        )

        def run(module):  # compiled: op by op in float64 the two runs took most of the test's time
            loss = lambda p, x: jnp.sum(module.apply(p, x) * cot)
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

        (l_ours, g_ours), (l_theirs, g_theirs) = run(ours), run(theirs)
        assert abs(float(l_ours - l_theirs)) <= 1e-12 * abs(float(l_theirs))
        chex.assert_trees_all_close(g_ours, g_theirs, rtol=1e-11, atol=1e-12)


def test_layer_norm_casts_input_and_keeps_param_dtypes():
    x = jax.random.normal(jax.random.PRNGKey(28), (3, 8)).astype(jnp.bfloat16)
    module = LayerNorm(dtype=jnp.float32)
    params = module.init(jax.random.PRNGKey(0), x)
    y = module.apply(params, x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(jnp.mean(y, -1)), 0.0, atol=1e-6)
    grads = jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 3))(params)
    chex.assert_trees_all_equal_dtypes(grads, params)
    s, b = jnp.ones(8), jnp.zeros(8)
    grad_x = jax.grad(lambda x: jnp.sum(layer_norm(x, s, b, 1e-5) * jnp.arange(8.0)))(x.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(jnp.sum(grad_x, -1)), 0.0, atol=1e-5)  # LN output ignores shifts of x
