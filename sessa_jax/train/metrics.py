"""Metrics: JSONL + TensorBoard in the run directory (process 0 only) and a progress line."""

from __future__ import annotations

import json
import os

import jax

from sessa_jax.train import workdir as wd


def read_jsonl(path: str) -> list[dict]:
    """All records of a metrics.jsonl file (a local path or ``gs://`` URL)."""
    return [json.loads(line) for line in wd.read_bytes(path).decode().splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsWriter:
    """Writes ``metrics.jsonl`` and TensorBoard events under ``workdir``.

    On resume from ``start_step`` it drops JSONL records of later steps (written by the
    interrupted run after its last checkpoint) so the file reads as one clean run. In a
    bucket the file is uploaded whole by ``sync`` (called before each checkpoint), by
    ``close`` and at most once a minute in between.
    """

    def __init__(self, workdir: str, start_step: int = 0, enabled: bool | None = None, mirror=None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.mirror = mirror  # e.g. report.WandbLogger: gets what TensorBoard gets
        self.path = wd.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        if not wd.is_remote(workdir):
            os.makedirs(workdir, exist_ok=True)
        if wd.exists(self.path):
            kept = [r for r in read_jsonl(self.path) if r["step"] <= start_step]
            wd.write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(wd.join(workdir, "tb"), purge_step=start_step + 1 if start_step else None)
        self._file = wd.open_append(self.path)

    def write(self, step: int, scalars: dict, tensorboard: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if tensorboard:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), int(step))
            if self.mirror is not None:
                self.mirror.log(step, scalars)

    def sync(self) -> None:
        """Makes every record written so far durable (in a bucket: uploads metrics.jsonl)."""
        if self.enabled:
            self._file.sync()
            self._tb.flush()

    def close(self) -> None:
        """Closes the JSONL file, TensorBoard and the mirror, each even if another fails; the
        first failure is raised afterwards."""
        if not self.enabled:
            return
        errors = []
        for close in (self._file.close, self._tb.close, self.mirror.close if self.mirror is not None else None):
            if close is None:
                continue
            try:
                close()
            except Exception as e:  # noqa: BLE001 - close the rest, then raise the first
                errors.append(e)
        if errors:
            raise errors[0]


def _tokens_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s / 1e3:.1f}k tok/s" if tokens_per_s >= 1e3 else f"{tokens_per_s:.0f} tok/s"


class Progress:
    """``step 10/300 | loss 2.345 | acc 0.120 | 0.21 s/step | 12.3k tok/s | eta 1m23s`` lines.

    Printed from the first step on. That step includes compilation: its line shows its own
    time, marked ``incl. compile``, and no ETA. Later lines show the mean step time after
    compilation (``report.StepClock.mean_s``), and the ETA is the remaining steps at that
    rate.
    """

    def __init__(self, total_steps: int, tokens_per_step: int, start_step: int, enabled: bool = True):
        self.total, self.tokens_per_step = total_steps, tokens_per_step
        self.enabled = enabled and jax.process_index() == 0

    def line(self, step: int, metrics: dict, mean_step_s: float | None = None) -> str:
        """``metrics``: the step's scalars (loss, accuracy, step_time_s); ``mean_step_s``:
        seconds per step after compilation, None on the step that compiled."""
        parts = [f"step {step}/{self.total}", f"loss {metrics['loss']:.4f}"]
        if "accuracy" in metrics:
            parts.append(f"acc {metrics['accuracy']:.3f}")
        per_step = mean_step_s if mean_step_s else metrics.get("step_time_s")
        if per_step:
            parts += [f"{per_step:.3g} s/step", _tokens_rate(self.tokens_per_step / per_step)]
            parts.append(f"eta {format_duration((self.total - step) * per_step)}" if mean_step_s else "incl. compile")
        return " | ".join(parts)

    def print(self, step: int, metrics: dict, mean_step_s: float | None = None) -> None:
        text = self.line(step, metrics, mean_step_s)
        if self.enabled:
            print(text, flush=True)
