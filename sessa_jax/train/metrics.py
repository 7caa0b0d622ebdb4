"""Metrics: JSONL + TensorBoard in the run directory (process 0 only) and a progress line."""

from __future__ import annotations

import json
import os
import time

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
        if self.enabled:
            self._file.close()
            self._tb.close()
            if self.mirror is not None:
                self.mirror.close()


def _tokens_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s / 1e3:.1f}k tok/s" if tokens_per_s >= 1e3 else f"{tokens_per_s:.0f} tok/s"


class Progress:
    """``step 10/300 | loss 2.345 | acc 0.120 | 0.21 s/step | 12.3k tok/s | eta 1m23s`` lines.

    Printed from the first step on: that line's rate runs from the loop's start, so it
    includes compilation (marked ``incl. compile``); later lines time from the first step.
    """

    def __init__(self, total_steps: int, tokens_per_step: int, start_step: int, enabled: bool = True):
        self.total, self.tokens_per_step = total_steps, tokens_per_step
        self.enabled = enabled and jax.process_index() == 0
        self._t0, self._s0, self._first = time.perf_counter(), start_step, True

    def line(self, step: int, metrics: dict) -> str:
        now = time.perf_counter()
        first = self._first
        rate = (step - self._s0) / max(now - self._t0, 1e-9)
        if first:  # later rates exclude compilation: time from here
            self._t0, self._s0, self._first = now, step, False
        parts = [f"step {step}/{self.total}", f"loss {metrics['loss']:.4f}"]
        if "accuracy" in metrics:
            parts.append(f"acc {metrics['accuracy']:.3f}")
        if rate > 0:
            parts += [f"{1 / rate:.3g} s/step", _tokens_rate(rate * self.tokens_per_step),
                      f"eta {format_duration((self.total - step) / rate)}" + (" (incl. compile)" if first else "")]
        return " | ".join(parts)

    def print(self, step: int, metrics: dict) -> None:
        text = self.line(step, metrics)
        if self.enabled:
            print(text, flush=True)
