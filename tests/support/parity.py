"""Shared helpers for the core tests: golden fixtures, configs and error measures."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from sessa_jax import SessaConfig
from sessa_jax.convert import layer_params_from_torch

FIXTURE_DIR = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = sorted(p.stem for p in FIXTURE_DIR.glob("reference_layer_*.npz"))


def load_fixture(name: str):
    """(npz arrays, parsed config_json) of a golden fixture."""
    z = np.load(FIXTURE_DIR / f"{name}.npz")
    return {k: z[k] for k in z.files}, json.loads(str(z["config_json"]))


def fixture_config(meta: dict, *, solver: str, dtype, chunk_size: int = 8) -> SessaConfig:
    return SessaConfig(
        d_model=meta["D"],
        n_heads=meta["n_heads"],
        n_kv_heads=meta["n_kv_heads"],
        rope=meta["rope"],
        gamma_max=meta["gamma_max"],
        ln_eps=meta["ln_eps"],
        solver=solver,
        chunk_size=chunk_size,
        leaf_size=chunk_size,
        dtype=dtype,
        param_dtype=dtype,
    )


def torch_state_dict(arrays: dict) -> dict:
    return {k[2:]: v for k, v in arrays.items() if k.startswith("w/")}


def fixture_variables(arrays: dict, cfg: SessaConfig):
    return layer_params_from_torch(torch_state_dict(arrays), cfg, dtype=jnp.dtype(cfg.param_dtype))


def rel_err(actual, expected, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected))), floor)
    return float(np.max(np.abs(actual - expected)) / scale)


# Segments that start inside tiles, a one-token segment, padding (id 0) in the middle and at
# the end (T = 37): with small chunks some off-diagonal tiles are fully masked for some rows.
SEGMENTS_37 = jnp.array([[1] * 6 + [2] + [0] * 3 + [3] * 20 + [4] * 5 + [0] * 2, [5] * 4 + [6] * 9 + [7] * 24])


def output_and_grads(fn, args, cot):
    """(fn(*args), gradients of sum(fn(*args) * cot) for every arg), jitted."""

    def loss(*a):
        out = fn(*a)
        return jnp.sum(out * cot), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return out, grads
