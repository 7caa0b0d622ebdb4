"""The training loop: resume, jitted steps, per-step metrics and timing, eval, checkpoints, SIGTERM."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import jax
import numpy as np

from sessa_jax import sharding
from sessa_jax.data import EVAL, TRAIN, global_batch, make_dataset, make_iterator
from sessa_jax.data.tokenizers import ensure_tokenizer
from sessa_jax.distributed import maybe_initialize
from sessa_jax.train import checkpoint as ckpt
from sessa_jax.train import report
from sessa_jax.train import workdir as wd
from sessa_jax.train.config import model_config, parse_profile_steps, resolve, validate
from sessa_jax.train.evaluate import evaluate as evaluate_params
from sessa_jax.train.evaluate import make_eval_step, token_bytes_for
from sessa_jax.train.metrics import MetricsWriter, Progress, format_duration
from sessa_jax.train.optimizer import learning_rate_schedule, make_optimizer, schedule_inputs
from sessa_jax.train.state import abstract_state, build_model, create_state, state_shardings
from sessa_jax.train.step import make_train_step


class NonFiniteError(FloatingPointError):
    """Loss or gradient became NaN/Inf; nothing from that step was saved."""


@dataclasses.dataclass
class RunResult:
    step: int  # last completed step
    train: dict  # metrics of the last step
    eval: dict  # final eval metrics ({} when stopped by SIGTERM)
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


class _Once:
    """A log function that passes on its first message only (a warning that would repeat every step)."""

    def __init__(self, log):
        self.log, self.done = log, False

    def __call__(self, message: str) -> None:
        if not self.done:
            self.done = True
            self.log(message)


def _close_all(closers, failure: BaseException | None, log) -> None:
    """Runs every ``(name, close)``. With ``failure`` already propagating, a close that fails
    too (a full disk fails the flushes after the write that hit it) is logged in one line
    and the first error stays the one reported; otherwise the first close error is raised
    after all have run."""
    first = None
    for name, close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - every resource gets closed
            if failure is not None:
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                log(f"warning: closing the {name} failed as well, after the error below: {type(e).__name__}: {reason}")
            elif first is None:
                first = e
    if first is not None:
        raise first


def _eval_line(step: int, e: dict) -> str:
    per = (
        f"bits/byte {e['eval_bits_per_byte']:.4f}"
        if "eval_bits_per_byte" in e
        else f"bits/token {e['eval_bits_per_token']:.4f}"
    )
    return (
        f"eval @ {step}: loss {e['eval_loss']:.4f} | ppl {e['eval_perplexity']:.3f} | {per} | "
        f"acc {e['eval_accuracy']:.3f} | {int(e['eval_tokens']):,} tokens"
    )


def train(cfg, workdir: str, log=print) -> RunResult:
    """Trains ``cfg`` in ``workdir``, resuming from its latest complete checkpoint.

    The state is laid out on the ``cfg.mesh`` device mesh (``sessa_jax.sharding``); a
    checkpoint saved under any other mesh restores onto this one. The workdir is locked
    for the run (``train.workdir``); a resume first compares the saved config with ``cfg``
    (``train.resume_guard``) and falls back past damaged checkpoints (``train.checkpoint``).
    ``workdir`` may be a ``gs://`` URL (``train.workdir.normalize``).
    """
    workdir = wd.normalize(workdir)  # an unsupported URL is refused before anything is written
    maybe_initialize(cfg.distributed, log)  # before any JAX call: the lock is taken on process 0 only
    with wd.claimed(workdir, log if jax.process_index() == 0 else _quiet):
        return _train(cfg, workdir, log)


def _train(cfg, workdir: str, log=print) -> RunResult:
    t_start = time.perf_counter()
    if jax.process_index() != 0:
        log = _quiet  # logs from process 0 only
    validate(cfg, jax.process_count(), jax.device_count())
    cache_dir = report.enable_compilation_cache(cfg.train.compilation_cache, workdir)
    cfg = ensure_tokenizer(cfg, workdir, log)  # kind=sentencepiece, no path: fit one on the corpus once
    # Built once, before anything compiles: an eval split that cannot fill one batch fails now.
    eval_data = make_dataset(cfg.data, EVAL)
    resolved = resolve(cfg)
    steps, accum = cfg.train.steps, cfg.optim.grad_accum
    model, tx = build_model(resolved), make_optimizer(cfg.optim, steps)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    model_cfg = model_config(resolved)
    sharding.validate_mesh(mesh, model_cfg, cfg.data.batch_size, accum, kind=cfg.model.kind)
    data_sharding = sharding.batch_sharding(mesh)
    shardings = state_shardings(model, tx, cfg.train.seed, cfg.data.seq_len, mesh)
    step_fn = make_train_step(shardings, data_sharding, accum, cfg.train.loss_chunk, schedule_input=True)
    eval_fn = make_eval_step(model.apply, cfg.train.loss_chunk)
    token_bytes = token_bytes_for(cfg.data, model_cfg.vocab_size)  # None: no bits per byte

    def evaluate(state, eval_data, num_batches, sharding):
        return evaluate_params(
            state.params,
            eval_fn,
            eval_data,
            cfg.data.batch_size // jax.process_count(),
            token_bytes,
            num_batches,
            sharding,
        )

    train_iter = make_iterator(cfg.data, TRAIN)
    manager = ckpt.make_manager(
        wd.join(workdir, "checkpoints"), cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.async_save
    )
    if manager.latest_step() is not None:
        abstract = abstract_state(model, tx, cfg.train.seed, cfg.data.seq_len, shardings)
        state = ckpt.restore(manager, abstract, train_iter, config=resolved.to_dict(), log=log)
        log(f"resumed from {manager.directory} at step {int(state.step)}")
    else:
        state = create_state(model, tx, cfg.train.seed, cfg.data.seq_len, sharding=shardings)
    start = int(state.step)
    config_dict = resolved.to_dict()
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    for line in report.startup_summary(
        workdir=workdir,
        mesh=mesh,
        n_params=n_params,
        tokens_per_step=tokens_per_step,
        steps=steps,
        start_step=start,
        tokenizer=cfg.data.tokenizer.kind if cfg.data.task == "text" else "",
        compile_cache=cache_dir,
    ):
        log(line)
    if start >= steps:  # a resume past train.steps was refused by the resume guard: start == steps
        log(
            f"already finished: {workdir} holds step {start} of train.steps={steps}, so there is nothing to train "
            f"(pass a larger --config.train.steps to train on); evaluating the final step"
        )
    wandb = (
        report.WandbLogger(workdir, cfg.metrics.wandb_project, cfg.metrics.wandb_entity, config_dict)
        if cfg.metrics.wandb and jax.process_index() == 0
        else None
    )
    writer = MetricsWriter(workdir, start_step=start, mirror=wandb)
    progress = Progress(steps, tokens_per_step, start, cfg.train.progress)
    clock = report.StepClock(start)
    flops_token = report.flops_per_token(n_params, model_cfg.n_layers, model_cfg.d_model, cfg.data.seq_len)
    peak = report.peak_tflops(jax.devices()[0].device_kind, cfg.metrics.peak_tflops)
    profiler = report.Profiler(
        parse_profile_steps(cfg.train.profile_steps, steps), os.path.join(wd.local_dir(workdir), "profile"), log
    )
    lr_of = learning_rate_schedule(cfg.optim, steps)
    # The schedule's numbers enter the step as inputs: the compiled step does not depend on them.
    schedule = jax.tree_util.tree_map(np.float32, schedule_inputs(cfg.optim, steps))
    mfu_warning = _Once(log)
    last = {}

    def record(s: int, m: dict) -> None:
        """Checks, times and writes step ``s``'s metrics (already on the host)."""
        nonlocal last
        if not bool(m["finite"]):
            raise NonFiniteError(
                f"non-finite loss or gradient at step {s} (loss={float(m['loss'])}, grad_norm="
                f"{float(m['grad_norm'])}); stopped without saving it. Lower optim.lr, keep "
                f"optim.clip_norm > 0 or use model.dtype='float32'"
            )
        last = dict(
            loss=float(m["loss"]), accuracy=float(m["accuracy"]), grad_norm=float(m["grad_norm"]), lr=lr_of(s - 1)
        )
        last.update(
            report.step_scalars(clock.tick(s), tokens_per_step, flops_token, jax.device_count(), peak, log=mfu_warning)
        )
        writer.write(s, last, tensorboard=s % cfg.train.log_every == 0 or s == steps)
        if s % cfg.train.log_every == 0 or s == steps or s == start + 1:
            progress.print(s, last, clock.mean_s())

    interrupted, eval_metrics, failure = False, {}, None
    try:
        with _Sigterm() as sigterm, sharding.activate(mesh):
            step = start
            while step < steps and not sigterm.hit:
                batch = global_batch(next(train_iter), data_sharding)
                profiler.before(step + 1)
                state, metrics = step_fn(state, batch, schedule)
                step += 1
                # Block on this step's results: its time ends when they exist, and a NaN stops
                # the run before anything of this step is saved or evaluated.
                record(step, jax.device_get(metrics))
                profiler.after(step)
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < steps:
                    e = evaluate(state, eval_data, cfg.train.eval_batches, data_sharding)
                    writer.write(step, e)
                    log(_eval_line(step, e))
                    clock.restart(step)  # the eval's time is no step's
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                    writer.sync()  # a bucket's metrics.jsonl holds every step up to the checkpoint
                    ckpt.save(manager, state, train_iter, config_dict)
                    clock.restart(step)
            profiler.stop(block_on=state.step)
            interrupted = sigterm.hit
            if manager.latest_step() != step:
                ckpt.save(manager, state, train_iter, config_dict, force=True)
            if interrupted:
                log(f"SIGTERM: saved step {step} to {manager.directory}; exiting")
            else:
                eval_metrics = evaluate(state, eval_data, cfg.train.eval_batches, data_sharding)
                if not wd.has_record(workdir, step, "eval_loss"):  # a re-run of a finished workdir adds none
                    writer.write(step, eval_metrics)
    except BaseException as e:
        failure = e
        raise
    finally:
        _close_all(
            [
                ("profiler", profiler.stop),
                ("checkpoint manager", manager.wait_until_finished),
                ("checkpoint manager", manager.close),
                ("metrics writer", writer.close),
            ],
            failure,
            log,
        )
    seconds = time.perf_counter() - t_start
    if not interrupted:
        if step > start:
            log(
                f"done: {step - start} steps in {format_duration(seconds)}"
                + (f" (resumed at step {start})" if start else "")
            )
        if eval_metrics:
            log(_eval_line(step, eval_metrics))
        for line in report.closing_lines(cfg, workdir, step, model_cfg.vocab_size):
            log(line)
    return RunResult(step=step, train=last, eval=eval_metrics, interrupted=interrupted, seconds=seconds)
