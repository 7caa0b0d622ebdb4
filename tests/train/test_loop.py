"""The training loop on ``tiny``: loss falls for every kind, bf16 parity, one compile, NaN stops, accumulation."""

import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.data import make_iterator
from sessa_jax.train import checkpoint as ckpt
from sessa_jax.train import loop
from sessa_jax.train.config import load_config, resolve
from sessa_jax.train.metrics import read_jsonl
from sessa_jax.train.optimizer import decay_mask, make_optimizer
from sessa_jax.train.state import build_model, create_state
from sessa_jax.train.step import train_step
from tests.support.shared import built_once


def _losses(workdir):
    return [r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def _run(tmp_path, name, overrides=()):
    cfg = load_config("tiny", ["train.progress=False", *overrides])
    workdir = str(tmp_path / name)
    return loop.train(cfg, workdir, log=lambda s: None), workdir


def _run_counting(tmp_path, name, overrides=()):
    """``_run`` plus the number of train-step compilations (of the loop's sharded step)."""
    made, real = [], loop.make_train_step
    loop.make_train_step = lambda *a, **kw: made.append(real(*a, **kw)) or made[-1]
    try:
        result, workdir = _run(tmp_path, name, overrides)
    finally:
        loop.make_train_step = real
    return result, workdir, sum(f._cache_size() for f in made)


def _f32_record(folder) -> dict:
    result, _, compiles = _run_counting(folder, "run")
    return {"step": result.step, "eval": {k: float(v) for k, v in result.eval.items()}, "compiles": compiles}


@pytest.fixture(scope="module")
def f32_run(tmp_path_factory):
    """The tiny float32 run, shared by the tests that compare against it: (record, workdir,
    compiles). Once per session: when xdist gives the two tests to both workers, a module fixture
    trained it in each; the tests only read the run's files."""
    folder, record = built_once(tmp_path_factory, "loop-f32-run", _f32_record)
    return SimpleNamespace(step=record["step"], eval=record["eval"]), str(folder / "run"), record["compiles"]


def _falls(losses):
    return np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])


def test_tiny_trains_and_loss_falls(f32_run):
    result, workdir, compiles = f32_run
    losses = _losses(workdir)
    assert result.step == 30 and len(losses) == 30 and np.all(np.isfinite(losses))
    assert _falls(losses), losses
    assert 0.0 <= result.eval["eval_accuracy"] <= 1.0 and np.isfinite(result.eval["eval_loss"])
    assert compiles == 1  # one train-step compilation for the whole run
    assert os.listdir(os.path.join(workdir, "tb"))  # TensorBoard events
    assert ckpt.restore_config(os.path.join(workdir, "checkpoints"))["model"]["vocab_size"] == 32


@pytest.mark.parametrize("kind", ["transformer", "mamba"])
def test_every_kind_trains(tmp_path, kind):
    result, workdir = _run(tmp_path, kind, [f"model.kind={kind}"])
    losses = _losses(workdir)
    assert np.all(np.isfinite(losses)) and _falls(losses), losses


def test_bfloat16_compute_matches_float32_and_compiles_once(tmp_path, f32_run):
    assert _run_counting(tmp_path, "bf16", ["model.dtype=bfloat16"])[2] == 1  # one compilation over the run
    bf16, f32 = _losses(str(tmp_path / "bf16")), _losses(f32_run[1])
    assert np.all(np.isfinite(bf16))
    # bfloat16 keeps 8 mantissa bits (2^-8 relative per op); params and the update stay float32,
    # so the final loss stays within 5% of the float32 run's
    assert abs(bf16[-1] - f32[-1]) <= 0.05 * abs(f32[-1]), (bf16[-5:], f32[-5:])


def test_nan_stops_with_the_step_and_saves_nothing_broken(tmp_path, monkeypatch):
    make_real = loop.make_train_step

    def make_poisoned(*args, **kwargs):
        real = make_real(*args, **kwargs)

        def poisoned(state, batch, *rest):
            if int(state.step) == 6:  # the 7th update sees a NaN loss
                batch = dict(batch, weights=batch["weights"] * jnp.nan)
            return real(state, batch, *rest)

        return poisoned

    monkeypatch.setattr(loop, "make_train_step", make_poisoned)
    with pytest.raises(loop.NonFiniteError, match=r"non-finite loss or gradient at step 7"):
        _run(tmp_path, "nan", ["checkpoint.every=5", "model.kind=transformer"])
    steps = sorted(int(d) for d in os.listdir(tmp_path / "nan" / "checkpoints") if d.isdigit())
    assert steps == [5]
    params = ckpt.restore_params(str(tmp_path / "nan" / "checkpoints"))
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def test_gradient_accumulation_matches_one_big_batch():
    cfg = load_config("tiny", ["model.kind=transformer"])
    model, tx = build_model(resolve(cfg)), make_optimizer(cfg.optim, cfg.train.steps)
    batch = {k: jnp.asarray(v) for k, v in next(make_iterator(cfg.data)).items()}
    state = create_state(model, tx, 0, 32)  # one compile; train_step donates it, so each step gets a copy
    s1, m1 = train_step(jax.tree_util.tree_map(jnp.copy, state), batch, grad_accum=1)
    s2, m2 = train_step(jax.tree_util.tree_map(jnp.copy, state), batch, grad_accum=2)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # float32 sums in a different order


def test_weight_decay_mask():
    params = {
        "params": {
            "embed": {"embedding": jnp.ones((4, 2))},
            "layers_0": {
                "W_in": {"kernel": jnp.ones((2, 4)), "bias": jnp.ones(4)},
                "ln": {"scale": jnp.ones(2)},
                "gamma_bias": jnp.ones(()),
            },
        }
    }
    mask = decay_mask(params)["params"]
    assert mask["layers_0"]["W_in"]["kernel"] is True
    assert not any(
        [
            mask["embed"]["embedding"],
            mask["layers_0"]["W_in"]["bias"],
            mask["layers_0"]["ln"]["scale"],
            mask["layers_0"]["gamma_bias"],
        ]
    )


def test_an_eval_split_too_small_for_one_batch_fails_before_training(tmp_path):
    """Before, eval read zero batches and reported loss 0 / accuracy 0; now the run stops up front."""
    (tmp_path / "doc.txt").write_bytes(b"abcdefgh" * 100)  # 801 tokens: 25 rows of 32, 1 for eval
    with pytest.raises(ValueError, match=r"eval split has 1 rows.*data.batch_size=8"):
        _run(
            tmp_path,
            "small_eval",
            [
                "data.task=text",
                f"data.text.path={tmp_path / 'doc.txt'}",
                "data.text.max_bytes=0",
                "train.steps=6",
                "optim.warmup_steps=1",
            ],
        )
    assert not os.path.exists(tmp_path / "small_eval" / "checkpoints")  # nothing was trained
