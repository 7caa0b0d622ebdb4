"""scripts/compare_models.py end to end at toy scale: matched models, the sweep, resume, the table."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from tests.support.shared import built_once

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_models", os.path.join(ROOT, "scripts", "compare_models.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


cm = _load_script()


def _lines(path):
    """The run rows of a results file (reference-line rows have no "kind")."""
    with open(path) as f:
        return [r for r in (json.loads(x) for x in f if x.strip()) if "kind" in r]


STOPPED = {}


def _stopped_then_finished(folder) -> dict:
    out = str(folder / "toy.jsonl")
    with pytest.raises(SystemExit) as stop:
        cm.main(["--scale", "toy", "--out", out, "--tasks", "symbol_soup", "--time-limit", "0"])
    stopped = dict(code=stop.value.code, rows=len(_lines(out)), saved=sorted(os.listdir(out + ".runs")))
    cm.main(["--scale", "toy", "--out", out, "--tasks", "symbol_soup"])
    return stopped


@pytest.fixture(scope="module")
def soup_run(tmp_path_factory):
    """The toy SymbolSoup sweep, first stopped by --time-limit 0 (one step of its first run),
    then finished by a rerun of the same command; built once per session (the tests only read it)."""
    folder, stopped = built_once(tmp_path_factory, "compare-models-soup", _stopped_then_finished)
    STOPPED.update(stopped)
    return str(folder / "toy.jsonl")


def test_the_time_limit_saves_the_run_in_progress_and_the_rerun_finishes_it_unchanged(soup_run):
    assert STOPPED == dict(code=cm.EXIT_UNFINISHED, rows=0, saved=["symbol_soup-40-60-sessa-lr0.001-seed0"])
    assert os.listdir(soup_run + ".runs") == []  # a finished run's checkpoint is removed
    scale, length = cm.SCALES["toy"], cm.SCALES["toy"].soup_lengths[0]
    trainer = cm.Trainer(cm.model_configs(scale, "symbol_soup", length)["sessa"], "sessa", scale)
    whole = trainer.run(0.001, 0, cm.task_data(scale, "symbol_soup", length))
    resumed = next(r for r in _lines(soup_run) if cm.run_key(r) == ("toy", "symbol_soup", "40-60", "sessa", 0.001, 0))
    for key in ("final_loss", "valid_accuracy", "test_accuracy"):
        assert resumed[key] == whole[key], key


def test_a_run_checkpointed_every_step_and_stopped_twice_gives_the_uninterrupted_result(tmp_path):
    import dataclasses

    scale = dataclasses.replace(cm.SCALES["toy"], checkpoint_every=1)
    length = scale.mqar_lengths[0]
    data = cm.task_data(scale, "mqar", length)
    trainer = cm.Trainer(cm.model_configs(scale, "mqar", length)["transformer"], "transformer", scale)
    ckpt = str(tmp_path / "run")
    assert trainer.run(0.01, 1, data, checkpoint=ckpt, deadline=0.0) is None  # after step 1
    assert trainer.run(0.01, 1, data, checkpoint=ckpt, deadline=0.0) is None  # after step 2
    resumed = trainer.run(0.01, 1, data, checkpoint=ckpt, deadline=0.0)  # step 3 is the last: it finishes
    whole = trainer.run(0.01, 1, data)
    assert scale.steps == 3 and resumed is not None
    for key in ("final_loss", "valid_accuracy", "test_accuracy"):
        assert resumed[key] == whole[key], key
    other_seed = trainer.run(0.01, 2, data)
    assert other_seed["final_loss"] != whole["final_loss"]  # the comparison can tell runs apart


def test_every_kind_lr_and_seed_runs_once_with_matched_parameters_and_budget(soup_run):
    scale = cm.SCALES["toy"]
    rows = _lines(soup_run)
    keys = [cm.run_key(r) for r in rows]
    assert len(keys) == len(set(keys)) == len(cm.KINDS) * len(scale.lrs) * len(scale.seeds)
    assert len(scale.lrs) >= 3 and len(scale.seeds) >= 3
    sessa = next(r["params"] for r in rows if r["kind"] == "sessa")
    for r in rows:
        assert abs(r["params"] - sessa) <= 0.05 * sessa, r
        assert r["tokens"] == scale.steps * scale.batch_size * 60 and r["steps"] == scale.steps
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["valid_accuracy"] <= 1.0
        # toy test split: 20 examples, so accuracies are multiples of 1/20
        assert r["test_accuracy"] * 20 == pytest.approx(round(r["test_accuracy"] * 20))


def test_summary_picks_the_lr_on_validation_and_reports_test_spread(soup_run):
    rows = _lines(soup_run)
    summary = cm.summarize(rows)
    assert [s["kind"] for s in summary] == list(cm.KINDS)
    for s in summary:
        mine = [r for r in rows if r["kind"] == s["kind"]]
        valid = {lr: np.mean([r["valid_accuracy"] for r in mine if r["lr"] == lr]) for lr in {r["lr"] for r in mine}}
        assert valid[s["best_lr"]] == max(valid.values())
        test = [r["test_accuracy"] for r in mine if r["lr"] == s["best_lr"]]
        assert s["test_mean"] == pytest.approx(np.mean(test)) and s["test_sd"] == pytest.approx(np.std(test, ddof=1))
    table = cm.table(summary)
    assert table.count("\n") == 1 + len(summary) and "symbol_soup" in table


def test_a_rerun_of_a_finished_sweep_adds_nothing(soup_run):
    before = os.path.getsize(soup_run)
    cm.compare("toy", soup_run, tasks=("symbol_soup",))  # every run is in the file: nothing to do
    assert os.path.getsize(soup_run) == before


def _interrupted_copy(src, dst, drop: int):
    """``src`` without its last ``drop`` runs, ending in a line torn by an interrupted write."""
    with open(src) as f:
        lines = f.read().splitlines()
    with open(dst, "w") as f:
        f.write("\n".join(lines[:-drop]) + "\n" + lines[-drop][:20])
    return [cm.run_key(r) for r in map(json.loads, lines) if "kind" in r]


def test_a_torn_last_line_is_ignored_and_closed(soup_run, tmp_path):
    out = str(tmp_path / "partial.jsonl")
    keys = _interrupted_copy(soup_run, out, drop=1)
    assert [cm.run_key(r) for r in cm.read_results(out) if "kind" in r] == keys[:-1]
    cm._end_with_newline(out)
    with open(out) as f:
        assert f.read().endswith("\n")


@pytest.mark.slow
def test_a_rerun_redoes_only_the_missing_runs(soup_run, tmp_path):
    out = str(tmp_path / "partial.jsonl")
    keys = _interrupted_copy(soup_run, out, drop=2)
    cm.compare("toy", out, tasks=("symbol_soup",))
    assert sorted(cm.run_key(r) for r in cm.read_results(out) if "kind" in r) == sorted(keys)


def test_mqar_splits_are_disjoint_and_budgeted():
    scale = cm.SCALES["toy"]
    data = cm.task_data(scale, "mqar", 16)
    assert len(data[cm.SPLIT_TRAIN]["inputs"]) == scale.steps * scale.batch_size
    assert len(data[cm.SPLIT_TEST]["inputs"]) == scale.mqar_eval
    rows = {split: {r.tobytes() for r in d["inputs"]} for split, d in data.items()}
    assert not rows[cm.SPLIT_TRAIN] & rows[cm.SPLIT_TEST] and not rows[cm.SPLIT_VALID] & rows[cm.SPLIT_TEST]


def test_unknown_scale_task_or_kind_is_named():
    with pytest.raises(ValueError, match=r"--scale 'huge' is unknown"):
        cm.compare("huge", "unused.jsonl")
    with pytest.raises(ValueError, match=r"unknown task\(s\)/kind\(s\) \['rnn'\]"):
        cm.compare("toy", "unused.jsonl", kinds=("sessa", "rnn"))
    with pytest.raises(ValueError, match=r"--time-limit must be a number of seconds >= 0; got -5"):
        cm.compare("toy", "unused.jsonl", time_limit=-5)


@pytest.mark.parametrize(
    "name", ["toy", pytest.param("cpu", marks=pytest.mark.slow), pytest.param("paper", marks=pytest.mark.slow)]
)
def test_every_scale_matches_parameters_within_five_percent(name):
    scale = cm.SCALES[name]
    for task, length in cm.plan(scale, ("symbol_soup", "mqar")):
        cm.model_configs(scale, task, length)  # raises if a kind is more than 5% off


def test_accuracy_counts_every_example_when_the_last_batch_is_partial():
    scale = cm.SCALES["toy"]  # batch 4
    data = cm.task_data(scale, "mqar", 16)[cm.SPLIT_TEST]  # 8 rows
    trainer = cm.Trainer(cm.model_configs(scale, "mqar", 16)["transformer"], "transformer", scale)
    params, _ = trainer.init(0)
    first6 = {k: v[:6] for k, v in data.items()}  # one full batch + 2 rows padded to 4
    masked = dict(data, weights=np.where(np.arange(8)[:, None] < 6, data["weights"], 0.0).astype(np.float32))
    sums = [trainer.eval_sums(params, {k: v[s : s + 4] for k, v in masked.items()}) for s in (0, 4)]
    expect = sum(float(x["correct_sum"]) for x in sums) / sum(float(x["weight_sum"]) for x in sums)
    assert trainer.accuracy(params, first6) == pytest.approx(expect, rel=1e-6)


def test_reference_lines_are_written_once_per_cell_and_shown_beside_the_results(soup_run):
    from sessa_jax.baselines import reference as ref

    lines = cm.scale_lines(soup_run, "toy")
    assert list(lines) == [("symbol_soup", "40-60")]
    got = lines[("symbol_soup", "40-60")]
    scale = cm.SCALES["toy"]
    data = cm.task_data(scale, "symbol_soup", scale.soup_lengths[0])
    want = ref.soup_reference_lines(data[cm.SPLIT_TRAIN], data[cm.SPLIT_VALID], data[cm.SPLIT_TEST])
    assert got == {**{k: pytest.approx(float(v)) for k, v in want.items()}, "test_n": 20}
    with open(soup_run) as f:  # the rerun of the fixture did not write them again
        assert sum('"reference"' in x for x in f) == 1
    summary = cm.summarize(_lines(soup_run), lines)
    for s in summary:
        assert s["line_name"] == "unigram" and s["line"] == got["unigram"]
        err = np.sqrt(s["test_se"] ** 2 + got["unigram"] * (1 - got["unigram"]) / 20)
        assert s["margin_se"] == pytest.approx((s["test_mean"] - got["unigram"]) / err)
    text = cm.table(summary, lines)
    assert "unigram" in text and "markov_oracle" in text and "(mean - line) / SE" in text


def test_mqar_reference_lines_are_chance_and_the_no_association_line():
    from sessa_jax.data.mqar import frequency_baseline

    scale = cm.SCALES["toy"]
    data = cm.task_data(scale, "mqar", 16)
    lines = cm.reference_lines(scale, "mqar", data)
    values = scale.mqar_vocab - scale.mqar_vocab // 2
    assert lines["chance"] == 1 / values and lines["no_association"] == 1 / scale.mqar_kv_pairs
    assert lines["no_association_measured"] == frequency_baseline(data[cm.SPLIT_TEST], scale.mqar_kv_pairs)
    assert lines["test_n"] == scale.mqar_eval * scale.mqar_kv_pairs


def test_the_first_seed_saves_its_trained_parameters(soup_run):
    import jax
    import jax.numpy as jnp

    from sessa_jax.model import SessaLM

    scale = cm.SCALES["toy"]
    config = cm.model_configs(scale, "symbol_soup", scale.soup_lengths[0])["sessa"]
    path = cm.params_path(soup_run, "symbol_soup", "40-60", "sessa", 0.001, 0)
    assert os.path.exists(path) and not os.path.exists(
        cm.params_path(soup_run, "symbol_soup", "40-60", "sessa", 0.001, 1)
    )
    model = SessaLM(config, kind="sessa")
    like = model.init(jax.random.PRNGKey(0), jnp.zeros((1, config.max_len), jnp.int32))
    params = cm.load_params(path, like)
    trainer = cm.Trainer(config, "sessa", scale)
    data = cm.task_data(scale, "symbol_soup", scale.soup_lengths[0])
    row = next(r for r in _lines(soup_run) if cm.run_key(r) == ("toy", "symbol_soup", "40-60", "sessa", 0.001, 0))
    assert trainer.accuracy(params, data[cm.SPLIT_TEST]) == row["test_accuracy"]


def test_set_changes_fields_of_the_scale_for_a_pilot(tmp_path):
    assert cm.parse_overrides(["steps=2", "seeds=(0,)", "lrs=[0.003]", "soup_lengths=((100, 150),)"]) == dict(
        steps=2, seeds=(0,), lrs=(0.003,), soup_lengths=((100, 150),)
    )
    with pytest.raises(ValueError, match="FIELD one of"):
        cm.parse_overrides(["stepz=2"])
    with pytest.raises(ValueError, match="must be a Python literal"):
        cm.parse_overrides(["steps=two"])
    out = str(tmp_path / "pilot.jsonl")
    cm.main(
        [
            "--scale",
            "toy",
            "--out",
            out,
            "--tasks",
            "mqar",
            "--kinds",
            "transformer",
            "--set",
            "steps=2",
            "--set",
            "seeds=(1,)",
            "--set",
            "lrs=(0.01,)",
        ]
    )
    rows = _lines(out)
    assert [(r["steps"], r["seed"], r["lr"], r["kind"]) for r in rows] == [(2, 1, 0.01, "transformer")]
    assert rows[0]["tokens"] == 2 * cm.SCALES["toy"].batch_size * 16


def test_workers_split_the_runs_and_each_is_done_once_as_alone(soup_run, tmp_path, capsys):
    """--workers 2: every run is done by exactly one worker process, the lines once, and each
    result is the one the single-process sweep got for the same run."""
    out = str(tmp_path / "workers.jsonl")
    argv = ["--scale", "toy", "--out", out, "--tasks", "symbol_soup", "--kinds", "transformer", "--set", "lrs=(0.001,)"]
    cm.main(argv + ["--workers", "2"])
    rows = _lines(out)
    keys = [cm.run_key(r) for r in rows]
    assert sorted(keys) == sorted(("toy", "symbol_soup", "40-60", "transformer", 0.001, s) for s in (0, 1, 2))
    with open(out) as f:
        assert sum('"reference"' in x for x in f) == 1
    alone = {cm.run_key(r): r for r in _lines(soup_run)}
    for r in rows:
        for key in ("final_loss", "valid_accuracy", "test_accuracy"):
            assert r[key] == alone[cm.run_key(r)][key], (cm.run_key(r), key)
    assert [p for p in os.listdir(tmp_path) if ".claims-" in p] == []  # the claims are cleaned up
    assert "| symbol_soup | 40-60 | transformer |" in capsys.readouterr().out  # the parent prints the table
    assert cm._without_workers(["--workers", "2", "--scale", "toy", "--workers=3"]) == ["--scale", "toy"]
    with pytest.raises(SystemExit):
        cm.main(["--scale", "toy", "--out", out, "--workers", "0"])
