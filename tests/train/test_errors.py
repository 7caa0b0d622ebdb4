"""Failures after start-up end in one ``error:`` line naming the path or value and the fix,
with the full traceback in the run's log file; sessa-eval/sessa-sample on a damaged step."""

import errno
import json
import os
import shutil
import tempfile

import pytest

from sessa_jax.cli import eval_main, sample_main, train_main
from sessa_jax.train import metrics as metrics_mod
from sessa_jax.train import run_errors
from tests.support.shared import built_once

TINY = [
    "--config=tiny",
    "--config.train.progress=False",
    "--config.train.eval_batches=1",
    "--config.train.compilation_cache=",
]


def _error_lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith("error:")]


def test_a_full_disk_mid_run_is_reported_not_hidden_by_the_closing_flushes(tmp_path, monkeypatch, capsys):
    """The metrics write at step 3 hits ENOSPC; TensorBoard's flush on close then fails the same
    way. The report must name the first failure (the metrics file, no space) and the fix."""
    import tensorboardX

    real_write, real_close = metrics_mod.MetricsWriter.write, tensorboardX.SummaryWriter.close

    def write(self, step, scalars, tensorboard=True):
        if step >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        return real_write(self, step, scalars, tensorboard)

    def close(self):
        real_close(self)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(self.logdir, "events.out.tfevents"))

    monkeypatch.setattr(metrics_mod.MetricsWriter, "write", write)
    monkeypatch.setattr(tensorboardX.SummaryWriter, "close", close)
    workdir = tmp_path / "run"
    assert train_main(TINY + [f"--workdir={workdir}", "--config.train.steps=6", "--config.optim.warmup_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    assert err.rstrip().endswith(line)  # the last thing printed
    metrics_path = str(workdir / "metrics.jsonl")
    assert f"no space left to write {metrics_path!r}" in line and "free space on that disk" in line
    assert f"full traceback in {workdir / 'train.log'}" in line
    log = (workdir / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and "No space left on device" in log
    assert "start step 0 (fresh" in log  # the run's own log lines are there too


@pytest.mark.parametrize(
    "code, says",
    [
        (errno.EROFS, "read-only file system; pass a --workdir on a writable disk"),
        (errno.ENOSPC, "no space left to write"),
        (errno.EACCES, "permission denied for"),
    ],
)
def test_a_fresh_workdir_that_cannot_be_created_names_the_path_and_the_fix(tmp_path, monkeypatch, capsys, code, says):
    parent = tmp_path / "parent"
    parent.mkdir()
    workdir = parent / "new" / "run"
    real_makedirs = os.makedirs

    def makedirs(name, *args, **kwargs):
        if os.fspath(name).startswith(str(parent)):
            exc = PermissionError if code == errno.EACCES else OSError
            raise exc(code, os.strerror(code), os.fspath(name))
        return real_makedirs(name, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", makedirs)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the traceback goes when the workdir can't
    assert train_main(TINY + [f"--workdir={workdir}"]) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert "Traceback" not in err and err.rstrip().endswith(line)
    assert says in line and str(workdir) in line, line
    saved = line.split("full traceback in ")[1].rstrip(")")
    assert saved.startswith(str(tmp_path)) and "Traceback (most recent call last)" in open(saved).read()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_a_workdir_under_a_read_only_parent(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    os.chmod(parent, 0o500)
    try:
        assert train_main(TINY + [f"--workdir={parent / 'run'}"]) == 2
    finally:
        os.chmod(parent, 0o700)
    (line,) = _error_lines(capsys.readouterr().err)
    assert "permission denied for" in line and str(parent) in line and "--workdir" in line


def test_an_os_error_wrapped_by_a_library_is_still_named():
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/ckpt/7/params/d/abc")
        except OSError as inner:
            raise RuntimeError("async save failed") from inner
    except RuntimeError as e:
        assert run_errors.is_user_error(e)
        assert run_errors.describe(e).startswith("no space left to write '/data/ckpt/7/params/d/abc'")
    assert not run_errors.is_user_error(KeyError("x"))  # a bug keeps its traceback


# ---- sessa-eval / sessa-sample on damaged checkpoints ----


def _damaged_run(folder) -> dict:
    workdir = folder / "run"
    assert (
        train_main(
            TINY
            + [
                f"--workdir={workdir}",
                "--config.train.steps=6",
                "--config.optim.warmup_steps=1",
                "--config.checkpoint.every=3",
            ]
        )
        == 0
    )
    params = workdir / "checkpoints" / "6" / "params"
    files = [os.path.join(r, f) for r, _, fs in os.walk(params) for f in fs]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    return {}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A finished tiny run with checkpoints at steps 3 and 6; step 6's params are damaged.
    Trained once per session (xdist gave the module's tests to both workers, each trained it);
    the tests only read it, and the one that damages more works on a copy."""
    return str(built_once(tmp_path_factory, "errors-two-steps", _damaged_run)[0] / "run")


def test_eval_of_a_damaged_step_is_a_clean_error_naming_the_other_steps(two_steps, capsys):
    assert eval_main(["--run", two_steps, "--step", "6"]) == 2
    out = capsys.readouterr()
    (line,) = _error_lines(out.err)
    assert "Traceback" not in out.err and "step 6:" in line and "pass another --step (the others: [3])" in line
    assert eval_main(["--run", two_steps, "--step", "5"]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "--step 5:" in line and "its steps are [3, 6]" in line


def test_eval_without_step_says_which_step_it_evaluated(two_steps, capsys):
    assert eval_main(["--run", two_steps]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("step 3 | loss ")  # 6 is damaged: the newest that restores
    assert "checkpoint step 6:" in out.err and "trying the one before it" in out.err
    assert eval_main(["--run", two_steps, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3


def test_sample_of_a_damaged_step_is_a_clean_error_and_says_its_step(two_steps, capsys):
    assert sample_main(["--run", two_steps, "--step", "6", "--prompt", "1 2 3", "--max_new_tokens", "2"]) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert "Traceback" not in err and "step 6:" in line
    assert sample_main(["--run", two_steps, "--prompt", "1 2 3", "--max_new_tokens", "2"]) == 0
    out = capsys.readouterr()
    assert "step 3)" in out.err and out.out.startswith("1 2 3")


def test_eval_with_every_step_damaged_names_them_all(two_steps, tmp_path, capsys):
    copy = str(tmp_path / "run")
    shutil.copytree(two_steps, copy)
    shutil.rmtree(os.path.join(copy, "checkpoints", "3", "params"))
    assert eval_main(["--run", copy]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "step 6:" in line and "step 3:" in line and "restore the checkpoints from a backup" in line
