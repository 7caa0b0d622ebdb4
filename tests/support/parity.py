"""Shared helpers for the core tests: where the golden fixtures lie, segment ids, outputs with gradients."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

FIXTURE_DIR = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = sorted(p.stem for p in FIXTURE_DIR.glob("reference_layer_*.npz"))


def fixture_path(name: str) -> pathlib.Path:
    """The golden file of fixture ``name`` (a stem of ``FIXTURES``)."""
    return FIXTURE_DIR / f"{name}.npz"


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
