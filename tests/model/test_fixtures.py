"""Parity with the published PyTorch layer on the golden fixtures (docs/design.md, "Parity")."""

import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.convert import layer_params_from_torch, layer_params_to_torch
from sessa_jax.golden import golden_config, golden_state_dict, load_golden, relative_error, run_golden
from tests.support.parity import FIXTURES, fixture_path

# (output tolerance, gradient tolerance) per precision: the parity bounds of docs/design.md.
TOLERANCES = {"float32": (1e-4, 1e-3), "float64": (1e-9, 1e-9)}


def load_fixture(name: str):
    return load_golden(fixture_path(name))


def _results(name: str, solver: str, precision: str):
    """Everything compared against one fixture for one (solver, precision)."""
    arrays, meta = load_fixture(name)
    return run_golden(arrays, meta, solver, precision)


CASES = [
    (n, solver, p) for n in FIXTURES for solver in ("dense", "blocked", "recursive") for p in ("float32", "float64")
]


def _misses(name: str, solver: str, precision: str) -> dict:
    """{quantity: (relative error, tolerance)} of every compared quantity over its tolerance."""
    arrays, _ = load_fixture(name)
    res = _results(name, solver, precision)
    out_tol, grad_tol = TOLERANCES[precision]
    errors = {
        key: (relative_error(res[got], arrays[want]), out_tol)
        for key, got, want in (
            ("y", "y", "y"),
            ("s", "s", "s"),
            ("loss", "loss", "loss"),
            ("prefill + decode", "y_decode", "y_prefill_decode"),
        )
    }
    errors["grad x"] = (relative_error(res["grad_x"], arrays["grad/x"]), grad_tol)
    # Some weight gradients are exactly zero in exact arithmetic (without RoPE, a key bias
    # shifts every logit of a row equally and softmax ignores it), so each tensor's error
    # is measured against max(its own scale, 1e-3 x the largest weight gradient).
    largest = max(float(np.max(np.abs(arrays[f"grad/w/{k}"]))) for k in res["grad_w"])
    assert set(res["grad_w"]) == {k[len("grad/w/") :] for k in arrays if k.startswith("grad/w/")}
    for key, value in res["grad_w"].items():
        errors[f"grad {key}"] = (relative_error(value, arrays[f"grad/w/{key}"], floor=1e-3 * largest), grad_tol)
    return {key: (err, tol) for key, (err, tol) in errors.items() if not err <= tol}


@pytest.mark.parametrize("name,solver,precision", CASES)
def test_outputs_gradients_and_decode_match_reference(name, solver, precision):
    """Outputs y, s and the loss, the input and weight gradients, and prefill + decode, against
    the golden run (one test per case: they share one compiled run); every miss is listed."""
    assert _misses(name, solver, precision) == {}


@pytest.mark.parametrize("name", FIXTURES)
def test_torch_names_round_trip_bit_exact(name):
    arrays, meta = load_fixture(name)
    cfg = golden_config(meta, solver="blocked", dtype=jnp.float32)
    sd = golden_state_dict(arrays)
    back = layer_params_to_torch(layer_params_from_torch(sd, cfg), cfg, include_buffers=False, as_torch=False)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)


def test_converter_rejects_wrong_shapes_and_missing_names():
    arrays, meta = load_fixture(FIXTURES[0])
    cfg = golden_config(meta, solver="blocked", dtype=jnp.float32)
    sd = golden_state_dict(arrays)
    bad = dict(sd)
    bad["W_in.weight"] = bad["W_in.weight"][:, :-1]
    with pytest.raises(ValueError, match="W_in.weight has shape"):
        layer_params_from_torch(bad, cfg)
    missing = {k: v for k, v in sd.items() if k != "mixer.proj_fb.bias"}
    with pytest.raises(KeyError, match="mixer.proj_fb.bias"):
        layer_params_from_torch(missing, cfg)
