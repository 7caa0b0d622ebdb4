"""metrics.wandb=True with the real wandb package, offline (no network, no account): a run
and its resume write to one W&B run whose records hold the step and eval metrics.

Skipped where wandb is not installed (`pip install 'sessa-jax[wandb]'`); the newest-JAX
environment installs it (`make test-latest`)."""

import glob
import os

import pytest

wandb = pytest.importorskip("wandb", reason="metrics.wandb needs the wandb package (the 'wandb' extra)")

from sessa_jax.train import loop  # noqa: E402
from sessa_jax.train.config import load_config  # noqa: E402


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for key, value in dict(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(tmp_path / "wandb_dir"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb_data"),
        WANDB_DISABLE_GIT="true",
        WANDB_DISABLE_CODE="true",
    ).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def _run(workdir, steps, extra=()):
    cfg = load_config(
        "tiny",
        [
            "metrics.wandb=True",
            "metrics.wandb_project=sessa-test",
            f"train.steps={steps}",
            "optim.warmup_steps=1",
            "train.log_every=2",
            "train.progress=False",
            "train.eval_batches=1",
            "train.compilation_cache=",
            *extra,
        ],
    )
    return loop.train(cfg, workdir, log=lambda s: None)


def test_a_run_and_its_resume_log_to_one_offline_wandb_run(offline):
    workdir = str(offline / "run")
    assert _run(workdir, 4).step == 4
    run_id = open(os.path.join(workdir, "wandb_run_id")).read().strip()
    assert run_id
    assert _run(workdir, 6, ["train.allow_config_change=train.steps"]).step == 6
    assert open(os.path.join(workdir, "wandb_run_id")).read().strip() == run_id
    runs = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs)  # the resume continues the same id
    for run in runs:
        (records,) = glob.glob(os.path.join(run, f"run-{run_id}.wandb"))
        data = open(records, "rb").read()
        # The transaction log holds each logged key by name (history records, protobuf strings).
        for key in (b"loss", b"grad_norm", b"step_time_s", b"tokens_per_s", b"lr", b"eval_loss", b"sessa-test"):
            assert key in data, (run, key)
