"""The Pallas kernels compiled for the accelerator this runs on (GPU: Triton, TPU: Mosaic).

test_pallas_solve.py runs the same kernels in interpret mode on CPU; this file is their
compiled counterpart, skipped where jax.default_backend() is "cpu", so `make test` never
needs an accelerator. On a GPU or TPU machine:

    python -m pytest -q tests/test_pallas_device.py

It checks the compiled feedback solve (forward and all gradients) and the layer with
solver="auto" against the dense oracle, that "auto" really selects the kernels there, that
the compiled forward + backward holds no T x T buffer, and the accelerated attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _parity import rel_err
from _pallas_cases import TOL, check_against_dense, make_inputs, solve_args, solve_grad_fn, two_t_dims

from sessa_jax import SessaConfig, SessaLayer
from sessa_jax.ops import causal_attention, feedback_solve
from sessa_jax.ops.attention_backends import accelerated_causal_attention
from sessa_jax.ops.pallas import pallas_feedback_solve, resolve_backend

pytestmark = pytest.mark.skipif(
    jax.default_backend() == "cpu",
    reason="compiled Pallas kernels need a GPU or TPU; interpret mode is tested in test_pallas_solve.py",
)

KERNEL_MARKER = {"gpu": "xla.gpu.triton", "tpu": "tpu_custom_call"}


def backend():
    return resolve_backend(None, False)


@pytest.mark.parametrize("b,t,d,dtype,packed", [
    (2, 300, 256, "float32", True),  # T not a multiple of any chunk, packed, length-1 segments
    (2, 300, 256, "bfloat16", True),
    (1, 1000, 1024, "bfloat16", False),  # the benchmark's width: several column blocks
    (1, 1, 16, "float32", False),  # a single token: no past at all
    (1, 70, 40, "float32", False),  # D not a power of two: padded
])
def test_compiled_kernel_matches_dense(b, t, d, dtype, packed):
    args, seg, ds = make_inputs(t + d, b, t, d, jnp.dtype(dtype), packed)
    check_against_dense(lambda *a: pallas_feedback_solve(*a), args, seg, ds, dtype)


def test_auto_selects_the_kernel():
    args, seg, _ = make_inputs(0, 1, 64, 32, jnp.float32, True)
    fn = jax.jit(lambda *a: feedback_solve(*a, segment_ids=seg, method="auto"))
    assert KERNEL_MARKER[backend()] in fn.lower(*args).as_text()


def test_compiled_program_has_no_t_by_t_buffer():
    b, t, d = 1, 4096, 128
    compiled = solve_grad_fn(backend(), None).trace(*solve_args(b, t, d, jnp.bfloat16)).lower().compile()
    assert two_t_dims(compiled.as_text(), t) == []
    mem = compiled.memory_analysis()
    if mem is not None:
        assert mem.temp_size_in_bytes < b * t * t * 4 / 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_auto_matches_dense(dtype):
    """The whole Sessa layer: solver="auto" (kernels) vs solver="dense" with the same params."""
    cfg = dict(d_model=256, n_heads=2, dtype=jnp.dtype(dtype), max_len=512)
    auto, dense = SessaLayer(SessaConfig(solver="auto", **cfg)), SessaLayer(SessaConfig(solver="dense", **cfg))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 333, 256), jnp.float32).astype(dtype)
    params = auto.init(jax.random.PRNGKey(1), x)
    loss = lambda layer: jax.jit(jax.value_and_grad(
        lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2), argnums=(0, 1)))
    with jax.default_matmul_precision("highest"):
        y, y_ref = auto.apply(params, x), dense.apply(params, x)
        (_, grads), (_, grads_ref) = loss(auto)(params, x), loss(dense)(params, x)
    tol = TOL[dtype]
    assert rel_err(y.astype(jnp.float32), y_ref.astype(jnp.float32)) < tol
    # Some weight gradients are exactly zero in exact arithmetic (softmax shift invariance of
    # the key biases), so each error is measured against at least 1e-3 of the largest one.
    largest = max(float(jnp.max(jnp.abs(g.astype(jnp.float32)))) for g in jax.tree.leaves(grads_ref))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert np.all(np.isfinite(np.asarray(got, np.float32)))
        assert rel_err(got.astype(jnp.float32), want.astype(jnp.float32), floor=1e-3 * largest) < 2 * tol


def test_accelerated_attention_matches_dense():
    b, t, h, hkv, kd = 2, 300, 4, 2, 128
    ks = jax.random.split(jax.random.PRNGKey(2), 4)
    q, k, v, r = (jax.random.normal(kk, (b, t, n, kd), jnp.float32).astype(jnp.bfloat16)
                  for kk, n in zip(ks, (h, hkv, hkv, h)))
    fast = lambda q, k, v: accelerated_causal_attention(q, k, v)
    ref = lambda q, k, v: causal_attention(*(x.astype(jnp.float32) for x in (q, k, v)), method="dense")
    with jax.default_matmul_precision("highest"):
        o1, vjp1 = jax.vjp(jax.jit(fast), q, k, v)
        o0, vjp0 = jax.vjp(ref, q, k, v)
        for got, want in zip((o1, *vjp1(r)), (o0, *vjp0(r.astype(jnp.float32)))):
            assert rel_err(np.asarray(got, np.float32), np.asarray(want, np.float32)) < TOL["bfloat16"]
