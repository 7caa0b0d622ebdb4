"""Workdir guards: one run per workdir, writable checkpoints, a torn metrics line,
no duplicate final eval, and clean messages from train.py for errors found after start-up."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from sessa_jax.train import loop
from sessa_jax.train.config import load_config
from sessa_jax.train.metrics import read_jsonl
from sessa_jax.train.workdir import WorkdirError, repair_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = [
    "train.steps=10",
    "checkpoint.every=10",
    "train.progress=False",
    "model.kind=transformer",
    "train.eval_batches=1",
    "checkpoint.async_save=False",
    "optim.warmup_steps=2",
]


def _cfg(*extra):
    return load_config("tiny", [*ARGS, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("wd") / "run")
    loop.train(_cfg(), workdir, log=lambda s: None)
    return workdir


def _copy(finished, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(finished, dst)
    return dst


def _train_py():
    spec = importlib.util.spec_from_file_location("_train_entry", os.path.join(REPO, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_second_run_on_a_locked_workdir_fails_at_once_naming_the_holder(tmp_path):
    workdir = tmp_path / "busy"
    workdir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, os, sys, time\n"
                f"fd = os.open({str(workdir / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()}\\n'.encode())\n"
                "print('locked', flush=True); time.sleep(60)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirError, match=rf"in use by another run \(pid {holder.pid},"):
            loop.train(_cfg(), str(workdir), log=lambda s: None)
    finally:
        holder.kill()
        holder.wait()
    assert not (workdir / "metrics.jsonl").exists()  # nothing was written by the refused run


def test_unwritable_checkpoints_fail_before_step_one(tmp_path):
    workdir = tmp_path / "ro"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("a file where the directory should be")
    with pytest.raises(WorkdirError, match=r"cannot write checkpoints to .*checkpoints"):
        loop.train(_cfg(), str(workdir), log=lambda s: None)
    assert not (workdir / "metrics.jsonl").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_a_read_only_checkpoints_directory_fails_before_step_one(tmp_path):
    workdir = tmp_path / "ro"
    (workdir / "checkpoints").mkdir(parents=True)
    os.chmod(workdir / "checkpoints", 0o500)
    try:
        with pytest.raises(WorkdirError, match=r"cannot write checkpoints"):
            loop.train(_cfg(), str(workdir), log=lambda s: None)
    finally:
        os.chmod(workdir / "checkpoints", 0o700)


def test_a_torn_last_metrics_line_is_dropped_and_a_rerun_adds_no_eval_record(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 11, "lo')  # killed mid-write
    logs = []
    result = loop.train(_cfg(), workdir, log=logs.append)  # the run is finished: nothing to train
    assert result.step == 10
    assert any("torn last line" in s and "metrics.jsonl" in s for s in logs), logs
    records = read_jsonl(path)
    assert [r["step"] for r in records if "eval_loss" in r] == [10]  # one final eval, not one per re-run
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))


def test_a_damaged_metrics_line_that_is_not_the_last_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(WorkdirError, match=r"metrics.jsonl line 2 is not JSON"):
        repair_metrics(str(tmp_path), log=lambda s: None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.mesh.data=2"], r"mesh"),
        (
            ["--config.data.task=text", "--config.data.text.arrayrecord_dir=/nonexistent/shards"],
            r"arrayrecord_dir='/nonexistent/shards' does not exist",
        ),
    ],
)
def test_train_py_reports_errors_after_start_up_without_a_traceback(tmp_path, capsys, overrides, message):
    code = _train_py().main(["--config=tiny", f"--workdir={tmp_path / 'w'}", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_train_py_reports_a_too_small_eval_split(tmp_path, capsys):
    (tmp_path / "doc.txt").write_bytes(b"abcdefgh" * 100)
    code = _train_py().main(
        [
            "--config=tiny",
            f"--workdir={tmp_path / 'w'}",
            "--config.data.task=text",
            f"--config.data.text.path={tmp_path / 'doc.txt'}",
            "--config.train.steps=6",
            "--config.optim.warmup_steps=1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "eval split has 1 rows" in err and "Traceback" not in err


def test_lock_is_released_after_a_failed_run(tmp_path):
    """An error inside the run must not leave the workdir locked for the next call."""
    (tmp_path / "doc.txt").write_bytes(b"abcdefgh" * 100)
    workdir = str(tmp_path / "w")
    bad = _cfg("data.task=text", f"data.text.path={tmp_path / 'doc.txt'}")
    for _ in range(2):  # the second call would raise WorkdirError if the first kept the lock
        with pytest.raises(ValueError, match=r"eval split"):
            loop.train(bad, workdir, log=lambda s: None)
