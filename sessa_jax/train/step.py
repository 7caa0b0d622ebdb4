"""Loss, the jitted train step (donated state, gradient accumulation) and the eval step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from sessa_jax.train.loss import loss_sums
from sessa_jax.train.state import TrainState


def loss_and_metrics(params, apply_fn, batch, rng=None, loss_chunk: int = 0):
    """Weighted next-token cross-entropy; accuracy on the weighted positions. float32.

    ``loss_chunk`` > 0 projects that many positions at a time (``sessa_jax.train.loss``).
    """
    sums = loss_sums(params, apply_fn, batch, loss_chunk, rng)
    return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums


def _grads(params, apply_fn, batch, grad_accum: int, rng, loss_chunk: int = 0):
    """Mean gradient over ``grad_accum`` micro-batches (weighted by their token counts)."""
    grad_fn = jax.value_and_grad(lambda p, b: _summed_loss(p, apply_fn, b, rng, loss_chunk), has_aux=True)
    if grad_accum == 1:
        (_, sums), g = grad_fn(params, batch)
    else:
        micro = jax.tree_util.tree_map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

        def body(carry, mb):
            (_, s), g = grad_fn(params, mb)
            return jax.tree_util.tree_map(jnp.add, carry, (g, s)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        zs = dict(loss_sum=0.0, correct_sum=0.0, weight_sum=0.0)
        (g, sums), _ = jax.lax.scan(body, (zeros, jax.tree_util.tree_map(jnp.float32, zs)), micro)
    denom = jnp.maximum(sums["weight_sum"], 1.0)
    return jax.tree_util.tree_map(lambda x: x / denom, g), sums


def _summed_loss(params, apply_fn, batch, rng, loss_chunk=0):
    _, sums = loss_and_metrics(params, apply_fn, batch, rng, loss_chunk)
    return sums["loss_sum"], sums


def _train_step(state: TrainState, batch, schedule=None, grad_accum: int = 1, loss_chunk: int = 0):
    """One optimizer update. Returns (new state, metrics of this step's batch).

    ``schedule``: the learning-rate schedule's numbers (``optimizer.ScheduleInputs`` of
    float32 scalars), inputs rather than compiled constants so one compiled step serves
    any ``train.steps``/warmup; None uses those the optimizer was made with.
    """
    rng = jax.random.fold_in(state.rng, state.step)  # per-step randomness (e.g. dropout)
    grads, sums = _grads(state.params, state.apply_fn, batch, grad_accum, rng, loss_chunk)
    extra = {} if schedule is None else {"schedule": schedule}
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    denom = jnp.maximum(sums["weight_sum"], 1.0)
    metrics = dict(
        loss=sums["loss_sum"] / denom,
        accuracy=sums["correct_sum"] / denom,
        grad_norm=grad_norm,
        finite=jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm),
    )
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    # Never hand back non-finite parameters: the caller stops on metrics["finite"] == False.
    new = jax.tree_util.tree_map(lambda n, o: jnp.where(metrics["finite"], n, o), new, state)
    return new, metrics


train_step = jax.jit(_train_step, static_argnames=("grad_accum", "loss_chunk"), donate_argnums=(0,))
train_step.__doc__ = _train_step.__doc__


def make_train_step(
    state_sharding,
    batch_sharding: NamedSharding,
    grad_accum: int = 1,
    loss_chunk: int = 0,
    schedule_input: bool = False,
):
    """``train_step`` jitted with explicit shardings and the state donated.

    ``state_sharding``: a TrainState of NamedShardings (``state.state_shardings``);
    ``batch_sharding``: the sharding of every batch array; metrics come back replicated.
    Called as ``step(state, batch)``, or with ``schedule_input`` as
    ``step(state, batch, schedule)``: the schedule's numbers (``optimizer.ScheduleInputs``
    of float32 scalars, replicated) as inputs, so the compiled step does not depend on
    them. Call it under ``sharding.activate(mesh)`` so the activation constraints apply.
    """
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    fn = functools.partial(_train_step, grad_accum=grad_accum, loss_chunk=loss_chunk)
    if not schedule_input:
        return jax.jit(
            lambda state, batch: fn(state, batch),
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=(state_sharding, replicated),
            donate_argnums=(0,),
        )
    return jax.jit(
        fn,
        in_shardings=(state_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )


@functools.partial(jax.jit, static_argnames=("loss_chunk",))
def eval_step(state: TrainState, batch, loss_chunk: int = 0):
    """Summed loss/correct/weight of one batch (summed over eval batches by the caller)."""
    return loss_and_metrics(state.params, state.apply_fn, batch, loss_chunk=loss_chunk)[1]
