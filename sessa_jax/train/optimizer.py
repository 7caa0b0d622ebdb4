"""AdamW with a learning-rate schedule, global-norm clipping and weight decay by parameter role.

Schedules (``optim.schedule``), all with a linear warmup from 0 to ``optim.lr`` over
``optim.warmup_steps`` updates, then down to ``end = lr * optim.min_lr_ratio`` at
``train.steps``:

    cosine    end + (lr - end) * (1 + cos(pi * p)) / 2,  p = (count - warmup) / (steps - warmup)
    linear    end + (lr - end) * (1 - p)
    constant  lr (min_lr_ratio unused)
    wsd       warmup-stable-decay: lr until the last ``optim.decay_fraction`` of train.steps,
              then linearly to end

The schedule's numbers (lr, warmup, steps, end, decay start) are step inputs
(``schedule_inputs``, passed to the optimizer's update as ``schedule=``), not constants
compiled into the train step: changing ``train.steps`` or the warmup reuses the compiled
step (and the persistent compilation cache). Without ``schedule=`` the numbers given to
``make_optimizer`` are used.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sessa_jax.options import LR_SCHEDULES as SCHEDULES

# Leaf names that are never decayed: biases, norm scales, Mamba's A_log and D (the SSM's
# dynamics, not weights, as in the Mamba reference).
_NO_DECAY_LEAVES = ("bias", "scale", "A_log", "D")
_NORM_MODULES = ("ln", "norm", "layernorm", "layer_norm", "rmsnorm", "rms_norm")


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def decay_role(path) -> str:
    """The role of the parameter at ``path`` (a key path of a Flax params tree):
    ``"embedding"``, ``"no_decay"`` (biases incl. ``*_bias`` such as ``gamma_bias``, norm
    scales and biases, Mamba's ``A_log``/``D``) or ``"weight"`` (everything else: kernels).

    Decided by names, never by rank, so a layer stack (``scan_layers``, a leading layer
    axis) gets the same roles as separate layers.
    """
    names = _names(path)
    leaf = names[-1] if names else ""
    if leaf == "embedding" or any(n == "embed" or n.startswith("embed_") for n in names[:-1]):
        return "embedding"
    if leaf in _NO_DECAY_LEAVES or leaf.endswith("_bias"):
        return "no_decay"
    if any(n.lower() in _NORM_MODULES or n.lower().startswith("norm") for n in names[:-1]):
        return "no_decay"
    return "weight"


def decay_mask(params, decay_embeddings: bool = False):
    """Pytree of bools like ``params``: True where AdamW's weight decay applies.

    Weights (kernels) are decayed; biases, norm scales/biases and ``gamma_bias`` never;
    embedding tables when ``decay_embeddings`` (``optim.decay_embeddings``).
    """

    def keep(path, _):
        role = decay_role(path)
        return role == "weight" or (role == "embedding" and decay_embeddings)

    return jax.tree_util.tree_map_with_path(keep, params)


class ScheduleInputs(NamedTuple):
    """The schedule's numbers, as float32 scalars when passed to the jitted step."""

    lr: float  # peak
    warmup: float  # warmup updates
    total: float  # train.steps (> warmup)
    end: float  # lr * min_lr_ratio
    decay_start: float  # wsd: the update where the decay starts


def schedule_inputs(optim_cfg, total_steps: int) -> ScheduleInputs:
    """The numbers ``learning_rate`` needs for a run of ``total_steps`` updates (host floats)."""
    warmup = float(optim_cfg.warmup_steps)
    total = float(max(total_steps, optim_cfg.warmup_steps + 1))
    decay = math.ceil(float(optim_cfg.get("decay_fraction", 0.2)) * total)
    return ScheduleInputs(
        lr=float(optim_cfg.lr),
        warmup=warmup,
        total=total,
        end=float(optim_cfg.lr) * float(optim_cfg.min_lr_ratio),
        decay_start=float(max(warmup, total - decay)),
    )


def learning_rate(kind: str, count, s: ScheduleInputs, xp=jnp):
    """Learning rate of update ``count`` (0-based: the number of updates before it).

    ``xp``: ``jax.numpy`` (traced, inside the step) or ``numpy`` (host, for logging); the
    same arithmetic either way.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"optim.schedule={kind!r} is unknown; choose one of {SCHEDULES}")
    f32 = xp.float32
    c, lr, warmup, total = (xp.asarray(v, f32) for v in (count, s.lr, s.warmup, s.total))
    end, decay_start = xp.asarray(s.end, f32), xp.asarray(s.decay_start, f32)
    warm = lr * c / xp.maximum(warmup, f32(1))
    p = xp.clip((c - warmup) / xp.maximum(total - warmup, f32(1)), f32(0), f32(1))
    if kind == "cosine":
        after = end + (lr - end) * f32(0.5) * (f32(1) + xp.cos(f32(math.pi) * p))
    elif kind == "linear":
        after = end + (lr - end) * (f32(1) - p)
    elif kind == "constant":
        after = lr
    else:  # wsd
        q = xp.clip((c - decay_start) / xp.maximum(total - decay_start, f32(1)), f32(0), f32(1))
        after = lr + (end - lr) * q
    return xp.where(c < warmup, warm, after).astype(f32)


def learning_rate_schedule(optim_cfg, total_steps: int):
    """count -> learning rate (host numpy float32) of the run's schedule: what gets logged."""
    kind, s = optim_cfg.get("schedule", "cosine"), schedule_inputs(optim_cfg, total_steps)
    return lambda count: float(learning_rate(kind, count, s, xp=np))


def _scale_by_schedule(kind: str, default: ScheduleInputs) -> optax.GradientTransformationExtraArgs:
    """Multiplies updates by ``-learning_rate(count)``; the numbers come from the update's
    ``schedule=`` argument when given (traced), else ``default``. Its state is optax's
    ``ScaleByScheduleState`` (the same tree as ``optax.adamw`` with a schedule)."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, schedule=None, **extra):
        del params, extra
        lr = learning_rate(kind, state.count, default if schedule is None else ScheduleInputs(*schedule))
        updates = jax.tree_util.tree_map(lambda g: (-lr * g).astype(g.dtype), updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """The run's optimizer: clip (when clip_norm > 0), Adam, decoupled weight decay on the
    ``decay_mask`` leaves, then the schedule's learning rate (``optax.adamw``'s order and
    state tree).

    ``update(grads, state, params, schedule=ScheduleInputs)`` takes the schedule's numbers
    as (traced) inputs; without ``schedule`` those of ``optim_cfg`` and ``total_steps``.
    """
    kind = optim_cfg.get("schedule", "cosine")
    if kind not in SCHEDULES:
        raise ValueError(f"optim.schedule={kind!r} is unknown; choose one of {SCHEDULES}")
    decay_embeddings = bool(optim_cfg.get("decay_embeddings", False))
    adamw = optax.chain(
        optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
        optax.add_decayed_weights(optim_cfg.weight_decay, lambda p: decay_mask(p, decay_embeddings)),
        _scale_by_schedule(kind, schedule_inputs(optim_cfg, total_steps)),
    )
    if optim_cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), adamw)
    return adamw
