"""Exact resume after SIGKILL, and SIGTERM saving the current step (runs train.py in a subprocess)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np

from sessa_jax.train import checkpoint as ckpt
from sessa_jax.train import loop
from sessa_jax.train.config import load_config
from sessa_jax.train.metrics import read_jsonl
from tests.support.processes import TIMEOUT_S, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLOW_TRAIN = os.path.join(REPO, "tests", "support", "slow_train.py")  # train.py, sleeping after each step
ARGS = ["train.steps=40", "checkpoint.every=10", "train.progress=False", "checkpoint.async_save=True"]


def _start(workdir, extra=(), step_delay_s=0.1):
    cmd = [
        sys.executable,
        SLOW_TRAIN,
        str(step_delay_s),
        "--config=tiny",
        f"--workdir={workdir}",
        *[f"--config.{a}" for a in (*ARGS, *extra)],
    ]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _complete_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _losses_by_step(workdir):
    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    reference = str(tmp_path / "reference")
    loop.train(load_config("tiny", ARGS), reference, log=lambda s: None)

    killed = str(tmp_path / "killed")
    proc = _start(killed)
    wait_for(proc, lambda: len(_complete_steps(killed)) >= 1 and _complete_steps(killed)[-1] >= 10)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n = _complete_steps(killed)[-1]
    assert n < 40
    with open(os.path.join(killed, "checkpoints", str(n), "data", "process_0-of-1.json")) as f:
        # the data position is saved in examples: exactly n batches of data.batch_size=8
        assert json.load(f) == {"examples": n * 8, "batch_size": 8}

    result = loop.train(load_config("tiny", ARGS), killed, log=lambda s: None)  # restart: resumes at n
    assert result.step == 40
    ref, got = _losses_by_step(reference), _losses_by_step(killed)
    assert sorted(got) == list(range(1, 41))  # no step missing or logged twice
    assert [got[s] for s in range(n + 1, 41)] == [ref[s] for s in range(n + 1, 41)]  # bit-identical
    assert [got[s] for s in range(1, n + 1)] == [ref[s] for s in range(1, n + 1)]


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path / "term")
    proc = _start(workdir, ["train.steps=400", "model.kind=transformer"])
    metrics = os.path.join(workdir, "metrics.jsonl")
    wait_for(proc, lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 12)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, out
    last = max(_losses_by_step(workdir))
    assert _complete_steps(workdir)[-1] == last and last < 400
    assert f"SIGTERM: saved step {last}" in out
    params = ckpt.restore_params(os.path.join(workdir, "checkpoints"))
    assert all(np.all(np.isfinite(x)) for x in __import__("jax").tree_util.tree_leaves(params))
