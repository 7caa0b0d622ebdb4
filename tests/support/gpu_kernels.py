"""Skips shared by the Mosaic GPU kernel tests: interpret mode and CUDA lowering need a recent JAX."""

from __future__ import annotations

import jax
import pytest

from sessa_jax.ops.solve.row_stats_gpu import interpret_params


def interpret_or_skip():
    """``plgpu.InterpretGPUParams()`` for the kernels' ``interpret=``; skips where JAX has none."""
    params = interpret_params()
    if params is None:
        pytest.skip(f"jax {jax.__version__} has no Mosaic GPU interpret mode (plgpu.InterpretGPUParams, jax >= 0.11)")
    return params


def lower_or_skip(fn, args):
    """StableHLO text of jitted ``fn`` lowered for cuda at ``args`` (ShapeDtypeStructs); skips,
    saying why, where the installed JAX cannot lower Mosaic GPU for cuda."""
    try:
        return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as err:  # noqa: BLE001 - report why the installed JAX cannot
        pytest.skip(f"lowering Mosaic GPU for cuda not supported here: {type(err).__name__}: {err}"[:500])
