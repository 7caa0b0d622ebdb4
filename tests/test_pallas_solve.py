"""Pallas feedback-solve kernels in interpret mode vs the dense oracle (forward and all grads).

GPU (Triton) kernels run with interpret=True, TPU (Mosaic) kernels with
pltpu.InterpretParams() (uninitialised VMEM is NaN there, so a stray read of unwritten
scratch would show up). Tiny shapes keep the whole file to about a minute on 2 cores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.ops import feedback_solve
from sessa_jax.ops import pallas as pallas_mod
from sessa_jax.ops.pallas import pallas_feedback_solve
from sessa_jax.ops.tiling import Tiling

TOL = {"float32": 1e-4, "bfloat16": 2e-2}


def make_inputs(seed, b, t, d, dtype, packed):
    """Seeded inputs; gamma includes exactly +-0.999 and 0; packed segments include length-1 ones."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, d)) * 1.5
    k = rng.standard_normal((b, t, d)) * 1.5
    f = rng.standard_normal((b, t, d))
    gamma = rng.uniform(-0.999, 0.999, (b, t))
    gamma[:, ::3] = 0.999
    gamma[:, 1::5] = -0.999
    gamma[:, 2::7] = 0.0
    seg = None
    if packed:
        starts = np.zeros((b, t), np.int32)
        starts[:, [p for p in (1, 2, 9, 10, 20, 33) if p < t]] = 1  # segments of length 1 at 0, 1, 9
        starts[1:, 5 % t] = 1
        seg = jnp.asarray(np.cumsum(starts, axis=1).astype(np.int32))
    cast = lambda x: jnp.asarray(x, jnp.float32).astype(dtype)
    ds = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    return (cast(q), cast(k), cast(gamma), cast(f)), seg, ds


def dense(q, k, gamma, f, seg):
    up = [x.astype(jnp.float32) for x in (q, k, gamma, f)]
    return feedback_solve(*up, segment_ids=seg, method="dense")


def value_and_grads(fn, args, ds):
    s, vjp = jax.vjp(fn, *args)
    return s, vjp(ds.astype(s.dtype))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_against_dense(solve, args, seg, ds, dtype):
    with jax.default_matmul_precision("highest"):
        s, grads = value_and_grads(jax.jit(lambda *a: solve(*a, seg)), args, ds)
        s_ref, grads_ref = value_and_grads(lambda *a: dense(*a, seg), args, ds)
    assert s.dtype == args[3].dtype and s.shape == args[3].shape
    tol = TOL[jnp.dtype(dtype).name]
    for name, got, want in zip(("s", "dq", "dk", "dgamma", "df"), (s, *grads), (s_ref, *grads_ref)):
        assert np.all(np.isfinite(np.asarray(got, np.float32))), name
        assert rel_err(got, want) < tol, (name, rel_err(got, want))


CASES = [
    # backend, b, t, d, dtype, chunk, packed
    ("gpu", 2, 37, 16, "float32", 8, True),
    ("gpu", 1, 64, 8, "float32", 16, False),
    ("gpu", 2, 37, 16, "bfloat16", 8, True),
    ("gpu", 1, 1, 8, "float32", 8, False),
    ("gpu", 1, 5, 128, "float32", 8, True),
    ("tpu", 2, 37, 16, "float32", 8, True),
    ("tpu", 1, 64, 8, "bfloat16", 16, False),
    ("tpu", 1, 5, 8, "float32", 8, False),
]


@pytest.mark.parametrize("backend,b,t,d,dtype,chunk,packed", CASES)
def test_kernel_matches_dense(backend, b, t, d, dtype, chunk, packed):
    args, seg, ds = make_inputs(t * 7 + d, b, t, d, jnp.dtype(dtype), packed)

    def solve(q, k, gamma, f, seg):
        return pallas_feedback_solve(q, k, gamma, f, seg, chunk_size=chunk, backend=backend, interpret=True)

    check_against_dense(solve, args, seg, ds, dtype)


def test_gpu_kernel_split_output_columns():
    """Dv < D: each forward / lam program owns 8 of 16 columns and recomputes the logits."""
    args, seg, ds = make_inputs(3, 2, 29, 16, jnp.float32, True)
    tl = Tiling("gpu", chunk=8, key_block=8, block_d=8, t_padded=32, d_padded=16)
    cfg = pallas_mod._Static(tl, 1.0 / math.sqrt(16), True)

    def solve(q, k, gamma, f, seg):
        pad = lambda x: jnp.pad(x, [(0, 0), (0, 3)] + [(0, 0)] * (x.ndim - 2))
        return pallas_mod._solve(cfg, pad(q), pad(k), pad(gamma), pad(f), pad(seg))[:, :29]

    check_against_dense(solve, args, seg, ds, "float32")


def test_empty_rows_are_exact():
    """Every token its own segment: A = 0, so s == f exactly and dgamma == 0, no NaN."""
    args, _, ds = make_inputs(5, 1, 12, 8, jnp.float32, False)
    seg = jnp.arange(12, dtype=jnp.int32)[None]
    solve = lambda *a: pallas_feedback_solve(*a, seg, chunk_size=8, backend="gpu", interpret=True)
    s, (dq, dk, dgamma, df) = value_and_grads(solve, args, ds)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(args[3]))
    np.testing.assert_array_equal(np.asarray(df), np.asarray(ds))
    for g in (dq, dk, dgamma):
        np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_unsupported_raises_not_implemented():
    args, _, _ = make_inputs(0, 1, 8, 8, jnp.float32, False)
    if jax.default_backend() == "cpu":
        with pytest.raises(NotImplementedError):
            pallas_feedback_solve(*args)  # no kernel for CPU without interpret
    with pytest.raises(NotImplementedError):
        pallas_feedback_solve(*args, backend="cpu", interpret=True)
    with pytest.raises(NotImplementedError):
        pallas_feedback_solve(*(x.astype(jnp.int32) for x in args), backend="gpu", interpret=True)
    with pytest.raises(NotImplementedError):
        pallas_feedback_solve(*args, chunk_size=12, backend="gpu", interpret=True)  # not a power of two
