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
    params = jax.jit(dense.init)(jax.random.PRNGKey(1), x)  # compiled: op by op took most of the test's time
    split_params = jax.jit(split.init)(jax.random.PRNGKey(1), x)
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

    want = jnp.split(jax.jit(dense.apply)(params, x), 3, axis=-1)
    got = jax.jit(split.apply)(params, x)
    assert len(got) == 3 and all(g.shape == (2, 5, 4) for g in got)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    grads_want = jax.jit(jax.grad(loss_dense, argnums=(0, 1)))(params, x)
    grads_got = jax.jit(jax.grad(loss_split, argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(grads_got), jax.tree_util.tree_leaves(grads_want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_compute_dtype_and_logical_boxes():
    dense, split = _pair(8, 2, dtype=jnp.bfloat16, param_dtype=jnp.float32, **dense_init("embed", "mlp"))
    x = jnp.ones((1, 3, 5), jnp.float32)
    with logical_boxes():
        boxed = jax.jit(split.init)(jax.random.PRNGKey(0), x)
    names = {k: v.names for k, v in boxed["params"].items()}
    assert names == {"kernel": ("embed", "mlp"), "bias": ("mlp",)}
    params = jax.jit(dense.init)(jax.random.PRNGKey(0), x)
    parts = jax.jit(split.apply)(params, x)
    assert all(p.dtype == jnp.bfloat16 for p in parts)
    np.testing.assert_array_equal(
        np.asarray(jnp.concatenate(parts, -1), np.float32), np.asarray(jax.jit(dense.apply)(params, x), np.float32)
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
    params = jax.jit(mixer.init)(jax.random.PRNGKey(1), a_bar)  # op by op it took most of the test's time

    def loss(p, a):
        return jnp.sum(mixer.apply(p, a) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, a_bar).jaxpr
    assert _arrays_of_shape(jaxpr, (2, 8, 48), {"concatenate", "split", "slice"}) == []


def test_unbiased_parts_skip_their_bias_slice():
    dense, split = _pair(8, 2)
    unbiased = SplitDense(8, 2, unbiased_parts=(1,))
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
    params = jax.jit(dense.init)(jax.random.PRNGKey(1), x)
    params = {"params": {"kernel": params["params"]["kernel"], "bias": jnp.arange(8.0) + 1.0}}
    first, second = jax.jit(unbiased.apply)(params, x)
    want_first, want_second = jax.jit(split.apply)(params, x)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(want_first))
    np.testing.assert_allclose(np.asarray(second), np.asarray(want_second - params["params"]["bias"][4:]), atol=1e-6)
    with pytest.raises(ValueError, match="unbiased_parts=\\(2,\\) must index the 2 parts"):
        SplitDense(8, 2, unbiased_parts=(2,)).init(jax.random.PRNGKey(0), x)


def test_the_key_half_of_the_feedback_bias_changes_nothing_and_gets_no_gradient():
    # k_b's bias shifts each row's logits by one constant, which the softmax removes: the mixer
    # does not add it, so the output is the same bit for bit whatever it holds, and its gradient
    # is exactly zero (not rounding noise, which Adam would scale up to full-size steps)
    cfg = SessaConfig(d_model=16, n_heads=2, chunk_size=4)
    mixer = SessaMixer(cfg)
    a_bar = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 16))
    params = jax.jit(mixer.init)(jax.random.PRNGKey(1), a_bar)
    apply = jax.jit(mixer.apply)  # one program for every parameter set: op by op each run took seconds
    bias = params["params"]["proj_fb"]["bias"]
    noise = jax.random.normal(jax.random.PRNGKey(2), bias.shape)
    shifted = jax.tree_util.tree_map(lambda p: p, params)
    shifted["params"]["proj_fb"]["bias"] = bias + jnp.concatenate([jnp.zeros(16), 3.0 * noise[16:]])
    out = apply(params, a_bar)
    np.testing.assert_array_equal(np.asarray(apply(shifted, a_bar)), np.asarray(out))
    # ... while q_b's half does change it
    moved = jax.tree_util.tree_map(lambda p: p, params)
    moved["params"]["proj_fb"]["bias"] = bias + jnp.concatenate([3.0 * noise[:16], jnp.zeros(16)])
    assert not np.allclose(np.asarray(apply(moved, a_bar)), np.asarray(out))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(mixer.apply(p, a_bar) ** 2)))(shifted)
    bias_grad = np.asarray(grads["params"]["proj_fb"]["bias"])
    np.testing.assert_array_equal(bias_grad[16:], 0.0)
    assert np.abs(bias_grad[:16]).max() > 0
