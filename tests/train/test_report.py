"""What a run reports: start-up summary, per-step timing/MFU keys in metrics.jsonl and
TensorBoard, a profiler trace, full-split eval that sessa-eval reproduces, W&B run-id resume."""

import glob
import json
import os
import re
import shlex
import struct
import sys
import types

import numpy as np
import pytest

from sessa_jax.cli import sample_main
from sessa_jax.train import loop, report
from sessa_jax.train.config import load_config
from sessa_jax.train.metrics import read_jsonl
from tests.support.shared import built_once

STEP_KEYS = {"loss", "accuracy", "grad_norm", "lr", "step_time_s", "tokens_per_s", "mfu"}
EVAL_KEYS = {
    "eval_loss",
    "eval_accuracy",
    "eval_perplexity",
    "eval_bits_per_token",
    "eval_bits_per_byte",
    "eval_tokens",
}


def _tensorboard_tags(tb_dir: str) -> set:
    """Scalar tags in tensorboardX event files (TFRecord framing: len u64, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            while header := f.read(12):
                (n,) = struct.unpack("<Q", header[:8])
                event = event_pb2.Event.FromString(f.read(n))
                f.read(4)
                tags.update(v.tag for v in event.summary.value)
    return tags


def _text_config(corpus):
    return load_config(
        "text_bytes",
        [
            f"data.text.path={corpus}",
            "data.seq_len=32",
            "data.batch_size=4",
            "data.text.eval_fraction=0.2",
            "model.d_model=32",
            "model.n_heads=2",
            "model.n_layers=1",
            "model.chunk_size=16",
            "model.max_len=32",
            "optim.warmup_steps=1",
            "train.steps=4",
            "train.log_every=2",
            "train.eval_every=0",
            "train.progress=False",
            "train.loss_chunk=8",
            "train.profile_steps=2:4",
            "metrics.peak_tflops=1.0",
            "checkpoint.every=0",
        ],
    )


def _text_run(folder) -> dict:
    corpus = folder / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"\n"]
    for i in range(4):
        (corpus / f"d{i}.txt").write_bytes(b" ".join(words[j] for j in rng.integers(0, 5, 300)))
    workdir = folder / "run"
    workdir.mkdir()
    lines = []
    result = loop.train(_text_config(corpus), str(workdir), log=lines.append)
    return {"eval": {k: v.item() if hasattr(v, "item") else v for k, v in result.eval.items()}, "lines": lines}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """(config, workdir, result, log lines) of a short text run. Trained once per session: as a
    module fixture, each xdist worker that got one of these tests trained its own; the tests only
    read the run."""
    folder, record = built_once(tmp_path_factory, "report-text-run", _text_run)
    result = types.SimpleNamespace(eval=record["eval"])
    return _text_config(folder / "corpus"), str(folder / "run"), result, record["lines"]


def test_startup_summary_and_eval_line(text_run):
    cfg, workdir, result, lines = text_run
    head = "\n".join(lines[:4])
    assert "1 process(es)" in head and "mesh data=1 x fsdp=1 x tensor=1" in head
    assert "tokens/step 128" in head and "start step 0 (fresh" in head and os.path.abspath(workdir) in head
    assert any(line.startswith("eval @ 4:") and "bits/byte" in line for line in lines)


def test_a_finished_run_says_what_acc_means_where_it_is_and_what_to_run_next(tmp_path, capsys):
    cfg = load_config("tiny", ["train.steps=3", "optim.warmup_steps=1", "train.progress=False", "checkpoint.every=0"])
    workdir = str(tmp_path / "run")
    lines = []
    loop.train(cfg, workdir, log=lines.append)
    m = cfg.data.mqar
    values = m.vocab_size - m.vocab_size // 2  # MQAR's values are the upper half of the ids
    text = "\n".join(lines)
    assert f"chance {1 / values:.3f} (1 of {values} values)" in text
    assert f"{1 / m.num_kv_pairs:.3f} for a model that knows the context's values" in text  # distinct values
    assert f"run: {workdir} (checkpoints/ up to step 3," in text
    assert re.search(rf"^next: \S*sessa-eval\S* --run {re.escape(workdir)}$", text, re.M), text
    sample = next(line for line in lines if "sessa-sample" in line)
    query = re.search(r'--prompt "([\d ]+)" .*# key (\d+) -> its value (\d+)$', sample)
    ids, key, value = [int(t) for t in query.group(1).split()], int(query.group(2)), int(query.group(3))
    context = ids[:-3]  # the pairs, then "0 0" and one of their keys, as a query position reads
    assert ids[-3:] == [0, 0, key] and len(context) == 2 * m.num_kv_pairs
    assert context[0::2].index(key) == context[1::2].index(value)  # the value the comment names is the key's
    command = shlex.split(sample.split("#")[0])
    assert sample_main(command[command.index("--run") :]) == 0  # runs as printed against this run
    assert capsys.readouterr().out.split()[: len(ids)] == [str(t) for t in ids]

    again = []  # the same command on the finished workdir trains nothing and says so
    assert loop.train(cfg, workdir, log=again.append).step == 3
    assert any(line.startswith(f"already finished: {workdir} holds step 3 of train.steps=3") for line in again)
    assert not any(line.startswith("done:") for line in again), again


def test_metrics_keys_in_jsonl_and_tensorboard(text_run):
    cfg, workdir, result, _ = text_run
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(STEP_KEYS <= set(r) for r in steps)
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) == 1 and EVAL_KEYS <= set(evals[0])
    tags = _tensorboard_tags(os.path.join(workdir, "tb"))
    assert STEP_KEYS | EVAL_KEYS <= tags
    # MFU follows the stated formula from the logged tokens/s and the 1 TFLOP/s peak flag.
    n_params = int(lines_param_count(text_run[3]))
    flops = report.flops_per_token(n_params, 1, 32, 32)
    for r in steps:
        np.testing.assert_allclose(r["mfu"], flops * r["tokens_per_s"] / 1e12, rtol=1e-6)
        np.testing.assert_allclose(r["tokens_per_s"] * r["step_time_s"], 128, rtol=1e-6)


def lines_param_count(lines) -> str:
    line = next(x for x in lines if "params " in x)
    return line.split("params ")[1].split(" |")[0].replace(",", "")


def test_profile_trace_written(text_run):
    _, workdir, _, lines = text_run
    assert glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert any("profile of steps 2..3" in x for x in lines)


def test_sessa_eval_reproduces_the_runs_final_eval(text_run, capsys):
    from sessa_jax.cli import eval_main

    _, workdir, result, _ = text_run
    assert eval_main(["--run", workdir, "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(got) == EVAL_KEYS | {"step"} and got["step"] == 4 and got["eval_tokens"] == result.eval["eval_tokens"]
    for k in EVAL_KEYS:
        np.testing.assert_allclose(got[k], result.eval[k], rtol=1e-5)
    assert eval_main(["--run", workdir + "/nope"]) == 2


def test_wandb_resumes_the_same_run_id(tmp_path, monkeypatch):
    """A stand-in for wandb >= 0.31, which has no ``wandb.util.generate_id``: the id is made
    here, kept in the workdir and handed back on resume (the real package: tests/train/test_wandb.py)."""
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(kw) or types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    first = report.WandbLogger(str(tmp_path), "proj", "", {"a": 1})
    second = report.WandbLogger(str(tmp_path), "proj", "", {"a": 1})
    assert first.run_id == second.run_id and re.fullmatch(r"[a-z0-9]{8}", first.run_id)
    assert open(tmp_path / "wandb_run_id").read() == first.run_id
    assert [c["id"] for c in calls] == [first.run_id] * 2 and all(c["resume"] == "allow" for c in calls)
    assert report.new_run_id() != report.new_run_id()  # 36^8 ids: a repeat is a broken generator


def test_peak_table_and_flag():
    assert report.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert report.peak_tflops("TPU v4") == 275.0
    assert report.peak_tflops("cpu") is None and report.peak_tflops("cpu", 2.5) == 2.5
    assert report.flops_per_token(10, 2, 4, 8) == 6 * 10 + 12 * 2 * 4 * 8


def test_reporting_config_errors_name_the_key(monkeypatch):
    import importlib.util

    from sessa_jax.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.profile_steps='4:2' needs 1 <= a < b"):
        load_config("tiny", ["train.profile_steps=4:2"])
    with pytest.raises(ConfigError, match=r"metrics.peak_tflops must be >= 0"):
        load_config("tiny", ["metrics.peak_tflops=-1.0"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"metrics.wandb=True needs the wandb package"):
        load_config("tiny", ["metrics.wandb=True"])


class _FakeTime:
    """Stands in for the ``time`` module in ``report``: a clock that moves only when the test
    says (loading a batch, a step, an eval, a save), so step times are exact numbers."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_step_times_cover_each_step_only_and_every_mfu_is_at_most_one(tmp_path, monkeypatch, capsys):
    """Each step costs 0.25 s of loading and 1 s of compute; an eval costs 100 s and a save 50 s.
    Every logged step time must be 1.25 s: neither eval nor save time, nor half a step."""
    from sessa_jax.train import checkpoint as ckpt
    from sessa_jax.train.metrics import format_duration

    fake = _FakeTime()
    monkeypatch.setattr(report, "time", fake)

    def costs(fn, seconds):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            fake.now += seconds
            return out

        return wrapped

    real_make = loop.make_train_step
    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: costs(real_make(*a, **k), 1.0))
    monkeypatch.setattr(loop, "global_batch", costs(loop.global_batch, 0.25))
    monkeypatch.setattr(loop, "evaluate_params", costs(loop.evaluate_params, 100.0))
    monkeypatch.setattr(ckpt, "save", costs(ckpt.save, 50.0))
    cfg = load_config(
        "tiny",
        [
            "train.steps=6",
            "optim.warmup_steps=1",
            "train.log_every=2",
            "train.eval_every=2",
            "checkpoint.every=3",
            "train.eval_batches=1",
            "metrics.peak_tflops=1e-4",
        ],
    )
    workdir = str(tmp_path / "run")
    lines = []
    loop.train(cfg, workdir, log=lines.append)
    records = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    n_params = int(lines_param_count(lines))
    flops = report.flops_per_token(n_params, 2, 32, 32)
    for r in records:
        assert r["step_time_s"] == pytest.approx(1.25, abs=1e-9), r
        assert r["tokens_per_s"] == pytest.approx(256 / 1.25)
        assert 0 < r["mfu"] <= 1 and r["mfu"] == pytest.approx(flops * 256 / 1.25 / 1e8)
    # Progress: the compile step shows its own time and no ETA; the ETA after it is the
    # remaining steps at the mean step time after compilation.
    progress = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert progress[0].startswith("step 1/6") and "incl. compile" in progress[0] and "eta" not in progress[0]
    for line in progress[1:]:
        s = int(line.split()[1].split("/")[0])
        assert line.endswith(f"1.25 s/step | {256 / 1.25:.0f} tok/s | eta {format_duration((6 - s) * 1.25)}"), line


def test_an_mfu_above_one_is_not_logged_and_names_the_peak_setting():
    said = []
    out = report.step_scalars(1e-3, 1000, 1e9, 1, 1.0, log=said.append)  # 1e15 FLOP/s on a 1 TFLOP/s peak
    assert "mfu" not in out and out["tokens_per_s"] == pytest.approx(1e6)
    assert len(said) == 1 and "metrics.peak_tflops" in said[0] and "1e+03" in said[0]
    assert report.step_scalars(1.0, 1000, 1e9, 1, 1.0)["mfu"] == pytest.approx(1e12 / 1e12)
