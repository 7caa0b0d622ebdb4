"""Resume guards: the saved config is compared, the data position is in examples, and a damaged
latest checkpoint falls back to the newest one that restores and verifies."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from sessa_jax.data import TRAIN, make_iterator
from sessa_jax.train import checkpoint as ckpt
from sessa_jax.train import loop
from sessa_jax.train.config import ConfigError, load_config, resolve
from sessa_jax.train.optimizer import make_optimizer
from sessa_jax.train.resume_guard import ResumeError
from sessa_jax.train.state import abstract_state, build_model
from tests.support.shared import built_once

# A transformer block keeps the compile short; the guards do not depend on the mixer.
ARGS = [
    "train.steps=8",
    "checkpoint.every=4",
    "optim.warmup_steps=2",
    "train.progress=False",
    "model.kind=transformer",
    "train.eval_batches=1",
    "checkpoint.async_save=False",
]


def _cfg(*extra):
    return load_config("tiny", [*ARGS, *extra])


def _finish(folder) -> dict:
    loop.train(_cfg(), str(folder / "run"), log=lambda s: None)
    return {}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 8-step run with checkpoints at steps 4 and 8 (copied by each test that changes
    it). Trained once per session: as a module fixture, each xdist worker trained its own."""
    return str(built_once(tmp_path_factory, "resume-guard-finished", _finish)[0] / "run")


def _copy(finished, tmp_path, name="run"):
    dst = str(tmp_path / name)
    shutil.copytree(finished, dst)
    os.remove(os.path.join(dst, ".lock"))
    return dst


def _data_state(workdir, step):
    with open(os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")) as f:
        return json.load(f)


@pytest.mark.parametrize(
    "override, key, saved, now",
    [
        ("data.batch_size=16", "data.batch_size", "8", "16"),
        ("data.seed=3", "data.seed", "0", "3"),
        ("model.d_model=64", "model.d_model", "32", "64"),
        ("model.kind=sessa", "model.kind", "'transformer'", "'sessa'"),
    ],
)
def test_a_changed_config_is_refused_naming_the_key(finished, tmp_path, override, key, saved, now):
    workdir = _copy(finished, tmp_path)
    with pytest.raises(ResumeError, match=rf"{key}: saved {saved}, now {now}") as e:
        loop.train(_cfg(override, "train.steps=30"), workdir, log=lambda s: None)
    msg = str(e.value)
    assert "train.steps" in msg  # every changed key is listed
    if key == "data.batch_size":
        assert "--config.train.allow_config_change=" in msg and "data.batch_size" in msg.split("Fix:")[1]
    else:
        assert "new --workdir" in msg and "alters the data or the model" in msg
    assert "strict=False" not in msg and "partial_restore" not in msg


def test_allow_config_change_names_only_keys_that_can_change():
    with pytest.raises(ConfigError, match=r"'data.seed'.*cannot change safely"):
        load_config("tiny", ["train.allow_config_change=train.steps,data.seed"])
    load_config("tiny", ["train.allow_config_change=train.steps, data.batch_size"])


def test_steps_below_the_saved_step_is_a_clear_error(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    with pytest.raises(ResumeError, match=r"step 8, beyond train.steps=6"):
        loop.train(_cfg("train.steps=6", "train.allow_config_change=train.steps"), workdir, log=lambda s: None)


def test_data_position_is_in_examples_so_a_new_batch_size_neither_skips_nor_repeats():
    cfg8 = _cfg().data
    cfg4 = _cfg("data.batch_size=4").data
    it = make_iterator(cfg8, TRAIN)
    for _ in range(3):
        next(it)
    state = it.get_state()
    assert state == {"examples": 24, "batch_size": 8}
    resumed = make_iterator(cfg4, TRAIN)
    resumed.set_state(json.dumps(state).encode())  # as grain's checkpoint handler passes it
    reference = make_iterator(cfg4, TRAIN)
    for _ in range(6):  # 6 batches of 4 = the 24 examples already consumed
        next(reference)
    for _ in range(2):
        a, b = next(resumed), next(reference)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    whole = next(it)  # the next batch of 8 = the two batches of 4 that followed
    stream4 = make_iterator(cfg4, TRAIN, start_example=24)
    halves = [next(stream4), next(stream4)]
    assert np.array_equal(whole["inputs"], np.concatenate([h["inputs"] for h in halves]))


def test_an_allowed_batch_size_change_resumes_at_the_same_example(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))  # resume from step 4: 32 examples read
    logs = []
    result = loop.train(
        _cfg("data.batch_size=4", "train.steps=6", "train.allow_config_change=data.batch_size,train.steps"),
        workdir,
        log=logs.append,
    )
    assert result.step == 6
    assert any("data.batch_size changed from 8 to 4" in s for s in logs)
    assert _data_state(workdir, 6) == {"examples": 32 + 2 * 4, "batch_size": 4}
    saved = ckpt.restore_config(os.path.join(workdir, "checkpoints"))
    assert saved["data"]["batch_size"] == 4


# ---- damaged checkpoints ----


def _largest(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def _delete_array_file(step_dir):
    os.remove(_largest(os.path.join(step_dir, "params")))


def _truncate_array_file(step_dir):
    path = _largest(os.path.join(step_dir, "params"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _empty_metadata(step_dir):
    open(os.path.join(step_dir, "params", "_METADATA"), "w").close()


def _missing_item(step_dir):
    shutil.rmtree(os.path.join(step_dir, "opt_state"))


def _flip_bytes(step_dir):
    path = _largest(os.path.join(step_dir, "params"))
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
        f.seek(0)
        f.write(data)


def _restore_target(cfg):
    model, tx = build_model(resolve(cfg)), make_optimizer(cfg.optim, cfg.train.steps)
    return abstract_state(model, tx, cfg.train.seed, cfg.data.seq_len)


@pytest.mark.parametrize(
    "damage", [_delete_array_file, _truncate_array_file, _empty_metadata, _missing_item, _flip_bytes]
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path, damage):
    workdir = _copy(finished, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    damage(os.path.join(directory, "8"))
    cfg = _cfg()
    manager = ckpt.make_manager(directory, async_save=False)
    logs = []
    it = make_iterator(cfg.data, TRAIN)
    state = ckpt.restore(manager, _restore_target(cfg), it, config=resolve(cfg).to_dict(), log=logs.append)
    manager.close()
    assert int(state.step) == 4 and it.position == 32
    assert any("step 8" in s and "skipping it" in s for s in logs), logs
    assert os.path.isdir(os.path.join(directory, "8.damaged")) and not os.path.exists(os.path.join(directory, "8"))
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))
    # sample.py's parameter-only restore falls back the same way
    params = ckpt.restore_params(directory, log=lambda s: None)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(a, b)


def test_flipped_bytes_are_caught_by_the_fingerprint(finished, tmp_path):
    """Orbax itself restores corrupted array contents silently; the saved fingerprint must not match."""
    workdir = _copy(finished, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    params = ckpt.restore_params(directory, step=8)
    leaf = jax.tree_util.tree_leaves(params)[0]
    changed = jax.tree_util.tree_map(lambda x: x, params)
    first_path = jax.tree_util.tree_flatten_with_path(params)[0][0][0]
    node = changed
    for k in first_path[:-1]:
        node = node[k.key]
    node[first_path[-1].key] = np.asarray(leaf).copy().reshape(-1).view(np.uint8).copy()
    node[first_path[-1].key][3] ^= 0x01  # one bit of one float
    node[first_path[-1].key] = node[first_path[-1].key].view(leaf.dtype).reshape(leaf.shape)
    saved = ckpt._integrity(ckpt.make_manager(directory, async_save=False), 8)
    ckpt._verify("params", params, saved["params"])  # the intact tree verifies
    with pytest.raises(ckpt.IntegrityError, match=r"params: 1 array\(s\) differ"):
        ckpt._verify("params", changed, saved["params"])


def test_when_no_checkpoint_restores_one_error_lists_every_step(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    _empty_metadata(os.path.join(directory, "8"))
    _missing_item(os.path.join(directory, "4"))
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)no checkpoint.*step 8: .*step 4: .*new --workdir"):
        loop.train(_cfg(), workdir, log=lambda s: None)
    assert sorted(os.listdir(directory)) == ["4", "8"]  # nothing moved when nothing restores


@pytest.mark.slow  # a second compile and 4 steps; the fallback itself is proven by the tests above
def test_training_resumes_past_a_damaged_step_and_redoes_it_identically(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    _flip_bytes(os.path.join(workdir, "checkpoints", "8"))
    logs = []
    result = loop.train(_cfg(), workdir, log=logs.append)
    assert result.step == 8 and any("IntegrityError" in s for s in logs), logs
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8", "8.damaged"]
    from sessa_jax.train.metrics import read_jsonl

    def losses(w):
        return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(w, "metrics.jsonl")) if "loss" in r}

    assert losses(workdir) == losses(finished)  # steps 5..8 redone bit-identically from step 4
    assert _data_state(workdir, 8) == {"examples": 64, "batch_size": 8}


# ---- changed data sources ----


def _text_corpus(tmp_path, n=3, size=1500):
    d = tmp_path / "corpus"
    d.mkdir()
    line = bytes(range(32, 127))
    for i in range(n):
        (d / f"doc{i}.txt").write_bytes((line * (size // len(line) + 1))[:size])
    return d


def _text_data_cfg(corpus, **text_keys):
    cfg = _cfg("data.task=text", f"data.text.path={corpus}", "data.seq_len=32", "data.text.eval_fraction=0.2")
    for k, v in text_keys.items():
        cfg.data.text[k] = v
    return cfg.data


@pytest.mark.parametrize("change", ["append", "delete", "add"])
def test_a_changed_corpus_is_refused_on_resume_naming_the_file_and_the_flag(tmp_path, change, caplog):
    from sessa_jax.train.resume_guard import DataChangedError

    d = _text_corpus(tmp_path)
    it = make_iterator(_text_data_cfg(d), TRAIN)
    next(it)
    state = json.dumps(it.get_state()).encode()  # as saved with a checkpoint
    make_iterator(_text_data_cfg(d), TRAIN).set_state(state)  # unchanged: resumes
    if change == "append":
        with open(d / "doc1.txt", "ab") as f:
            f.write(b"one more line\n")
        named = "changed: doc1.txt"
    elif change == "delete":
        (d / "doc2.txt").unlink()
        named = "removed: doc2.txt"
    else:
        (d / "doc3.txt").write_bytes(b"a new document " * 40)
        named = "added: doc3.txt"
    with pytest.raises(DataChangedError, match=rf"\({named}\).*--config.data.allow_changed_sources=True"):
        make_iterator(_text_data_cfg(d), TRAIN).set_state(state)
    allowed = _text_data_cfg(d)
    allowed.allow_changed_sources = True
    resumed = make_iterator(allowed, TRAIN)
    with caplog.at_level("WARNING"):
        resumed.set_state(state)
    assert resumed.position == 8 and named in caplog.text and "data.allow_changed_sources=True" in caplog.text
    assert resumed.get_state()["sources"] != json.loads(state)["sources"]  # the next checkpoint records the new data


def test_shards_prepared_again_from_a_changed_corpus_are_refused_on_resume(tmp_path):
    from sessa_jax.data import text
    from sessa_jax.train.resume_guard import DataChangedError

    d = _text_corpus(tmp_path)
    shards = tmp_path / "shards"
    text.prepare(str(d), str(shards), seq_len=32, rows_per_shard=30, eval_fraction=0.2)
    cfg = _text_data_cfg("", arrayrecord_dir=str(shards))
    it = make_iterator(cfg, TRAIN)
    next(it)
    state = it.get_state()
    with open(d / "doc0.txt", "ab") as f:
        f.write(b"x" * 200)
    text.prepare(str(d), str(shards), seq_len=32, rows_per_shard=30, eval_fraction=0.2, overwrite=True)
    with pytest.raises(DataChangedError, match=r"\(changed: .*train-000\d\d.array_record"):
        make_iterator(cfg, TRAIN).set_state(state)


def test_training_refuses_to_resume_on_changed_data_until_allowed(tmp_path):
    """End to end: the refusal comes through the checkpoint restore as a ResumeError (not taken
    for damage: no step is moved aside), and the flag lets the run go on."""
    d = _text_corpus(tmp_path)
    workdir = str(tmp_path / "run")
    text_args = [
        "data.task=text",
        f"data.text.path={d}",
        "data.seq_len=32",
        "data.text.eval_fraction=0.2",
        "train.steps=4",
        "checkpoint.every=2",
    ]
    loop.train(_cfg(*text_args), workdir, log=lambda s: None)
    with open(d / "doc0.txt", "ab") as f:
        f.write(b"appended after the run\n")
    more = [*text_args, "train.steps=6", "train.allow_config_change=train.steps"]
    with pytest.raises(ResumeError, match=r"changed: doc0.txt.*data.allow_changed_sources=True"):
        loop.train(_cfg(*more), workdir, log=lambda s: None)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]  # nothing set aside
    result = loop.train(_cfg(*more, "data.allow_changed_sources=True"), workdir, log=lambda s: None)
    assert result.step == 6
