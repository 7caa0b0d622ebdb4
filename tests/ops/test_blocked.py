"""The blocked feedback solve: near one-hot rows, the solve's defining identities, and memory
(no T x T buffer) of the blocked layer and of both tiled paths at T = 32768.

Every blocked path against the dense oracle, forward and gradients, in each dtype and schedule:
tests/ops/test_parity_matrix.py."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax import SessaConfig, SessaLayer
from sessa_jax.golden import relative_error
from sessa_jax.ops import causal_attention, feedback_solve

T = 150  # not a multiple of 7, 64 or 128


def _inputs(dtype, *, peaked: bool, seed=0, b=2, t=T, d=8):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    sharp = 12.0 if peaked else 1.0  # large logits: near one-hot feedback rows
    q = sharp * jax.random.normal(ks[0], (b, t, d), dtype)
    k = sharp * jax.random.normal(ks[1], (b, t, d), dtype)
    # gamma pinned near +-gamma_max, alternating in sign, where the solve is hardest.
    sign = jnp.where(jax.random.bernoulli(ks[2], 0.5, (b, t)), 1.0, -1.0).astype(dtype)
    gamma = sign * 0.999 * (1 - 1e-4 * jax.random.uniform(ks[3], (b, t), dtype))
    f = jax.random.normal(ks[4], (b, t, d), dtype)
    ds = jax.random.normal(jax.random.fold_in(ks[4], 1), (b, t, d), dtype)
    return q, k, gamma, f, ds


def _value_and_grads(method, chunk, args, segment_ids=None):
    q, k, gamma, f, ds = args

    def loss(q, k, gamma, f):
        s = feedback_solve(q, k, gamma, f, segment_ids=segment_ids, method=method, chunk_size=chunk)
        return jnp.sum(s * ds), s

    (_, s), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, gamma, f)
    return s, grads


@pytest.mark.parametrize("chunk", [1, 7, 64, 128])
def test_blocked_solve_equals_dense_x64_on_near_one_hot_rows(chunk):
    """Logits ~ N(0, 144^2): every feedback row is one-hot to rounding, T = 150 spans two
    chunks of 128. (Other logits, chunks, schedules and dtypes: tests/ops/test_parity_matrix.py.)"""
    with jax.enable_x64(True):
        args = _inputs(jnp.float64, peaked=True)
        s_ref, g_ref = _value_and_grads("dense", 1, args)
        s, g = _value_and_grads("blocked", chunk, args)
        assert relative_error(s, s_ref) <= 1e-10
        for a, b in zip(g, g_ref):
            assert relative_error(a, b) <= 1e-9


def test_solve_first_row_is_f_and_residual_identity():
    """s_0 = f_0 (no past), and s satisfies s_t = f_t + gamma_t sum A s (checked densely)."""
    with jax.enable_x64(True):
        q, k, gamma, f, _ = _inputs(jnp.float64, peaked=False, t=33)
        s = feedback_solve(q, k, gamma, f, method="blocked", chunk_size=5)
        np.testing.assert_array_equal(np.asarray(s[:, 0]), np.asarray(f[:, 0]))
        logits = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(q.shape[-1])
        strict = jnp.tril(jnp.ones((33, 33), bool), -1)
        a = jnp.where(strict, jax.nn.softmax(jnp.where(strict, logits, -jnp.inf), axis=-1), 0.0)
        a = jnp.nan_to_num(a)
        resid = s - f - gamma[..., None] * jnp.einsum("bts,bsd->btd", a, s)
        assert float(jnp.max(jnp.abs(resid))) <= 1e-11


_SHAPE = re.compile(r"\[([0-9,]+)\]")


def _two_long_dims(hlo_text: str, length: int):
    """Shapes in HLO text that have at least two dimensions >= length."""
    hits = set()
    for m in _SHAPE.finditer(hlo_text):
        dims = [int(x) for x in m.group(1).split(",") if x]
        if sum(d >= length for d in dims) >= 2:
            hits.add(m.group(0))
    return hits


def _compiled_layer_grad(solver: str, t: int):
    cfg = SessaConfig(d_model=16, n_heads=2, solver=solver, chunk_size=64)
    layer = SessaLayer(cfg)
    x = jnp.zeros((1, t, 16), jnp.float32)
    variables = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)

    def loss(v, x):
        return jnp.sum(layer.apply(v, x) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, x).compile()


def test_blocked_layer_has_no_t_by_t_buffer():
    t = 1024
    compiled = _compiled_layer_grad("blocked", t)
    assert _two_long_dims(compiled.as_text(), t) == set()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < t * t * 4, temp  # less than a single T x T float32 array
    # Memory grows linearly in T: doubling T at most ~doubles the temporaries (dense: 4x).
    temp_2t = _compiled_layer_grad("blocked", 2 * t).memory_analysis().temp_size_in_bytes
    assert temp_2t / temp < 2.5, (temp, temp_2t)
    # The check can fail: the dense oracle does build T x T arrays.
    assert _two_long_dims(_compiled_layer_grad("dense", t).as_text(), t)


def test_tiled_paths_compile_without_t_by_t_memory_at_32k():
    """Forward + backward of both tiled paths at T=32768 (compiled only): no buffer with two
    T-sized axes, and XLA's temporaries stay below 1% of a single T x T float32 array."""
    t, d = 32768, 16
    sd = jax.ShapeDtypeStruct
    wide, heads, gamma = sd((1, t, d), jnp.float32), sd((1, t, 2, d // 2), jnp.float32), sd((1, t), jnp.float32)
    attend = jax.grad(lambda q, k, v: jnp.sum(causal_attention(q, k, v, method="blocked") ** 2), argnums=(0, 1, 2))
    solve = jax.grad(
        lambda q, k, g, f: jnp.sum(feedback_solve(q, k, g, f, method="blocked") ** 2), argnums=(0, 1, 2, 3)
    )
    for compiled in (
        jax.jit(attend).lower(heads, heads, heads).compile(),
        jax.jit(solve).lower(wide, wide, gamma, wide).compile(),
    ):
        shapes = [[int(x) for x in m.group(1).split(",") if x] for m in _SHAPE.finditer(compiled.as_text())]
        assert not [s for s in shapes if sum(x >= t for x in s) >= 2]
        assert compiled.memory_analysis().temp_size_in_bytes < 0.01 * t * t * 4
