"""SplitDense: nn.Dense's parameters and values, its parts as products of their own."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax import SessaConfig
from sessa_jax.mixer import SessaMixer
from sessa_jax.sharding import dense_init, logical_boxes
from sessa_jax.split_dense import SplitDense


def _pair(features=12, groups=3, **kwargs):
    return nn.Dense(features, **kwargs), SplitDense(features, groups, **kwargs)


def test_same_parameters_values_and_gradients_as_dense_then_split():
    dense, split = _pair()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7))
    params = dense.init(jax.random.PRNGKey(1), x)
    split_params = split.init(jax.random.PRNGKey(1), x)
    # same names, shapes and initial values (the same RNG use): checkpoints load unchanged
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(split_params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(split_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a nonzero bias, so that its slices are checked too
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jnp.arange(p.size).reshape(p.shape) / p.size, params)
    weights = [jax.random.normal(jax.random.PRNGKey(2 + i), (2, 5, 4)) for i in range(3)]

    def loss_dense(p, x):
        return sum(jnp.sum(w * y) for w, y in zip(weights, jnp.split(dense.apply(p, x), 3, axis=-1)))

    def loss_split(p, x):
        return sum(jnp.sum(w * y) for w, y in zip(weights, split.apply(p, x)))

    want = jnp.split(dense.apply(params, x), 3, axis=-1)
    got = split.apply(params, x)
    assert len(got) == 3 and all(g.shape == (2, 5, 4) for g in got)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    grads_want = jax.grad(loss_dense, argnums=(0, 1))(params, x)
    grads_got = jax.grad(loss_split, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(grads_got), jax.tree_util.tree_leaves(grads_want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_compute_dtype_and_logical_boxes():
    dense, split = _pair(8, 2, dtype=jnp.bfloat16, param_dtype=jnp.float32, **dense_init("embed", "mlp"))
    x = jnp.ones((1, 3, 5), jnp.float32)
    with logical_boxes():
        boxed = split.init(jax.random.PRNGKey(0), x)
    names = {k: v.names for k, v in boxed["params"].items()}
    assert names == {"kernel": ("embed", "mlp"), "bias": ("mlp",)}
    params = dense.init(jax.random.PRNGKey(0), x)
    parts = split.apply(params, x)
    assert all(p.dtype == jnp.bfloat16 for p in parts)
    np.testing.assert_array_equal(
        np.asarray(jnp.concatenate(parts, -1), np.float32), np.asarray(dense.apply(params, x), np.float32)
    )


def test_features_not_a_multiple_of_groups_is_named():
    with pytest.raises(ValueError, match="features=10 is not a multiple of groups=3"):
        SplitDense(10, 3).init(jax.random.PRNGKey(0), jnp.ones((1, 4)))


def _arrays_of_shape(jaxpr, shape, primitives):
    """Equations of ``primitives`` (in nested jaxprs too) with an input or output of ``shape``."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in primitives:
            avals = [v.aval for v in (*eqn.invars, *eqn.outvars) if hasattr(v, "aval")]
            if any(getattr(a, "shape", None) == shape for a in avals):
                found.append(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _arrays_of_shape(sub, shape, primitives)
    return found


def test_sessa_mixer_neither_splits_nor_concatenates_the_feedback_projection():
    # q_b and k_b are proj_fb's two column halves: no (B, T, 2D) array is split into them in the
    # forward pass, nor are their gradients concatenated into one in the backward pass
    cfg = SessaConfig(d_model=24, n_heads=2, chunk_size=4)
    mixer = SessaMixer(cfg)
    a_bar = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 24))
    params = mixer.init(jax.random.PRNGKey(1), a_bar)

    def loss(p, a):
        return jnp.sum(mixer.apply(p, a) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, a_bar).jaxpr
    assert _arrays_of_shape(jaxpr, (2, 8, 48), {"concatenate", "split", "slice"}) == []
