"""Packing: documents in one row behave exactly as if each ran alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax import SessaConfig, SessaLayer

D = 16
DOCS = (9, 14)  # two documents, then padding (segment 0)
PAD = 5


def _layer(solver):
    cfg = SessaConfig(d_model=D, n_heads=4, n_kv_heads=2, solver=solver, chunk_size=8)
    return SessaLayer(cfg)


def _packed_inputs():
    t = sum(DOCS) + PAD
    x = jax.random.normal(jax.random.PRNGKey(0), (1, t, D))
    seg = jnp.array([[1] * DOCS[0] + [2] * DOCS[1] + [0] * PAD], jnp.int32)
    return x, seg


@pytest.mark.parametrize("solver", ["dense", "blocked"])
def test_packed_equals_separate(solver):
    layer = _layer(solver)
    x, seg = _packed_inputs()
    variables = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    apply = jax.jit(layer.apply)  # the documents alone too: op by op they took most of the test's time
    y = apply(variables, x, seg)
    assert bool(jnp.all(jnp.isfinite(y)))
    start = 0
    for n in DOCS:
        alone = apply(variables, x[:, start : start + n])
        np.testing.assert_allclose(np.asarray(y[:, start : start + n]), np.asarray(alone), rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("solver", ["dense", "blocked"])
def test_no_gradient_crosses_documents(solver):
    layer = _layer(solver)
    x, seg = _packed_inputs()
    variables = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    a, b = DOCS
    r = jax.random.normal(jax.random.PRNGKey(2), x.shape)

    # One compiled gradient for both slices: the slice is a 0/1 mask on the cotangent r, an input
    # (op by op the two gradients took most of the test's time; one program each, half of it).
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(layer.apply(variables, x, seg) * w)))

    def grad_of(sl):
        return grad(x, jnp.zeros_like(r).at[:, sl].set(r[:, sl]))

    g_doc2 = grad_of(slice(a, a + b))
    g_pad = grad_of(slice(a + b, None))
    assert bool(jnp.all(jnp.isfinite(g_doc2))) and bool(jnp.all(jnp.isfinite(g_pad)))
    np.testing.assert_array_equal(np.asarray(g_doc2[:, :a]), 0.0)  # doc 2 never sees doc 1
    np.testing.assert_array_equal(np.asarray(g_doc2[:, a + b :]), 0.0)
    np.testing.assert_array_equal(np.asarray(g_pad[:, : a + b]), 0.0)  # padding reaches no real token
    assert float(jnp.max(jnp.abs(g_doc2[:, a : a + b]))) > 0  # and the check is not vacuous


def test_positions_restart_per_segment_and_can_be_overridden():
    layer = _layer("blocked")
    x, seg = _packed_inputs()
    variables = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    apply = jax.jit(layer.apply)  # two programs (with and without positions); op by op they took the test's time
    a, b = DOCS
    pos = jnp.concatenate([jnp.arange(a), jnp.arange(b), jnp.arange(PAD)])[None]
    default = apply(variables, x, seg)
    np.testing.assert_allclose(np.asarray(default), np.asarray(apply(variables, x, seg, pos)), rtol=1e-6, atol=1e-6)
    # RoPE is relative: a constant shift changes nothing, stretched distances do.
    np.testing.assert_allclose(np.asarray(apply(variables, x, seg, pos + 3)), np.asarray(default), rtol=1e-5, atol=1e-5)
    stretched = apply(variables, x, seg, 2 * pos)
    assert float(jnp.max(jnp.abs(stretched - default))) > 1e-4
