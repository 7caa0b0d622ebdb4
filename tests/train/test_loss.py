"""Chunked cross-entropy equals the dense loss (values and gradients) without (B, T, V) logits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sessa_jax.config import SessaConfig
from sessa_jax.model import SessaLM
from sessa_jax.train.loss import chunked_sums, loss_sums

B, T, V = 2, 24, 61  # odd vocabulary; T=24 with chunk 7 exercises the zero-weight padding


def _setup(tie: bool):
    cfg = SessaConfig(vocab_size=V, d_model=32, n_heads=2, n_layers=1, chunk_size=8, max_len=T, tie_embeddings=tie)
    model = SessaLM(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    batch = dict(
        inputs=jnp.asarray(tokens[:, :-1]),
        targets=jnp.asarray(tokens[:, 1:]),
        weights=jnp.asarray((rng.random((B, T)) > 0.2).astype(np.float32)),
        segment_ids=jnp.ones((B, T), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(T), (B, T)),
    )
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["inputs"])  # eager, it took longer than the test
    return model, params, batch


def _reference_loss(params, model, batch):
    """The loss as written before chunking: optax on the full float32 logits."""
    logits = model.apply(params, batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    return (ce * batch["weights"]).sum() / batch["weights"].sum()


# Both chunks of a tied model in one test: they share the dense reference (its value, gradients
# and sums, one compile each), which as two cells, often on two workers, each compiled again.
@pytest.mark.parametrize("tie, chunks", [(True, (7, T)), (False, (8,))])
def test_chunked_loss_and_grads_equal_dense(tie, chunks):
    model, params, batch = _setup(tie)
    loss_d, g_d = jax.jit(jax.value_and_grad(lambda p: _reference_loss(p, model, batch)))(params)
    sums_d = jax.jit(lambda p: loss_sums(p, model.apply, batch, 0))(params)
    for chunk in chunks:

        def chunked(p):
            s = loss_sums(p, model.apply, batch, chunk)
            return s["loss_sum"] / s["weight_sum"], s

        (loss_c, sums_c), g_c = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
        np.testing.assert_allclose(float(loss_c), float(loss_d), rtol=1e-6, err_msg=f"chunk {chunk}")
        np.testing.assert_allclose(float(sums_c["correct_sum"]), float(sums_d["correct_sum"]), err_msg=f"chunk {chunk}")
        np.testing.assert_allclose(float(sums_c["weight_sum"]), float(np.asarray(batch["weights"]).sum()))
        chex.assert_trees_all_close(g_c, g_d, rtol=1e-5, atol=1e-6)  # float32 sums in a different order


def _all_shapes(jaxpr) -> set:
    """Output shapes of every equation, nested jaxprs (scan, checkpoint, pjit) included."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
        for p in eqn.params.values():
            for j in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(j, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    shapes |= _all_shapes(inner)
                elif hasattr(j, "eqns"):
                    shapes |= _all_shapes(j)
    return shapes


def test_chunked_gradient_never_holds_full_logits():
    model, params, batch = _setup(True)
    grad = lambda chunk: jax.make_jaxpr(jax.grad(lambda p: loss_sums(p, model.apply, batch, chunk)["loss_sum"]))
    assert (B, T, V) in _all_shapes(grad(0)(params).jaxpr)  # the dense loss does build them
    shapes = _all_shapes(grad(8)(params).jaxpr)
    assert (B, T, V) not in shapes and (B, 8, V) in shapes


def test_bad_chunk_is_named():
    with pytest.raises(ValueError, match="loss chunk must be an integer >= 1"):
        chunked_sums(lambda h: h, jnp.zeros((1, 4, 2)), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4)), -3)
