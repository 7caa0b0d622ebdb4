"""Weight decay by parameter role (the same with and without scan_layers), the learning-rate
schedules against independent formulas, and one compiled train step for any schedule numbers."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sessa_jax.train import loop
from sessa_jax.train.config import ConfigError, load_config, resolve
from sessa_jax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from sessa_jax.train.state import build_model, init_params


def _param_paths(kind: str, scan: bool) -> dict:
    cfg = load_config("tiny", [f"model.kind={kind}", f"model.scan_layers={scan}"])
    model = build_model(resolve(cfg))
    params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), 32))
    return params


def _decayed(params, decay_embeddings=False) -> set:
    """Decayed leaf paths, with a layer index (layers_3) written as the stack name (layers)."""
    flat = jax.tree_util.tree_flatten_with_path(decay_mask(params, decay_embeddings))[0]
    return {re.sub(r"layers_\d+", "layers", jax.tree_util.keystr(p)) for p, keep in flat if keep}


def _leaf_names(params) -> set:
    return {
        re.sub(r"layers_\d+", "layers", jax.tree_util.keystr(p))
        for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    }


@pytest.mark.parametrize("kind", ["sessa", "transformer", "mamba"])
def test_weight_decay_by_role_is_the_same_with_and_without_scan_layers(kind):
    plain, stacked = _param_paths(kind, False), _param_paths(kind, True)
    assert _leaf_names(plain) == _leaf_names(stacked)
    # Expected independently of the mask's rules: exactly the matrices of linear maps and
    # Mamba's depthwise conv are decayed; biases, norms, gamma_bias, A_log, D and the
    # embedding are not.
    names = _leaf_names(plain)
    expected = {n for n in names if n.endswith("['kernel']") or n.endswith("['conv_kernel']")}
    assert expected and _decayed(plain) == expected
    assert _decayed(stacked) == expected  # a stacked leaf has one more axis, and the same role
    never = {n for n in names if re.search(r"\['(bias|scale|gamma_bias|conv_bias|A_log|D)'\]$", n)}
    assert never and not never & _decayed(stacked)


def test_embeddings_are_decayed_when_the_config_says_so():
    params = _param_paths("sessa", True)
    assert "['params']['embed']['embedding']" not in _decayed(params)
    assert _decayed(params, decay_embeddings=True) - _decayed(params) == {"['params']['embed']['embedding']"}
    cfg = load_config("tiny", ["optim.decay_embeddings=True", "model.scan_layers=True"])
    tx = make_optimizer(cfg.optim, 30)
    p = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, p)
    # Zero gradients: Adam's step is 0, so the whole update is the decay, -lr * wd * p.
    state = tx.init(p)
    for _ in range(cfg.optim.warmup_steps + 1):  # past the warmup, where the lr is not 0
        updates, state = tx.update(zeros, state, p)
    moved = {
        re.sub(r"layers_\d+", "layers", jax.tree_util.keystr(k))
        for k, u in jax.tree_util.tree_flatten_with_path(updates)[0]
        if bool(jnp.any(u != 0))
    }
    assert moved == _decayed(params, decay_embeddings=True)


def _optax_reference(kind: str, lr: float, warmup: int, steps: int, end: float, decay_start: int):
    """The schedules built from optax's own pieces (independent of sessa_jax.train.optimizer)."""
    warm = optax.linear_schedule(0.0, lr, warmup)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end)
    if kind == "linear":
        return optax.join_schedules([warm, optax.linear_schedule(lr, end, steps - warmup)], [warmup])
    if kind == "constant":
        return optax.join_schedules([warm, optax.constant_schedule(lr)], [warmup])
    return optax.join_schedules(
        [warm, optax.constant_schedule(lr), optax.linear_schedule(lr, end, steps - decay_start)], [warmup, decay_start]
    )


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "wsd"])
def test_schedules_match_optax_built_references(kind):
    steps, warmup, lr, ratio, frac = 40, 6, 2e-3, 0.1, 0.25
    cfg = load_config(
        "tiny",
        [
            f"optim.schedule={kind}",
            f"train.steps={steps}",
            f"optim.warmup_steps={warmup}",
            f"optim.lr={lr}",
            f"optim.min_lr_ratio={ratio}",
            f"optim.decay_fraction={frac}",
        ],
    )
    ours = learning_rate_schedule(cfg.optim, steps)
    ref = _optax_reference(kind, lr, warmup, steps, lr * ratio, steps - math.ceil(frac * steps))
    got = np.array([ours(c) for c in range(steps + 3)])
    want = np.array([float(ref(c)) for c in range(steps + 3)])
    np.testing.assert_allclose(got, want, rtol=4 * np.finfo(np.float32).eps, atol=lr * np.finfo(np.float32).eps)
    assert (
        got[0] == 0
        and got[warmup] == pytest.approx(lr)
        and got[-1] == pytest.approx(lr if kind == "constant" else lr * ratio)
    )


def test_bad_schedule_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"optim.schedule='cosin' is unknown; choose one of"):
        load_config("tiny", ["optim.schedule=cosin"])
    with pytest.raises(ConfigError, match=r"optim.decay_fraction must lie in \(0, 1\]"):
        load_config("tiny", ["optim.decay_fraction=0.0"])


def test_the_loops_train_step_does_not_depend_on_the_schedules_numbers(tmp_path, monkeypatch):
    """train.steps, the warmup, lr and min_lr_ratio are inputs of the compiled step: two runs
    that differ only in them lower to the same program (the persistent compilation cache's
    key is computed from it), and one jitted step runs both without compiling again."""
    made = []
    real = loop.make_train_step

    def capture(*args, **kwargs):
        fn = real(*args, **kwargs)

        def step(state, batch, *rest):
            if not any(m[0] is fn for m in made):
                made.append((fn, fn.lower(state, batch, *rest).as_text(), rest, state.tx))
            return fn(state, batch, *rest)

        return step

    monkeypatch.setattr(loop, "make_train_step", capture)
    base = ["train.progress=False", "train.eval_batches=1", "checkpoint.every=0", "train.compilation_cache="]
    loop.train(
        load_config("tiny", base + ["train.steps=3", "optim.warmup_steps=1"]), str(tmp_path / "a"), log=lambda s: None
    )
    loop.train(
        load_config(
            "tiny", base + ["train.steps=5", "optim.warmup_steps=2", "optim.lr=0.01", "optim.min_lr_ratio=0.5"]
        ),
        str(tmp_path / "b"),
        log=lambda s: None,
    )
    (fn_a, hlo_a, sched_a, tx_a), (_, hlo_b, sched_b, _) = made
    assert hlo_a == hlo_b
    assert sched_a and sched_a != sched_b  # the numbers differ, as inputs
    # One jitted step takes other numbers without compiling again, and they take effect.
    from sessa_jax import sharding
    from sessa_jax.data import global_batch, make_iterator
    from sessa_jax.train.optimizer import schedule_inputs
    from sessa_jax.train.state import create_state, state_shardings
    from sessa_jax.train.step import make_train_step

    cfg = load_config("tiny", base + ["optim.warmup_steps=0"])
    model = build_model(resolve(cfg))
    mesh = sharding.make_mesh(dict(cfg.mesh))
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    shardings = state_shardings(model, tx, 0, cfg.data.seq_len, mesh)
    batch = global_batch(next(make_iterator(cfg.data)), sharding.batch_sharding(mesh))
    step = make_train_step(shardings, sharding.batch_sharding(mesh), schedule_input=True)
    params = []
    with sharding.activate(mesh):
        for lr in (1e-3, 3e-3):
            sched = jax.tree_util.tree_map(np.float32, schedule_inputs(_with_lr(cfg.optim, lr), 30))
            state, _ = step(create_state(model, tx, 0, cfg.data.seq_len, sharding=shardings), batch, sched)
            params.append(jax.tree_util.tree_leaves(state.params))
    assert step._cache_size() == 1
    init = jax.tree_util.tree_leaves(create_state(model, tx, 0, cfg.data.seq_len).params)
    moved = [np.abs(np.asarray(p) - np.asarray(q)).max() for p, q in zip(params[0], init)]
    moved3 = [np.abs(np.asarray(p) - np.asarray(q)).max() for p, q in zip(params[1], init)]
    # Adam's first step moves each weight by about lr: three times the lr, three times the move.
    np.testing.assert_allclose(max(moved3) / max(moved), 3.0, rtol=0.05)


def _with_lr(optim, lr):
    out = optim.copy_and_resolve_references()
    out.lr = lr
    return out
