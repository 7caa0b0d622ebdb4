"""What a run reports: start-up summary, step timing, MFU, peak memory, profiler, W&B, XLA cache.

MFU (model FLOPs utilisation) uses the PaLM (Chowdhery et al. 2022, appendix B) estimate

    flops_per_token = 6 * N + 12 * L * D * T

N = all parameters (the tied head is a real matmul), L layers, D width, T sequence length:
6N for the forward and backward matmuls, 12 L D T for attention scores and values. Sessa's
feedback solve and the Mamba scan are not counted, so MFU is a lower bound for those mixers.
MFU = flops_per_token * tokens/s / (devices * peak), the per-device peak from
``metrics.peak_tflops`` or ``PEAK_TFLOPS`` (dense bf16, by ``device_kind``); with neither
(e.g. CPU) MFU is not reported.
"""

from __future__ import annotations

import os
import secrets
import shutil
import string
import sys
import time

import jax

from sessa_jax.train import workdir as wd

# Dense bf16 peak TFLOP/s per device (vendor data sheets), matched by substring of device_kind.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("V100", 125.0),
    ("TPU v6", 918.0),
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v4", 275.0),
    ("TPU v3", 123.0),
)


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
    """Per-device peak TFLOP/s: ``override`` when > 0, else the table entry, else None."""
    if override > 0:
        return float(override)
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


def flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the formula in the module docstring."""
    return 6.0 * n_params + 12.0 * n_layers * d_model * seq_len


def peak_memory_gib() -> float | None:
    """Largest ``peak_bytes_in_use`` over local devices in GiB; None where the backend has no stats."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) / 2**30 if peaks else None


def startup_summary(
    *,
    workdir: str,
    mesh,
    n_params: int,
    tokens_per_step: int,
    steps: int,
    start_step: int,
    config_name: str = "",
    tokenizer: str = "",
    compile_cache: str = "",
) -> list[str]:
    """Lines printed once before training: where, on what, how big, resumed or fresh."""
    devices = jax.devices()
    kind = devices[0].device_kind if devices else "?"
    axes = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    lines = [
        f"sessa-jax {_version()} | jax {jax.__version__} | {jax.process_count()} process(es), "
        f"{jax.device_count()} x {kind} ({jax.default_backend()})",
        f"mesh {axes} | params {n_params:,} | tokens/step {tokens_per_step:,} | steps {steps:,}",
        f"workdir {workdir if wd.is_remote(workdir) else os.path.abspath(workdir)}"
        + (f" | config {config_name}" if config_name else "")
        + (f" | tokenizer {tokenizer}" if tokenizer else ""),
        (f"start step {start_step} (resumed)" if start_step else "start step 0 (fresh, no checkpoint)")
        + (f" | compilation cache {compile_cache}" if compile_cache else " | compilation cache off"),
    ]
    return lines


def _version() -> str:
    from sessa_jax import __version__

    return __version__


class StepClock:
    """Wall time of each step, from the moments the loop holds each step's results.

    The loop blocks on a step's metrics right after dispatching it and then calls
    ``tick(step)``: a step's time runs from the previous tick (or from ``restart``) to its
    own, so it covers loading its batch, dispatch and the device's work, and nothing else.
    ``restart(step)`` after an eval, a checkpoint save or anything else that is not
    training makes the next step time from there. The first step after the clock's start
    includes compilation; ``mean_s`` (what the ETA uses) leaves it out.
    """

    def __init__(self, start_step: int):
        self._t, self._s = time.perf_counter(), start_step
        self.compile_step = start_step + 1
        self.first_step_s: float | None = None
        self._sum, self._n = 0.0, 0

    def tick(self, step: int) -> float:
        """Seconds per step since the previous tick or restart (``step``: the step just read)."""
        now = time.perf_counter()
        dt = (now - self._t) / max(step - self._s, 1)
        if step == self.compile_step:
            self.first_step_s = dt
        else:
            self._sum, self._n = self._sum + dt * (step - self._s), self._n + (step - self._s)
        self._t, self._s = now, step
        return dt

    def restart(self, step: int) -> None:
        """The next step times from now (call after work that is not a training step)."""
        self._t, self._s = time.perf_counter(), step

    def mean_s(self) -> float | None:
        """Mean seconds per step after compilation (None before the second step)."""
        return self._sum / self._n if self._n else None


def step_scalars(
    step_time_s: float, tokens_per_step: int, flops_token: float, n_devices: int, peak: float | None, log=None
) -> dict:
    """step_time_s, tokens_per_s, (mfu) and (peak_memory_gib) for metrics.jsonl/TensorBoard.

    An MFU above 1 is impossible: the device peak must be too low (``metrics.peak_tflops``
    or the device table); it is then left out and ``log`` (when given) says so.
    """
    tps = tokens_per_step / max(step_time_s, 1e-12)
    out = dict(step_time_s=step_time_s, tokens_per_s=tps)
    if peak:
        mfu = flops_token * tps / (n_devices * peak * 1e12)
        if 0 < mfu <= 1:
            out["mfu"] = mfu
        elif log is not None:
            log(
                f"warning: MFU {mfu:.3g} > 1 at {step_time_s:.4g} s/step, so the device peak of {peak:g} TFLOP/s "
                f"is too low; not logging mfu. Set --config.metrics.peak_tflops to the device's dense bf16 peak"
            )
    mem = peak_memory_gib()
    if mem is not None:
        out["peak_memory_gib"] = mem
    return out


class Profiler:
    """``train.profile_steps=a:b``: a ``jax.profiler`` trace of steps a..b-1 in ``directory``."""

    def __init__(self, window: tuple[int, int] | None, directory: str, log=print):
        self.window, self.directory, self.log, self.active = window, directory, log, False

    def before(self, step: int) -> None:
        """Call before dispatching ``step`` (1-based)."""
        if self.window and step == self.window[0] and not self.active:
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, block_on=None) -> None:
        """Call after dispatching ``step``; stops (after ``block_on`` is ready) at b-1."""
        if self.active and step >= self.window[1] - 1:
            self.stop(block_on)

    def stop(self, block_on=None) -> None:
        if not self.active:
            return
        if block_on is not None:
            jax.block_until_ready(block_on)
        jax.profiler.stop_trace()
        self.active = False
        self.log(
            f"profile of steps {self.window[0]}..{self.window[1] - 1} written to {self.directory} "
            f"(open with TensorBoard's profile plugin or xprof)"
        )


def enable_compilation_cache(setting: str, workdir: str) -> str:
    """Turns on JAX's persistent compilation cache; returns its directory ('' = off).

    ``setting``: "auto" (``WORKDIR/compilation_cache``), a path, or "" (off). A cache
    directory set earlier in this process (JAX_COMPILATION_CACHE_DIR or another run) is kept:
    JAX reads it once. A ``gs://`` cache (under a bucket workdir, or given) is used in place:
    JAX reads and writes it through ``etils.epath``, and it outlives the VM.
    """
    if not setting:
        return ""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = wd.normalize(wd.join(workdir, "compilation_cache") if setting == "auto" else setting)
    if not wd.is_remote(path):
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def new_run_id() -> str:
    """A fresh W&B run id: 8 characters of [a-z0-9], the form W&B generates itself (made here
    because wandb's own helper is not a stable API: ``wandb.util.generate_id`` is gone in 0.31)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbLogger:
    """Optional W&B mirror of the metrics (``metrics.wandb=True``; process 0 only).

    The run id is kept in ``WORKDIR/wandb_run_id`` so a resumed training run appends to the
    same W&B run (``resume="allow"``).
    """

    def __init__(self, workdir: str, project: str, entity: str, config: dict):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("metrics.wandb=True needs the wandb package: pip install 'sessa-jax[wandb]'") from e
        os.makedirs(wd.local_dir(workdir), exist_ok=True)  # wandb keeps its files on a local disk
        id_file = wd.join(workdir, "wandb_run_id")
        if wd.exists(id_file):
            run_id = wd.read_bytes(id_file).decode().strip()
        else:
            run_id = new_run_id()
            wd.write_bytes(id_file, run_id.encode())
        self.run_id = run_id
        self.run = wandb.init(
            project=project, entity=entity or None, id=run_id, resume="allow", config=config, dir=wd.local_dir(workdir)
        )

    def log(self, step: int, scalars: dict) -> None:
        self.run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

    def close(self) -> None:
        self.run.finish()


def accuracy_baselines(data_cfg, vocab_size: int) -> str:
    """One line saying what the eval accuracy of a ``data_cfg`` task counts and what chance scores.

    MQAR: the answer positions; chance is one of the task's values, and a model that knows
    which values the context holds but not which key each belongs to scores
    ``mqar.no_association_accuracy``. SymbolSoup: the class position, chance one of the classes.
    Text: every next token, against a uniform guess over the ``vocab_size`` ids.
    """
    if data_cfg.task == "mqar":
        from sessa_jax.data.mqar import no_association_accuracy

        m = data_cfg.mqar
        values = m.vocab_size - m.vocab_size // 2
        blind = no_association_accuracy(m.num_kv_pairs, values)
        return (
            f"acc counts the answers to the queries: chance {1 / values:.3f} (1 of {values} values); "
            f"{blind:.3f} for a model that knows the context's values but not which key each belongs to"
        )
    if data_cfg.task == "symbol_soup":
        from sessa_jax.data.symbol_soup import NUM_CLASSES

        return f"acc counts the class predicted for each text: chance {1 / NUM_CLASSES:.3f} (1 of {NUM_CLASSES})"
    return (
        f"acc counts next tokens predicted right: chance {1 / vocab_size:.4f} (a uniform guess over {vocab_size} ids)"
    )


def _script(name: str, module: str) -> str:
    """How to call this installation's console script ``name``: bare when PATH finds this one, else its
    path beside this interpreter (relative when under the working directory), else ``python -m module``."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    found = shutil.which(name)
    if found and os.path.realpath(found) == os.path.realpath(here):
        return name
    if os.path.isfile(here):
        rel = os.path.relpath(here)
        return rel if not rel.startswith("..") else here
    return f"{sys.executable} -m {module}"


def mqar_query(data_cfg) -> tuple[str, int, int]:
    """(prompt, key, value): the context of the first held-out MQAR example, then ``0 0`` and one of
    its keys, as ``sessa-sample`` takes it (space-separated ids); a trained model answers ``value``."""
    from sessa_jax.data import EVAL
    from sessa_jax.data.pipeline import make_source

    k = data_cfg.mqar.num_kv_pairs
    context = [int(t) for t in make_source(data_cfg, EVAL)[0]["inputs"][: 2 * k]]
    j = min(2, k - 1)
    key, value = context[2 * j], context[2 * j + 1]
    return " ".join(map(str, [*context, 0, 0, key])), key, value


def closing_lines(cfg, workdir: str, step: int, vocab_size: int) -> list[str]:
    """Lines printed after a finished run: what its accuracy means, where its files are, what to run next."""
    run = workdir
    lines = [
        accuracy_baselines(cfg.data, vocab_size),
        f"run: {run} (checkpoints/ up to step {step}, metrics.jsonl, train.log, TensorBoard in tb/)",
        f"next: {_script('sessa-eval', 'sessa_jax.train.evaluate')} --run {run}",
    ]
    sample = _script("sessa-sample", "sessa_jax.sample")
    if cfg.data.task == "mqar":
        prompt, key, value = mqar_query(cfg.data)
        lines.append(
            f'      {sample} --run {run} --prompt "{prompt}" --max_new_tokens 1 --temperature 0'
            f"   # key {key} -> its value {value}"
        )
    elif cfg.data.task == "text":
        lines.append(f'      {sample} --run {run} --prompt "def " --max_new_tokens 200')
    return lines
