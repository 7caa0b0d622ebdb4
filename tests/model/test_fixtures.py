"""Parity with the published PyTorch layer on the golden fixtures (docs/design.md, "Parity")."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax import SessaLayer, SessaMixer
from sessa_jax.convert import layer_params_from_torch, layer_params_to_torch
from sessa_jax.decoding import init_layer_cache
from tests.support.parity import FIXTURES, fixture_config, fixture_variables, load_fixture, rel_err, torch_state_dict

# (output tolerance, gradient tolerance) per precision: the parity bounds of docs/design.md.
TOLERANCES = {"float32": (1e-4, 1e-3), "float64": (1e-9, 1e-9)}


@functools.lru_cache(maxsize=None)
def _results(name: str, solver: str, precision: str):
    """Everything compared against one fixture, computed once per (fixture, solver, precision)."""
    arrays, meta = load_fixture(name)
    with jax.enable_x64(precision == "float64"):
        dtype = jnp.dtype(precision)
        cfg = fixture_config(meta, solver=solver, dtype=dtype)
        layer = SessaLayer(cfg)
        variables = fixture_variables(arrays, cfg)
        x = jnp.asarray(arrays["x"], dtype)
        r = jnp.asarray(arrays["r"], dtype)
        s = jax.jit(SessaMixer(cfg).apply)(
            {"params": variables["params"]["mixer"]}, jnp.asarray(arrays["bar_a"], dtype)
        )

        def loss(v, x):
            y = layer.apply(v, x)
            return jnp.sum(y * r), y

        (loss_value, y), (g_vars, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables, x)
        g_torch = layer_params_to_torch(g_vars, cfg, include_buffers=False, as_torch=False)

        prefill_len = meta["prefill"]
        step = jax.jit(lambda v, xt, c: layer.apply(v, xt, cache=c, decode=True))
        cache = init_layer_cache(cfg, x.shape[0], max_len=x.shape[1])
        y_pre, cache = jax.jit(lambda v, xp, c: layer.apply(v, xp, cache=c))(variables, x[:, :prefill_len], cache)
        outs = [y_pre]
        for t in range(prefill_len, x.shape[1]):
            y_t, cache = step(variables, x[:, t : t + 1], cache)
            outs.append(y_t)
        y_decode = jnp.concatenate(outs, axis=1)
        return jax.tree_util.tree_map(
            np.asarray, dict(y=y, s=s, loss=loss_value, grad_x=g_x, grad_w=g_torch, y_decode=y_decode)
        )


CASES = [
    (n, solver, p) for n in FIXTURES for solver in ("dense", "blocked", "recursive") for p in ("float32", "float64")
]


@pytest.mark.parametrize("name,solver,precision", CASES)
def test_outputs_match_reference(name, solver, precision):
    arrays, _ = load_fixture(name)
    res = _results(name, solver, precision)
    out_tol, _ = TOLERANCES[precision]
    assert rel_err(res["y"], arrays["y"]) <= out_tol
    assert rel_err(res["s"], arrays["s"]) <= out_tol
    assert rel_err(res["loss"], arrays["loss"]) <= out_tol


@pytest.mark.parametrize("name,solver,precision", CASES)
def test_gradients_match_reference(name, solver, precision):
    arrays, _ = load_fixture(name)
    res = _results(name, solver, precision)
    _, grad_tol = TOLERANCES[precision]
    assert rel_err(res["grad_x"], arrays["grad/x"]) <= grad_tol
    # Some weight gradients are exactly zero in exact arithmetic (without RoPE, a key bias
    # shifts every logit of a row equally and softmax ignores it), so each tensor's error
    # is measured against max(its own scale, 1e-3 x the largest weight gradient).
    largest = max(float(np.max(np.abs(arrays[f"grad/w/{k}"]))) for k in res["grad_w"])
    assert set(res["grad_w"]) == {k[len("grad/w/") :] for k in arrays if k.startswith("grad/w/")}
    for key, value in res["grad_w"].items():
        err = rel_err(value, arrays[f"grad/w/{key}"], floor=1e-3 * largest)
        assert err <= grad_tol, (key, err)


@pytest.mark.parametrize("name,solver,precision", CASES)
def test_prefill_then_decode_matches_reference(name, solver, precision):
    arrays, _ = load_fixture(name)
    res = _results(name, solver, precision)
    out_tol, _ = TOLERANCES[precision]
    assert rel_err(res["y_decode"], arrays["y_prefill_decode"]) <= out_tol


@pytest.mark.parametrize("name", FIXTURES)
def test_torch_names_round_trip_bit_exact(name):
    arrays, meta = load_fixture(name)
    cfg = fixture_config(meta, solver="blocked", dtype=jnp.float32)
    sd = torch_state_dict(arrays)
    back = layer_params_to_torch(layer_params_from_torch(sd, cfg), cfg, include_buffers=False, as_torch=False)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)


def test_converter_rejects_wrong_shapes_and_missing_names():
    arrays, meta = load_fixture(FIXTURES[0])
    cfg = fixture_config(meta, solver="blocked", dtype=jnp.float32)
    sd = torch_state_dict(arrays)
    bad = dict(sd)
    bad["W_in.weight"] = bad["W_in.weight"][:, :-1]
    with pytest.raises(ValueError, match="W_in.weight has shape"):
        layer_params_from_torch(bad, cfg)
    missing = {k: v for k, v in sd.items() if k != "mixer.proj_fb.bias"}
    with pytest.raises(KeyError, match="mixer.proj_fb.bias"):
        layer_params_from_torch(missing, cfg)
