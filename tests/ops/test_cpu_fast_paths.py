"""The CPU fast paths (tiled blocked attention and solve) against the dense oracles.

Covers what tests/ops/test_blocked.py does not: attention without segment ids (the
position-only mask), tiles in which whole rows are masked by segments (empty rows in the
middle of the sequence, padding id 0, one-token segments), lengths that are not a multiple
of the tile, and memory at T=32768. (The whole layer on these paths is checked against the
published layer by tests/model/test_fixtures.py.)
"""

import re

import jax
import jax.numpy as jnp
import pytest
from tests.support.parity import SEGMENTS_37, output_and_grads, rel_err

from sessa_jax.ops import causal_attention, feedback_solve

T = 37  # not a multiple of any tile used below
_SHAPE = re.compile(r"\[([0-9,]+)\]")


@pytest.mark.parametrize("chunk", [5])
def test_attention_without_segments_equals_dense_x64(chunk):
    with jax.enable_x64(True):
        ks = jax.random.split(jax.random.PRNGKey(10), 4)
        q = 3.0 * jax.random.normal(ks[0], (2, T, 4, 6), jnp.float64)  # sharp rows: online max matters
        k = jax.random.normal(ks[1], (2, T, 2, 6), jnp.float64)
        v = jax.random.normal(ks[2], (2, T, 2, 6), jnp.float64)
        cot = jax.random.normal(ks[3], (2, T, 4, 6), jnp.float64)
        o_ref, g_ref = output_and_grads(lambda q, k, v: causal_attention(q, k, v, method="dense"), (q, k, v), cot)
        o, g = output_and_grads(lambda q, k, v: causal_attention(q, k, v, method="blocked", chunk_size=chunk), (q, k, v), cot)
        assert rel_err(o, o_ref) <= 1e-12
        for a, b in zip(g, g_ref):
            assert rel_err(a, b) <= 1e-11


def _solve_inputs(dtype, seed=11, d=8):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = 4.0 * jax.random.normal(ks[0], (2, T, d), dtype)
    k = jax.random.normal(ks[1], (2, T, d), dtype)
    gamma = 0.999 * jnp.tanh(3.0 * jax.random.normal(ks[2], (2, T), dtype))
    f = jax.random.normal(ks[3], (2, T, d), dtype)
    cot = jax.random.normal(ks[4], (2, T, d), dtype)
    return (q, k, gamma, f), cot


@pytest.mark.parametrize("chunk", [4])
def test_solve_with_masked_tiles_equals_dense_x64(chunk):
    with jax.enable_x64(True):
        args, cot = _solve_inputs(jnp.float64)
        ref = lambda *a: feedback_solve(*a, segment_ids=SEGMENTS_37, method="dense")
        fast = lambda *a: feedback_solve(*a, segment_ids=SEGMENTS_37, method="blocked", chunk_size=chunk)
        s_ref, g_ref = output_and_grads(ref, args, cot)
        s, g = output_and_grads(fast, args, cot)
        assert rel_err(s, s_ref) <= 1e-10
        for a, b in zip(g, g_ref):
            assert rel_err(a, b) <= 1e-9


def test_attention_and_solve_with_segments_float32():
    args, cot = _solve_inputs(jnp.float32, seed=12)
    s_ref, g_ref = output_and_grads(lambda *a: feedback_solve(*a, segment_ids=SEGMENTS_37, method="dense"), args, cot)
    s, g = output_and_grads(lambda *a: feedback_solve(*a, segment_ids=SEGMENTS_37, method="blocked", chunk_size=8), args, cot)
    assert rel_err(s, s_ref) <= 1e-4
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) <= 1e-3
    ks = jax.random.split(jax.random.PRNGKey(13), 4)
    qkv = tuple(jax.random.normal(kk, (2, T, 2, 8), jnp.float32) for kk in ks[:3])
    cot = jax.random.normal(ks[3], (2, T, 2, 8), jnp.float32)
    attend = lambda method: (lambda q, k, v: causal_attention(q, k, v, segment_ids=SEGMENTS_37, method=method, chunk_size=8))
    o_ref, g_ref = output_and_grads(attend("dense"), qkv, cot)
    o, g = output_and_grads(attend("blocked"), qkv, cot)
    assert rel_err(o, o_ref) <= 1e-5
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) <= 1e-4


def test_tiled_paths_compile_without_t_by_t_memory_at_32k():
    """Forward + backward of both tiled paths at T=32768 (compiled only): no buffer with two
    T-sized axes, and XLA's temporaries stay below 1% of a single T x T float32 array."""
    t, d = 32768, 16
    sd = jax.ShapeDtypeStruct
    wide, heads, gamma = sd((1, t, d), jnp.float32), sd((1, t, 2, d // 2), jnp.float32), sd((1, t), jnp.float32)
    attend = jax.grad(lambda q, k, v: jnp.sum(causal_attention(q, k, v, method="blocked") ** 2), argnums=(0, 1, 2))
    solve = jax.grad(lambda q, k, g, f: jnp.sum(feedback_solve(q, k, g, f, method="blocked") ** 2),
                     argnums=(0, 1, 2, 3))
    for compiled in (jax.jit(attend).lower(heads, heads, heads).compile(),
                     jax.jit(solve).lower(wide, wide, gamma, wide).compile()):
        shapes = [[int(x) for x in m.group(1).split(",") if x] for m in _SHAPE.finditer(compiled.as_text())]
        assert not [s for s in shapes if sum(x >= t for x in s) >= 2]
        assert compiled.memory_analysis().temp_size_in_bytes < 0.01 * t * t * 4
