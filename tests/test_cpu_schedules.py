"""chunk_size="auto" and the pieces written for the CPU layer's speed (issue 11).

* attention's "panels" schedule (unrolled causal-prefix panels) against the dense oracle:
  forward and gradients, GQA, segments, a length that is not a multiple of the chunk;
* the solve's "panels" schedule against the dense oracle: forward and gradients, with and
  without segments, lengths that are not a multiple of the chunk;
* the rules of ``attention_schedule`` / ``solve_schedule`` (closed form) and that "auto"
  really reaches the panel schedules and the budgeted chunks;
* the blocked solve without segment ids (causality-only masks) equals the dense oracle;
* ``layer_norm``'s hand-written backward equals flax's LayerNorm; ``row_dot`` equals
  sum(a * b).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _parity import SEGMENTS_37, output_and_grads, rel_err

from sessa_jax import SessaConfig, SessaLayer
from sessa_jax.ops import causal_attention, feedback_solve
from sessa_jax.ops import dispatch
from sessa_jax.ops.attention.blocked import blocked_causal_attention
from sessa_jax.ops.solve.blocked import blocked_feedback_solve
from sessa_jax.layer_norm import LayerNorm, layer_norm
from sessa_jax.ops.masks import row_dot

T = 37


def _attention_inputs(dtype, h=4, hkv=2, k=6, seed=20):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = 3.0 * jax.random.normal(ks[0], (2, T, h, k), dtype)  # sharp rows
    kk = jax.random.normal(ks[1], (2, T, hkv, k), dtype)
    v = jax.random.normal(ks[2], (2, T, hkv, k), dtype)
    return (q, kk, v), jax.random.normal(ks[3], (2, T, h, k), dtype)


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("chunk", [8, 64])
def test_panel_attention_equals_dense_x64(segments, chunk):
    with jax.enable_x64(True):
        args, cot = _attention_inputs(jnp.float64)
        seg = SEGMENTS_37 if segments else None
        o_ref, g_ref = output_and_grads(lambda q, k, v: causal_attention(q, k, v, segment_ids=seg, method="dense"), args, cot)
        o, g = output_and_grads(lambda q, k, v: blocked_causal_attention(
            q, k, v, seg, chunk, jnp.float64, schedule="panels"), args, cot)
        assert rel_err(o, o_ref) <= 1e-12
        for a, b in zip(g, g_ref):
            assert rel_err(a, b) <= 1e-11


def test_panel_and_loop_schedules_agree_float32():
    args, cot = _attention_inputs(jnp.float32, h=4, hkv=4, k=8, seed=21)
    run = lambda schedule: output_and_grads(lambda q, k, v: blocked_causal_attention(
        q, k, v, None, 8, jnp.float32, schedule=schedule), args, cot)
    (o_loop, g_loop), (o_panel, g_panel) = run("loop"), run("panels")
    chex.assert_trees_all_close(o_panel, o_loop, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g_panel, g_loop, rtol=1e-4, atol=1e-4)


def test_unknown_schedule_is_rejected():
    (q, k, v), _ = _attention_inputs(jnp.float32)
    with pytest.raises(ValueError, match=r"unknown attention schedule 'tiles'; choose one of \('loop', 'panels'\)"):
        blocked_causal_attention(q, k, v, None, 8, jnp.float32, schedule="tiles")


@pytest.mark.parametrize("batch,heads,length,expected", [
    (1, 4, 256, ("panels", 64)),      # 1*4*64*256 = 65536 <= 2**19
    (1, 4, 512, ("panels", 64)),
    (8, 4, 256, ("panels", 64)),      # 8*4*64*256 = 2**19, at the budget
    (8, 4, 512, ("loop", 128)),       # panels over budget; 8*4*128**2 = 2**19
    (1, 4, 1024, ("loop", 256)),      # longer than PANEL_MAX_LEN; 4*256**2 <= 2**19
    (1, 16, 1024, ("loop", 128)),     # 16*256**2 > 2**19 >= 16*128**2
    (32, 4, 2048, ("loop", 64)),
    (64, 16, 2048, ("loop", 64)),     # over budget even at 64: the smallest chunk
])
def test_auto_attention_schedule_rule(batch, heads, length, expected):
    assert dispatch.attention_schedule("auto", batch, heads, length) == expected
    assert dispatch.attention_schedule(96, batch, heads, length) == ("loop", 96)  # an explicit C is kept


@pytest.mark.parametrize("batch,length,expected", [
    (1, 128, ("loop", 256)),       # one chunk of SOLVE_PANEL_CHUNK: nothing to unroll
    (1, 129, ("panels", 128)),
    (8, 512, ("panels", 128)),     # SOLVE_PANEL_MAX_LEN; 8*128*512 = 2**19, at the budget
    (16, 256, ("panels", 128)),
    (9, 512, ("loop", 128)),       # panels over budget: loops, the largest C with B*C*C <= 2**19
    (32, 512, ("loop", 128)),
    (1, 513, ("loop", 256)),       # longer than SOLVE_PANEL_MAX_LEN
    (8, 2048, ("loop", 256)),
    (9, 2048, ("loop", 128)),
    (32, 2048, ("loop", 128)),
    (33, 2048, ("loop", 64)),
    (4096, 4096, ("loop", 64)),
])
def test_auto_solve_schedule_rule(batch, length, expected):
    assert dispatch.solve_schedule("auto", batch, length) == expected
    assert dispatch.solve_schedule(40, batch, length) == ("loop", 40)  # an explicit C is kept


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("chunk", [5, 16])
def test_panel_solve_equals_dense_x64(segments, chunk):
    """T=37: 8 chunks of 5 (padded), 3 of 16; segments with one-token documents and rows
    without keys in the middle of a panel."""
    with jax.enable_x64(True):
        ks = jax.random.split(jax.random.PRNGKey(26), 5)
        q = 4.0 * jax.random.normal(ks[0], (2, T, 8), jnp.float64)  # sharp rows
        k = jax.random.normal(ks[1], (2, T, 8), jnp.float64)
        gamma = 0.999 * jnp.tanh(3.0 * jax.random.normal(ks[2], (2, T), jnp.float64))
        f = jax.random.normal(ks[3], (2, T, 8), jnp.float64)
        cot = jax.random.normal(ks[4], (2, T, 8), jnp.float64)
        seg = SEGMENTS_37 if segments else None
        s_ref, g_ref = output_and_grads(lambda *a: feedback_solve(*a, segment_ids=seg, method="dense"),
                                        (q, k, gamma, f), cot)
        s, g = output_and_grads(lambda *a: blocked_feedback_solve(*a, seg, chunk, jnp.float64, "panels"),
                                (q, k, gamma, f), cot)
        assert rel_err(s, s_ref) <= 1e-12
        for a, b in zip(g, g_ref):
            assert rel_err(a, b) <= 1e-11


def test_unknown_solve_schedule_is_rejected():
    w = jnp.ones((1, 8, 4))
    with pytest.raises(ValueError, match=r"unknown solve schedule 'tiles'; choose one of \('loop', 'panels'\)"):
        blocked_feedback_solve(w, w, jnp.zeros((1, 8)), w, None, 4, jnp.float32, "tiles")


def test_auto_reaches_the_schedules(monkeypatch):
    """causal_attention / feedback_solve with chunk_size="auto" hand the blocked paths the
    schedule and chunk of the rules above (recorded by wrapping the implementations)."""
    seen = []
    attend, solve = dispatch.blocked_causal_attention, dispatch.blocked_feedback_solve
    monkeypatch.setattr(dispatch, "blocked_causal_attention",
                        lambda *a: seen.append(("attention", a[4], a[6])) or attend(*a))
    monkeypatch.setattr(dispatch, "blocked_feedback_solve",
                        lambda *a: seen.append(("solve", a[5], a[7])) or solve(*a))
    x = jnp.ones((1, 600, 4, 2))
    causal_attention(x[:, :300], x[:, :300], x[:, :300], method="blocked")
    causal_attention(x, x, x, method="blocked")
    w = jnp.ones((9, 600, 3))
    feedback_solve(w[:, :40], w[:, :40], jnp.zeros((9, 40)), w[:, :40], method="blocked")
    feedback_solve(w[:, :200], w[:, :200], jnp.zeros((9, 200)), w[:, :200], method="blocked")  # 9*128*200 <= 2**19
    feedback_solve(w, w, jnp.zeros((9, 600)), w, method="blocked")
    assert seen == [("attention", 64, "panels"), ("attention", 256, "loop"), ("solve", 128, "loop"),
                    ("solve", 128, "panels"), ("solve", 128, "loop")]


@pytest.mark.parametrize("chunk", [5, "auto"])
def test_solve_without_segments_equals_dense_x64(chunk):
    """No segment ids: only causality masks the tiles (T=37 is padded for chunk 5)."""
    with jax.enable_x64(True):
        ks = jax.random.split(jax.random.PRNGKey(22), 5)
        q = 4.0 * jax.random.normal(ks[0], (2, T, 8), jnp.float64)
        k = jax.random.normal(ks[1], (2, T, 8), jnp.float64)
        gamma = 0.999 * jnp.tanh(3.0 * jax.random.normal(ks[2], (2, T), jnp.float64))
        f = jax.random.normal(ks[3], (2, T, 8), jnp.float64)
        cot = jax.random.normal(ks[4], (2, T, 8), jnp.float64)
        s_ref, g_ref = output_and_grads(lambda *a: feedback_solve(*a, method="dense"), (q, k, gamma, f), cot)
        s, g = output_and_grads(lambda *a: feedback_solve(*a, method="blocked", chunk_size=chunk), (q, k, gamma, f), cot)
        assert rel_err(s, s_ref) <= 1e-10
        for a, b in zip(g, g_ref):
            assert rel_err(a, b) <= 1e-9


def test_default_layer_matches_dense_layer_float32():
    """The whole layer with the defaults (solver and chunk "auto": panels at this length)
    against the dense oracle, outputs and every gradient."""
    cfg = SessaConfig(d_model=32, n_heads=4, max_len=96)
    x = jax.random.normal(jax.random.PRNGKey(23), (2, 96, 32))
    cot = jax.random.normal(jax.random.PRNGKey(24), (2, 96, 32))
    layer = SessaLayer(cfg)
    params = layer.init(jax.random.PRNGKey(25), x)

    def run(config):
        return jax.value_and_grad(lambda p, x: jnp.sum(SessaLayer(config).apply(p, x) * cot), argnums=(0, 1))(params, x)

    (l_ref, g_ref), (l, g) = run(cfg.replace(solver="dense")), run(cfg)
    assert abs(float(l - l_ref)) <= 1e-4 * abs(float(l_ref))
    chex.assert_trees_all_close(g, g_ref, rtol=2e-4, atol=2e-5)


def test_layer_norm_matches_flax_x64():
    with jax.enable_x64(True):
        x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(26), (2, 7, 16), jnp.float64)
        cot = jax.random.normal(jax.random.PRNGKey(27), (2, 7, 16), jnp.float64)
        ours, theirs = LayerNorm(epsilon=1e-5, dtype=jnp.float64), nn.LayerNorm(epsilon=1e-5, dtype=jnp.float64)
        params = theirs.init(jax.random.PRNGKey(0), x)
        params = jax.tree_util.tree_map(lambda p: p + jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params)
        chex.assert_trees_all_equal_shapes_and_dtypes(ours.init(jax.random.PRNGKey(0), x), theirs.init(jax.random.PRNGKey(0), x))

        def run(module):
            return jax.value_and_grad(lambda p, x: jnp.sum(module.apply(p, x) * cot), argnums=(0, 1))(params, x)

        (l_ours, g_ours), (l_theirs, g_theirs) = run(ours), run(theirs)
        assert abs(float(l_ours - l_theirs)) <= 1e-12 * abs(float(l_theirs))
        chex.assert_trees_all_close(g_ours, g_theirs, rtol=1e-11, atol=1e-12)


def test_layer_norm_casts_input_and_keeps_param_dtypes():
    x = jax.random.normal(jax.random.PRNGKey(28), (3, 8)).astype(jnp.bfloat16)
    module = LayerNorm(dtype=jnp.float32)
    params = module.init(jax.random.PRNGKey(0), x)
    y = module.apply(params, x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(jnp.mean(y, -1)), 0.0, atol=1e-6)
    grads = jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 3))(params)
    chex.assert_trees_all_equal_dtypes(grads, params)
    s, b = jnp.ones(8), jnp.zeros(8)
    grad_x = jax.grad(lambda x: jnp.sum(layer_norm(x, s, b, 1e-5) * jnp.arange(8.0)))(x.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(jnp.sum(grad_x, -1)), 0.0, atol=1e-5)  # LN output ignores shifts of x


def test_row_dot_is_the_row_sum_of_products():
    a = jax.random.normal(jax.random.PRNGKey(29), (2, 3, 5))
    b = jax.random.normal(jax.random.PRNGKey(30), (2, 3, 5))
    expected = np.einsum("ijk,ijk->ij", np.asarray(a, np.float64), np.asarray(b, np.float64))
    np.testing.assert_allclose(np.asarray(row_dot(a, b)), expected, rtol=1e-6, atol=1e-6)
    assert row_dot(a, b, keepdims=True).shape == (2, 3, 1)
