"""Next-token cross-entropy, dense or chunked over the sequence so (B, T, V) logits never exist.

Shapes: B batch, T time, D width, V vocabulary, C loss chunk (positions per slice).
``loss_sums`` returns the weighted sums the train and eval steps accumulate:
``loss_sum`` (nats), ``correct_sum`` (argmax hits) and ``weight_sum`` (counted positions).

With ``chunk`` > 0 the model returns its final hidden states (B, T, D); each slice of C
positions is projected to float32 logits (B, C, V), reduced to per-position loss and
discarded, inside ``jax.checkpoint`` so the backward pass recomputes the slice's logits
instead of storing them. Peak logits memory drops from B*T*V to B*C*V floats; the sums are
the dense ones up to float32 summation order.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax


def token_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position cross-entropy in nats and argmax correctness, both float32 (B, T)."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
    correct_BxT = (jnp.argmax(logits_BxTxV, -1) == targets_BxT).astype(jnp.float32)
    return ce_BxT, correct_BxT


def _weighted_sums(ce_BxT, correct_BxT, w_BxT) -> dict:
    return dict(loss_sum=(ce_BxT * w_BxT).sum(), correct_sum=(correct_BxT * w_BxT).sum(), weight_sum=w_BxT.sum())


def chunked_sums(
    logits_fn, hidden_BxTxD: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array, chunk: int
) -> dict:
    """Weighted loss/correct/weight sums, projecting ``chunk`` positions at a time.

    ``logits_fn``: (B, C, D) hidden -> (B, C, V) logits. T need not divide by ``chunk``:
    the tail is padded with zero-weight positions.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"loss chunk must be an integer >= 1 (positions per slice); got {chunk!r}")
    chex.assert_rank(hidden_BxTxD, 3)
    chex.assert_equal_shape_prefix([hidden_BxTxD, targets_BxT, weights_BxT], 2)
    b, t, d = hidden_BxTxD.shape
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    w_BxT = weights_BxT.astype(jnp.float32)
    if pad:
        hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
        w_BxT = jnp.pad(w_BxT, ((0, 0), (0, pad)))
    # (n, B, C, ...): scan over slices of the sequence.
    h_NxBxCxD = hidden_BxTxD.reshape(b, n, chunk, d).swapaxes(0, 1)
    y_NxBxC = targets_BxT.reshape(b, n, chunk).swapaxes(0, 1)
    w_NxBxC = w_BxT.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint  # the backward pass recomputes this slice's logits rather than storing them
    def slice_sums(h_BxCxD, y_BxC, w_BxC):
        ce, correct = token_cross_entropy(logits_fn(h_BxCxD), y_BxC)
        return _weighted_sums(ce, correct, w_BxC)

    def body(total, xs):
        return jax.tree_util.tree_map(jnp.add, total, slice_sums(*xs)), None

    zeros = dict(loss_sum=jnp.float32(0), correct_sum=jnp.float32(0), weight_sum=jnp.float32(0))
    total, _ = jax.lax.scan(body, zeros, (h_NxBxCxD, y_NxBxC, w_NxBxC))
    return total


def loss_sums(params, apply_fn, batch: dict, chunk: int = 0, rng=None) -> dict:
    """Weighted next-token cross-entropy sums of ``batch`` (float32 scalars).

    ``apply_fn``: ``SessaLM.apply``; ``batch``: inputs, targets, weights, segment_ids,
    positions (B, T). ``chunk`` 0 computes the full (B, T, V) logits; > 0 slices T.
    """
    kw = {} if rng is None else dict(rngs={"dropout": rng})
    args = (params, batch["inputs"])
    kw.update(segment_ids=batch["segment_ids"], positions=batch["positions"])
    if not chunk:
        ce, correct = token_cross_entropy(apply_fn(*args, **kw), batch["targets"])
        return _weighted_sums(ce, correct, batch["weights"].astype(jnp.float32))
    hidden = apply_fn(*args, return_hidden=True, **kw)
    return chunked_sums(
        lambda h: apply_fn(params, h, method="logits"), hidden, batch["targets"], batch["weights"], chunk
    )
