"""Orbax checkpoints: state, data iterator and resolved config saved together per step.

Items of a step directory: ``params`` and ``opt_state`` (StandardSave), ``meta`` (step
and base RNG), ``data`` (the train stream's position in examples, one JSON file per
process via ``grain.checkpoint.CheckpointSave``), ``config`` (JsonSave of the resolved run
config) and ``integrity`` (JsonSave of a fingerprint per array of params and optimizer
state). Orbax writes to a temporary directory and renames it when complete, so
``latest_step`` only ever names complete checkpoints (a SIGKILL mid-save leaves the
previous one).

Orbax verifies structure and metadata but not array contents, so ``fingerprints`` adds a
position-weighted byte sum per array, computed on device at save time and compared after
every restore. ``restore`` tries steps newest first: a step that fails to restore or to
verify is logged, moved aside to ``<step>.damaged`` and the next older one is tried; when
none restores, one ``CheckpointError`` lists every step and why.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sessa_jax.train import workdir as wd
from sessa_jax.train.resume_guard import ResumeError, check_resume
from sessa_jax.train.state import TrainState

ITEMS = ("params", "opt_state", "meta", "data", "config", "integrity")


class CheckpointError(RuntimeError):
    """No checkpoint of a directory restores and verifies; the message lists each step and why."""


class IntegrityError(ValueError):
    """A restored array's fingerprint differs from the one saved with it (damaged file)."""


def _leaf_fingerprint(x) -> jax.Array:
    """uint32 sum over the bytes of ``x``, byte i weighted by the odd number 2 * i * 0x9E3779B1 + 1 (mod 2^32):
    any single changed byte changes it; wrapping integer sums do not depend on the reduction order,
    so every sharding gives the same value."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    b = jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(-1).astype(jnp.uint32)
    weight = jnp.arange(b.shape[0], dtype=jnp.uint32) * jnp.uint32(2 * 0x9E3779B1 & 0xFFFFFFFF) + jnp.uint32(1)
    return jnp.sum(b * weight, dtype=jnp.uint32)


_fingerprint_tree = jax.jit(lambda tree: jax.tree_util.tree_map(_leaf_fingerprint, tree))


def fingerprints(tree) -> dict[str, int]:
    """{leaf path: uint32 fingerprint of its bytes} of a pytree of arrays (computed on device)."""
    fps = _fingerprint_tree(tree)
    flat, _ = jax.tree_util.tree_flatten_with_path(fps)
    # A replicated scalar: any addressable shard holds the value (works across hosts).
    return {jax.tree_util.keystr(path): int(np.asarray(v.addressable_data(0))) for path, v in flat}


def _verify(name: str, tree, saved: dict) -> None:
    got = fingerprints(tree)
    if set(got) != set(saved):
        raise IntegrityError(f"{name}: the saved fingerprints cover other arrays ({sorted(set(saved) ^ set(got))[:3]})")
    bad = [k for k in got if got[k] != saved[k]]
    if bad:
        raise IntegrityError(
            f"{name}: {len(bad)} array(s) differ from what was saved, e.g. {bad[0]} "
            f"(fingerprint {got[bad[0]]} != saved {saved[bad[0]]}): damaged file"
        )


class _IteratorSnapshot:
    """The iterator's state captured at save time: grain's handler runs in a worker thread
    while training goes on. Serialised as grain's handler expects of a non-DatasetIterator
    (bytes); ``restore`` reads it back into the real ``DatasetIterator`` (JSON)."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state(), indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


def make_manager(directory: str, every: int = 0, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """CheckpointManager over ``directory`` (a local path or ``gs://`` URL) keeping the last ``keep`` steps."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(every, 1),
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(wd.normalize(directory), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, state: TrainState, iterator, config_dict: dict, force: bool = False) -> bool:
    """Saves everything that makes the run resumable at ``state.step``.

    WorkdirError, and nothing saved, if this process has lost its workdir's bucket lock.
    """
    wd.check_held(os.path.dirname(str(manager.directory)))
    step = int(state.step)
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.StandardSave(dict(step=state.step, rng=state.rng)),
        data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator)),
        config=ocp.args.JsonSave(config_dict),
        integrity=ocp.args.JsonSave(dict(params=fingerprints(state.params), opt_state=fingerprints(state.opt_state))),
    )
    return manager.save(step, args=args, force=force)


def _has_item(manager, step: int, item: str) -> bool:
    return wd.isdir(wd.join(str(manager.directory), str(step), item))


def _integrity(manager, step: int) -> dict | None:
    """The fingerprints saved with ``step``; None for checkpoints written before they existed."""
    if not _has_item(manager, step, "integrity"):
        return None
    return manager.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore())).integrity


def _reason(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _first_good(manager, steps, attempt, log, set_aside: bool):
    """``attempt(step)`` for each step (newest first) until one succeeds.

    ResumeError (a config change, not damage) propagates at once. Each failing step is
    logged; with ``set_aside`` (process 0 only), once an older step has restored the failed
    newer ones are renamed ``<step>.damaged`` so later saves can reuse their numbers (when
    none restores nothing is moved). None succeeding raises CheckpointError listing them all.
    """
    failed = []
    for step in steps:
        try:
            result = attempt(step)
        except ResumeError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of one step means: try the one before it
            failed.append((step, _reason(e)))
            log(f"checkpoint step {step} in {manager.directory} does not restore ({failed[-1][1]}); skipping it")
            continue
        if set_aside and failed:
            if jax.process_index() == 0:
                for bad, _ in failed:
                    src = wd.join(str(manager.directory), str(bad))
                    dst = f"{src}.damaged"
                    while wd.exists(dst):
                        dst += "+"
                    wd.rename(src, dst)
                    log(f"moved the damaged step {bad} aside to {dst}")
            manager.reload()
        return result
    listing = "\n".join(f"  step {s}: {r}" for s, r in failed)
    raise CheckpointError(
        f"no checkpoint in {manager.directory} restores:\n{listing}\nFix: restore the directory from a backup, "
        f"or start a new --workdir (or move {manager.directory} away to train from scratch)"
    )


def restore(
    manager: ocp.CheckpointManager,
    abstract: TrainState,
    iterator,
    step: int | None = None,
    config: dict | None = None,
    log=print,
) -> TrainState:
    """Restores state (structure of ``abstract``) and rewinds ``iterator`` in place.

    Without ``step``: the newest step that restores and verifies; damaged newer steps are
    logged and moved aside (``<step>.damaged``). With ``config`` (the new resolved run
    config as a dict) the config saved with that step is compared first
    (``resume_guard.check_resume``; a refused change raises ResumeError).
    """
    steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    workdir = os.path.dirname(str(manager.directory))

    def attempt(s):
        if config is not None:
            saved = manager.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
            check_resume(saved, config, s, workdir, log)
        out = manager.restore(
            s,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                opt_state=ocp.args.StandardRestore(abstract.opt_state),
                meta=ocp.args.StandardRestore(dict(step=abstract.step, rng=abstract.rng)),
                data=grain.checkpoint.CheckpointRestore(iterator),
            ),
        )
        saved_fps = _integrity(manager, s)
        if saved_fps is None:
            log(f"checkpoint step {s} has no fingerprints (written by an older version): not verified")
        else:
            _verify("params", out.params, saved_fps["params"])
            _verify("opt_state", out.opt_state, saved_fps["opt_state"])
        return abstract.replace(params=out.params, opt_state=out.opt_state, step=out.meta["step"], rng=out.meta["rng"])

    return _first_good(manager, steps, attempt, log, set_aside=step is None)


def restore_config(directory: str, step: int | None = None, log=print) -> dict:
    """The resolved run config saved with a checkpoint (by default the newest that reads)."""
    manager = make_manager(directory, async_save=False)
    try:
        _require_step(manager, directory, step)
        steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
        return _first_good(
            manager,
            steps,
            lambda s: manager.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config,
            log,
            set_aside=False,
        )
    finally:
        manager.close()


def restore_params(directory: str, abstract_params=None, step: int | None = None, log=print):
    """Parameters only (no optimizer state or data): for evaluation and generation.

    ``abstract_params``: a tree of ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``)
    fixing dtypes and shardings; None restores as saved, on the default device. Without
    ``step``, the newest step whose params restore and verify (nothing is moved).
    """
    manager = make_manager(directory, async_save=False)
    arg = ocp.args.StandardRestore(abstract_params) if abstract_params is not None else ocp.args.StandardRestore()

    def attempt(s):
        params = jax.tree_util.tree_map(jnp.asarray, manager.restore(s, args=ocp.args.Composite(params=arg)).params)
        saved_fps = _integrity(manager, s)
        if saved_fps is not None:
            _verify("params", params, saved_fps["params"])
        return params

    try:
        _require_step(manager, directory, step)
        steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
        return _first_good(manager, steps, attempt, log, set_aside=False)
    finally:
        manager.close()  # its threads and handlers, also when no step restores


def _require_step(manager, directory, step):
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(
            f"no complete checkpoint in {os.path.join(directory)!r}; train with checkpoint.every > 0 "
            f"(or let the run finish) and point --run at its workdir/checkpoints"
        )
    return step
