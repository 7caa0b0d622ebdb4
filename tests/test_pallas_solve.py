"""Pallas feedback-solve kernels in interpret mode vs the dense oracle (forward and all grads).

GPU (Triton) kernels run with interpret=True, TPU (Mosaic) kernels with
pltpu.InterpretParams() (uninitialised VMEM is NaN there, so a stray read of unwritten
scratch would show up). Tiny shapes keep the whole file to about a minute on 2 cores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _pallas_cases import check_against_dense, make_inputs, value_and_grads

from sessa_jax.ops.pallas import pallas_feedback_solve

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
    """block_d < D: each forward / lam program owns 8 of 16 (padded) columns and recomputes the logits."""
    args, seg, ds = make_inputs(3, 2, 29, 13, jnp.float32, True)

    def solve(q, k, gamma, f, seg):
        return pallas_feedback_solve(q, k, gamma, f, seg, chunk_size=8, block_d=8, backend="gpu", interpret=True)

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
