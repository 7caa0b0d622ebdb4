"""Resume guard: the run config saved with a checkpoint against the one resuming it.

Keys fall in three groups:

* ``FREE`` keys never change what a run computes (logging, checkpoint cadence, the
  device mesh, loader threads): a change is accepted and logged.
* ``ALLOWABLE`` keys change the optimisation but leave the data stream and the model's
  parameters meaningful (``train.steps``, the optimizer, ``data.batch_size``, compute
  dtype, solver choice): a change is an error unless the key is listed in
  ``train.allow_config_change`` (comma-separated).
* every other key (task, data seed and source, seq_len, model shape and kind, train seed)
  alters the data stream or the model: a change is always an error whose fix is a new
  workdir.

The data sources themselves (files and sizes, not only their paths) are compared by
``check_sources`` when the train iterator's state is restored: a changed corpus or shard set is
refused unless ``data.allow_changed_sources`` is set.

Pure Python (no JAX), so ``train.config`` validates ``allow_config_change`` at load time.
"""

from __future__ import annotations

import json
import logging

FREE_PREFIXES = ("mesh.", "distributed.", "metrics.")
FREE = frozenset(
    {
        "train.log_every",
        "train.progress",
        "train.eval_every",
        "train.eval_batches",
        "train.allow_config_change",
        "train.profile_steps",
        "train.compilation_cache",
        "checkpoint.every",
        "checkpoint.keep",
        "checkpoint.async_save",
        "data.num_threads",
        "data.prefetch",
        "data.allow_changed_sources",
        "data.text.verify_checksums",
    }
)
ALLOWABLE = frozenset(
    {
        "train.steps",
        "train.loss_chunk",  # the same loss up to float32 summation order
        "data.batch_size",  # the data position is saved in examples: a new batch size neither skips nor repeats
        "optim.lr",
        "optim.warmup_steps",
        "optim.min_lr_ratio",
        "optim.weight_decay",
        "optim.b1",
        "optim.b2",
        "optim.eps",
        "optim.clip_norm",
        "optim.grad_accum",
        "optim.schedule",
        "optim.decay_fraction",
        "optim.decay_embeddings",
        "model.dtype",
        "model.remat",
        "model.solver",
        "model.chunk_size",
        "model.leaf_size",
        "model.feedback_precision",
        "model.max_len",
    }
)


class ResumeError(ValueError):
    """The workdir's checkpoint cannot be resumed with this config; names keys and the fix."""


class DataChangedError(ResumeError):
    """The data sources differ from those the checkpoint was trained on; names the change and the flag."""


def _describe_sources(saved: dict, now: dict) -> str:
    if saved.get("entries") is not None and now.get("entries") is not None:
        a = {e[0]: e[1:] for e in saved["entries"]}
        b = {e[0]: e[1:] for e in now["entries"]}
        parts = []
        for label, names in (
            ("removed", sorted(set(a) - set(b))),
            ("added", sorted(set(b) - set(a))),
            ("changed", sorted(k for k in set(a) & set(b) if a[k] != b[k])),
        ):
            if names:
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                parts.append(f"{label}: {shown}")
        if parts:
            return "; ".join(parts)
    return (
        f"saved {saved.get('files')} files, {saved.get('bytes')} bytes (digest {str(saved.get('digest'))[:12]}); "
        f"now {now.get('files')} files, {now.get('bytes')} bytes (digest {str(now.get('digest'))[:12]})"
    )


def check_sources(saved: dict | None, now: dict | None, allowed: bool, log=None) -> None:
    """Refuses a resume whose data sources differ from the checkpoint's.

    ``saved``/``now``: ``sessa_jax.data.pipeline.source_fingerprint`` dicts (None: generated
    data, nothing to compare). A difference raises DataChangedError naming the files and the
    flag ``data.allow_changed_sources``; with ``allowed`` it is logged instead (``log``, default
    the ``logging`` module's warning).
    """
    if saved is None or now is None or saved.get("digest") == now.get("digest"):
        return
    change = _describe_sources(saved, now)
    if allowed:
        (log or logging.getLogger(__name__).warning)(
            f"resume: the data sources changed since the checkpoint ({change}); data.allow_changed_sources=True, "
            f"so training goes on from the saved position over the new data"
        )
        return
    raise DataChangedError(
        f"the data sources differ from those the checkpoint was trained on ({change}), so resuming would read "
        f"another stream from the saved position. Fix: restore the original data, or pass "
        f"--config.data.allow_changed_sources=True to continue over the new data, or start a new --workdir"
    )


def parse_allowed(value: str) -> list[str]:
    """``train.allow_config_change`` ("train.steps,optim.lr") -> list of keys ("" -> [])."""
    return [k.strip() for k in str(value or "").split(",") if k.strip()]


def check_allowed_keys(value: str) -> None:
    """ValueError naming any listed key that is not one of ``ALLOWABLE`` (free keys need no listing)."""
    for key in parse_allowed(value):
        if key in FREE or key.startswith(FREE_PREFIXES):
            continue
        if key not in ALLOWABLE:
            raise ValueError(
                f"train.allow_config_change lists {key!r}, which cannot change safely on resume (it alters the "
                f"data stream or the model); keys that may be listed: {sorted(ALLOWABLE)}; for any other change "
                f"start a new --workdir"
            )


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a.b.c": value} for a nested dict (a run config's ``to_dict()``)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare(saved: dict, new: dict) -> dict[str, tuple]:
    """{dotted key: (saved value, new value)} for every key whose value differs.

    A key missing on one side (a config saved by an older version) is not a change. Both
    sides go through JSON first (the saved one did), so a tuple equals its list.
    """
    a, b = flatten(json.loads(json.dumps(saved))), flatten(json.loads(json.dumps(new)))
    return {k: (a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]}


def check_resume(saved: dict, new: dict, saved_step: int, workdir: str, log=print) -> None:
    """Raises ResumeError naming every changed key that the new config does not allow.

    ``saved``/``new``: resolved run configs as dicts; ``saved_step`` the checkpoint step.
    Free changes and allowed changes are logged. A saved step beyond ``train.steps`` is an
    error too (the run would stop at once having done nothing).
    """
    changes = compare(saved, new)
    allowed = set(parse_allowed(new.get("train", {}).get("allow_config_change", "")))
    free = {k: v for k, v in changes.items() if k in FREE or k.startswith(FREE_PREFIXES)}
    opted = {k: v for k, v in changes.items() if k in ALLOWABLE and k in allowed}
    refused = {k: v for k, v in changes.items() if k not in free and k not in opted}
    if refused:
        lines = [
            f"  {k}: saved {a!r}, now {b!r}" + ("" if k in ALLOWABLE else "  (alters the data or the model)")
            for k, (a, b) in refused.items()
        ]
        can = sorted(k for k in refused if k in ALLOWABLE)
        fix = f"start a new --workdir (the checkpoint in {workdir!r} was trained with the saved values)"
        if can and len(can) == len(refused):
            fix = f"to resume with the new values pass --config.train.allow_config_change={','.join(can)}, or {fix}"
        elif can:
            fix += f"; of these, only {can} could change on resume (via --config.train.allow_config_change)"
        raise ResumeError(
            f"the config differs from the one saved with step {saved_step} in {workdir!r}:\n"
            + "\n".join(lines)
            + f"\nFix: {fix}; or run again with the saved values"
        )
    for k, (a, b) in {**free, **opted}.items():
        log(f"resume: {k} changed from {a!r} to {b!r}")
    steps = new.get("train", {}).get("steps")
    if steps is not None and saved_step > steps:
        raise ResumeError(
            f"{workdir!r} holds a checkpoint at step {saved_step}, beyond train.steps={steps}; raise train.steps "
            f"(with --config.train.allow_config_change=train.steps) or use a new --workdir"
        )
