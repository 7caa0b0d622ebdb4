"""Train state (params, optimizer state, step, base RNG) and the model of a run config."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sessa_jax import sharding
from sessa_jax.model import SessaLM
from sessa_jax.train.config import model_config


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: number of updates applied
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # uint32[2] base key; step s uses fold_in(rng, s)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    apply_fn: callable = flax.struct.field(pytree_node=False)


def build_model(cfg):
    """``SessaLM`` of the run config's model section (kind selects the mixer)."""
    return SessaLM(model_config(cfg), kind=cfg.model.kind)


def init_params(model, rng: jax.Array, seq_len: int):
    """Parameters of ``model`` for (1, seq_len) int32 tokens."""
    return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))


def _fresh_state(model, tx: optax.GradientTransformation, seed: int, seq_len: int) -> TrainState:
    rng = jax.random.PRNGKey(seed)
    params = init_params(model, jax.random.fold_in(rng, 2**31 - 1), seq_len)  # init key != any step key
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng, tx=tx, apply_fn=model.apply
    )


def create_state(model, tx: optax.GradientTransformation, seed: int, seq_len: int, sharding=None) -> TrainState:
    """Fresh state (params, optimizer state, step 0, base key), built by one jitted call."""
    return jax.jit(lambda: _fresh_state(model, tx, seed, seq_len), out_shardings=sharding)()


def abstract_state(model, tx, seed: int, seq_len: int, shardings=None) -> TrainState:
    """Shapes/dtypes (and ``shardings``, a matching tree) of ``create_state`` without
    computing anything: the restore target."""
    abstract = jax.eval_shape(lambda: _fresh_state(model, tx, seed, seq_len))
    if shardings is None:
        return abstract
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def state_shardings(model, tx, seed: int, seq_len: int, mesh, rules=sharding.RULES) -> TrainState:
    """NamedShardings of every leaf of the train state on ``mesh``.

    ``jax.eval_shape`` of the state with the parameters' logical boxes on (nothing is
    computed) -> logical PartitionSpecs (optimizer moments inherit their parameter's)
    -> mesh shardings through ``rules``. Leaves without names (step, rng, counts) are
    replicated. The state itself holds plain arrays.
    """
    with sharding.logical_boxes():
        boxed = jax.eval_shape(lambda: _fresh_state(model, tx, seed, seq_len))
    return sharding.shardings_of(boxed, mesh, rules)
