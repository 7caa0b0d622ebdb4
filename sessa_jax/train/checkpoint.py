"""Orbax checkpoints: state, data iterator and resolved config saved together per step.

Items of a step directory: ``params`` and ``opt_state`` (StandardSave), ``meta`` (step
and base RNG), ``data`` (the grain iterator position, one JSON file per process via
``grain.checkpoint.CheckpointSave``) and ``config`` (JsonSave of the resolved run config).
Orbax writes to a temporary directory and renames it when complete, so ``latest_step``
only ever names complete checkpoints (a SIGKILL mid-save leaves the previous one).
"""

from __future__ import annotations

import json
import os

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sessa_jax.train.state import TrainState

ITEMS = ("params", "opt_state", "meta", "data", "config")


class _IteratorSnapshot:
    """The iterator's state captured at save time: grain's handler runs in a worker thread
    while training goes on. Serialised as grain's handler expects of a non-DatasetIterator
    (bytes); ``restore`` reads it back into the real ``DatasetIterator`` (JSON)."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state(), indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


def make_manager(directory: str, every: int = 0, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """CheckpointManager over ``directory`` keeping the last ``keep`` steps."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(every, 1), max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, state: TrainState, iterator, config_dict: dict, force: bool = False) -> bool:
    """Saves everything that makes the run resumable at ``state.step``."""
    step = int(state.step)
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.StandardSave(dict(step=state.step, rng=state.rng)),
        data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator)),
        config=ocp.args.JsonSave(config_dict),
    )
    return manager.save(step, args=args, force=force)


def restore(manager: ocp.CheckpointManager, abstract: TrainState, iterator, step: int | None = None) -> TrainState:
    """Restores state (structure of ``abstract``) and rewinds ``iterator`` in place."""
    step = manager.latest_step() if step is None else step
    out = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        opt_state=ocp.args.StandardRestore(abstract.opt_state),
        meta=ocp.args.StandardRestore(dict(step=abstract.step, rng=abstract.rng)),
        data=grain.checkpoint.CheckpointRestore(iterator),
    ))
    return abstract.replace(params=out.params, opt_state=out.opt_state, step=out.meta["step"], rng=out.meta["rng"])


def restore_config(directory: str, step: int | None = None) -> dict:
    """The resolved run config saved with a checkpoint (latest by default)."""
    manager = make_manager(directory, async_save=False)
    step = _require_step(manager, directory, step)
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def restore_params(directory: str, abstract_params=None, step: int | None = None):
    """Parameters only (no optimizer state or data): for evaluation and generation.

    ``abstract_params``: a tree of ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``)
    fixing dtypes and shardings; None restores as saved, on the default device.
    """
    manager = make_manager(directory, async_save=False)
    step = _require_step(manager, directory, step)
    arg = ocp.args.StandardRestore(abstract_params) if abstract_params is not None else ocp.args.StandardRestore()
    params = manager.restore(step, args=ocp.args.Composite(params=arg)).params
    return jax.tree_util.tree_map(jnp.asarray, params)


def _require_step(manager, directory, step):
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(
            f"no complete checkpoint in {os.path.join(directory)!r}; train with checkpoint.every > 0 "
            f"(or let the run finish) and point --run at its workdir/checkpoints"
        )
    return step
