"""Inputs and the oracle comparison shared by the Pallas feedback-solve tests
(interpret mode on CPU: test_pallas_solve.py; compiled on a GPU/TPU: test_pallas_device.py)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from _parity import rel_err

from sessa_jax.ops import feedback_solve
from sessa_jax.ops.pallas import pallas_feedback_solve

SD = jax.ShapeDtypeStruct

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


def check_against_dense(solve, args, seg, ds, dtype):
    with jax.default_matmul_precision("highest"):
        s, grads = value_and_grads(jax.jit(lambda *a: solve(*a, seg)), args, ds)
        s_ref, grads_ref = value_and_grads(lambda *a: dense(*a, seg), args, ds)
    assert s.dtype == args[3].dtype and s.shape == args[3].shape
    tol = TOL[jnp.dtype(dtype).name]
    for name, got, want in zip(("s", "dq", "dk", "dgamma", "df"), (s, *grads), (s_ref, *grads_ref)):
        assert np.all(np.isfinite(np.asarray(got, np.float32))), name
        err = rel_err(got, want, floor=1e-30)
        assert err < tol, (name, err)


def solve_grad_fn(backend, chunk, interpret=False):
    """jit(value_and_grad) of sum(s**2) through the Pallas solve, in q, k, gamma, f."""
    def loss(q, k, g, f, seg):
        s = pallas_feedback_solve(q, k, g, f, seg, chunk_size=chunk, backend=backend, interpret=interpret)
        return jnp.sum(s.astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def solve_args(b, t, d, dtype):
    """Abstract (q, k, gamma, f, segment_ids) for tracing solve_grad_fn."""
    return (SD((b, t, d), dtype), SD((b, t, d), dtype), SD((b, t), dtype), SD((b, t, d), dtype),
            SD((b, t), jnp.int32))


def two_t_dims(text, t):
    """Shapes in HLO (f32[a,b,c]) or StableHLO (tensor<axbxf32>) text with >= 2 dims >= t."""
    shapes = re.findall(r"\[([\d,]+)\]", text) + [s.replace("x", ",") for s in re.findall(r"tensor<([\dx]+)x", text)]
    return sorted({s for s in shapes if sum(int(v) >= t for v in s.split(",") if v) >= 2})
