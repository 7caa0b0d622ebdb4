"""The training loop: resume, jitted steps, one-step-late metrics, eval, checkpoints, SIGTERM."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import jax

from sessa_jax import sharding
from sessa_jax.data import EVAL, TRAIN, global_batch, make_dataset, make_iterator
from sessa_jax.distributed import maybe_initialize
from sessa_jax.train import checkpoint as ckpt
from sessa_jax.train import workdir as wd
from sessa_jax.train.config import model_config, resolve, validate
from sessa_jax.train.metrics import MetricsWriter, Progress, format_duration
from sessa_jax.train.optimizer import learning_rate_schedule, make_optimizer
from sessa_jax.train.state import TrainState, abstract_state, build_model, create_state, state_shardings
from sessa_jax.train.step import eval_step, make_train_step


class NonFiniteError(FloatingPointError):
    """Loss or gradient became NaN/Inf; nothing from that step was saved."""


@dataclasses.dataclass
class RunResult:
    step: int  # last completed step
    train: dict  # metrics of the last step
    eval: dict  # final eval metrics ({} when eval_batches == 0)
    interrupted: bool  # stopped by SIGTERM
    seconds: float


class _Sigterm:
    """Sets a flag on SIGTERM; the loop saves at the current step and returns."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _quiet(*args, **kwargs):
    pass


def evaluate(state: TrainState, eval_data, num_batches: int, sharding) -> dict:
    """Mean loss and accuracy (weighted positions only) over the first batches of ``eval_data``
    (the eval split's dataset from ``make_dataset(data_cfg, EVAL)``; read from its start each call)."""
    totals = dict(loss_sum=0.0, correct_sum=0.0, weight_sum=0.0)
    it = iter(eval_data)
    for _ in range(num_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        sums = jax.device_get(eval_step(state, global_batch(batch, sharding)))
        for k in totals:
            totals[k] += float(sums[k])
    denom = max(totals["weight_sum"], 1.0)
    return dict(eval_loss=totals["loss_sum"] / denom, eval_accuracy=totals["correct_sum"] / denom)


def train(cfg, workdir: str, log=print) -> RunResult:
    """Trains ``cfg`` in ``workdir``, resuming from its latest complete checkpoint.

    The state is laid out on the ``cfg.mesh`` device mesh (``sessa_jax.sharding``); a
    checkpoint saved under any other mesh restores onto this one. The workdir is locked
    for the run (``train.workdir``); a resume first compares the saved config with ``cfg``
    (``train.resume_guard``) and falls back past damaged checkpoints (``train.checkpoint``).
    """
    maybe_initialize(cfg.distributed, log)  # before any JAX call: the lock is taken on process 0 only
    with wd.claimed(workdir, log if jax.process_index() == 0 else _quiet):
        return _train(cfg, workdir, log)


def _train(cfg, workdir: str, log=print) -> RunResult:
    t_start = time.perf_counter()
    maybe_initialize(cfg.distributed, log)  # no-op unless a cluster or coordinator is configured
    if jax.process_index() != 0:
        log = _quiet  # logs from process 0 only
    validate(cfg, jax.process_count(), jax.device_count())
    # Built once, before anything compiles: an eval split that cannot fill one batch fails now.
    eval_data = make_dataset(cfg.data, EVAL) if cfg.train.eval_batches else None
    resolved = resolve(cfg)
    steps, accum = cfg.train.steps, cfg.optim.grad_accum
    model, tx = build_model(resolved), make_optimizer(cfg.optim, steps)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    sharding.validate_mesh(mesh, model_config(resolved), cfg.data.batch_size, accum, kind=cfg.model.kind)
    data_sharding = sharding.batch_sharding(mesh)
    shardings = state_shardings(model, tx, cfg.train.seed, cfg.data.seq_len, mesh)
    step_fn = make_train_step(shardings, data_sharding, accum)

    train_iter = make_iterator(cfg.data, TRAIN)
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), cfg.checkpoint.every, cfg.checkpoint.keep,
                                cfg.checkpoint.async_save)
    if manager.latest_step() is not None:
        abstract = abstract_state(model, tx, cfg.train.seed, cfg.data.seq_len, shardings)
        state = ckpt.restore(manager, abstract, train_iter, config=resolved.to_dict(), log=log)
        log(f"resumed from {manager.directory} at step {int(state.step)}")
    else:
        state = create_state(model, tx, cfg.train.seed, cfg.data.seq_len, sharding=shardings)
    start = int(state.step)
    config_dict = resolved.to_dict()
    writer = MetricsWriter(workdir, start_step=start)
    progress = Progress(steps, cfg.data.batch_size * cfg.data.seq_len, start, cfg.train.progress)
    schedule = learning_rate_schedule(cfg.optim, steps)
    pending: list[tuple[int, dict]] = []  # dispatched steps whose metrics are not read yet
    last = {}

    def flush():
        nonlocal last
        for s, m in pending:
            m = jax.device_get(m)
            if not bool(m["finite"]):
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {s} (loss={float(m['loss'])}, grad_norm="
                    f"{float(m['grad_norm'])}); stopped without saving it. Lower optim.lr, keep "
                    f"optim.clip_norm > 0 or use model.dtype='float32'"
                )
            last = dict(loss=float(m["loss"]), accuracy=float(m["accuracy"]), grad_norm=float(m["grad_norm"]),
                        lr=float(schedule(s - 1)))
            writer.write(s, last, tensorboard=s % cfg.train.log_every == 0 or s == steps)
            if s % cfg.train.log_every == 0 or s == steps:
                progress.print(s, last)
        pending.clear()

    interrupted, eval_metrics = False, {}
    try:
        with _Sigterm() as sigterm, sharding.activate(mesh):
            step = start
            while step < steps and not sigterm.hit:
                batch = global_batch(next(train_iter), data_sharding)
                state, metrics = step_fn(state, batch)
                step += 1
                if len(pending) >= 1:  # read step-1 metrics only after step is dispatched
                    flush()
                pending.append((step, metrics))
                if cfg.train.step_delay_s:
                    time.sleep(cfg.train.step_delay_s)
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < steps:
                    flush()
                    e = evaluate(state, eval_data, cfg.train.eval_batches, data_sharding)
                    writer.write(step, e)
                    log(f"eval @ {step}: loss {e['eval_loss']:.4f} | acc {e['eval_accuracy']:.3f}")
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                    flush()  # never save a step whose metrics were not checked
                    ckpt.save(manager, state, train_iter, config_dict)
            flush()
            interrupted = sigterm.hit
            if manager.latest_step() != step:
                ckpt.save(manager, state, train_iter, config_dict, force=True)
            if interrupted:
                log(f"SIGTERM: saved step {step} to {manager.directory}; exiting")
            elif cfg.train.eval_batches:
                eval_metrics = evaluate(state, eval_data, cfg.train.eval_batches, data_sharding)
                if not wd.has_record(workdir, step, "eval_loss"):  # a re-run of a finished workdir adds none
                    writer.write(step, eval_metrics)
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
    seconds = time.perf_counter() - t_start
    if not interrupted:
        log(f"done: {step} steps in {format_duration(seconds)}"
            + (f" | eval loss {eval_metrics['eval_loss']:.4f} | eval acc {eval_metrics['eval_accuracy']:.3f}"
               if eval_metrics else ""))
    return RunResult(step=step, train=last, eval=eval_metrics, interrupted=interrupted, seconds=seconds)
