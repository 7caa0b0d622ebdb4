"""chunk_size="auto" and the blocked paths' schedules, and the pieces written for the CPU layer's speed.

* the rules of ``attention_schedule`` / ``solve_schedule`` (closed form) and that "auto"
  really reaches the panel schedules and the budgeted chunks; unknown schedules are refused;
* the whole layer with the defaults against the dense layer;
* ``row_dot`` equals sum(a * b).

Both schedules of both blocked paths are checked against the dense oracle, forward and
gradients, in tests/ops/test_parity_matrix.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax import SessaConfig, SessaLayer
from sessa_jax.ops import causal_attention, dispatch, feedback_solve
from sessa_jax.ops.attention.blocked import blocked_causal_attention
from sessa_jax.ops.masks import row_dot
from sessa_jax.ops.solve.blocked import blocked_feedback_solve

T = 37


def _attention_inputs(dtype, h=4, hkv=2, k=6, seed=20):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = 3.0 * jax.random.normal(ks[0], (2, T, h, k), dtype)  # sharp rows
    kk = jax.random.normal(ks[1], (2, T, hkv, k), dtype)
    v = jax.random.normal(ks[2], (2, T, hkv, k), dtype)
    return (q, kk, v), jax.random.normal(ks[3], (2, T, h, k), dtype)


def test_unknown_schedule_is_rejected():
    (q, k, v), _ = _attention_inputs(jnp.float32)
    with pytest.raises(ValueError, match=r"unknown attention schedule 'tiles'; choose one of \('loop', 'panels'\)"):
        blocked_causal_attention(q, k, v, None, 8, jnp.float32, schedule="tiles")


@pytest.mark.parametrize(
    "batch,heads,length,expected",
    [
        (1, 4, 256, ("panels", 64)),  # 1*4*64*256 = 65536 <= 2**19
        (1, 4, 512, ("panels", 64)),
        (8, 4, 256, ("panels", 64)),  # 8*4*64*256 = 2**19, at the budget
        (8, 4, 512, ("loop", 128)),  # panels over budget; 8*4*128**2 = 2**19
        (1, 4, 1024, ("loop", 256)),  # longer than PANEL_MAX_LEN; 4*256**2 <= 2**19
        (1, 16, 1024, ("loop", 128)),  # 16*256**2 > 2**19 >= 16*128**2
        (32, 4, 2048, ("loop", 64)),
        (64, 16, 2048, ("loop", 64)),  # over budget even at 64: the smallest chunk
    ],
)
def test_auto_attention_schedule_rule(batch, heads, length, expected):
    assert dispatch.attention_schedule("auto", batch, heads, length) == expected
    assert dispatch.attention_schedule(96, batch, heads, length) == ("loop", 96)  # an explicit C is kept


@pytest.mark.parametrize(
    "batch,length,expected",
    [
        (1, 128, ("loop", 256)),  # one chunk of SOLVE_PANEL_CHUNK: nothing to unroll
        (1, 129, ("panels", 128)),
        (8, 512, ("panels", 128)),  # SOLVE_PANEL_MAX_LEN; 8*128*512 = 2**19, at the budget
        (16, 256, ("panels", 128)),
        (9, 512, ("loop", 128)),  # panels over budget: loops, the largest C with B*C*C <= 2**19
        (32, 512, ("loop", 128)),
        (1, 513, ("loop", 256)),  # longer than SOLVE_PANEL_MAX_LEN
        (8, 2048, ("loop", 256)),
        (9, 2048, ("loop", 128)),
        (32, 2048, ("loop", 128)),
        (33, 2048, ("loop", 64)),
        (4096, 4096, ("loop", 64)),
    ],
)
def test_auto_solve_schedule_rule(batch, length, expected):
    assert dispatch.solve_schedule("auto", batch, length) == expected
    assert dispatch.solve_schedule(40, batch, length) == ("loop", 40)  # an explicit C is kept


def test_unknown_solve_schedule_is_rejected():
    w = jnp.ones((1, 8, 4))
    with pytest.raises(ValueError, match=r"unknown solve schedule 'tiles'; choose one of \('loop', 'panels'\)"):
        blocked_feedback_solve(w, w, jnp.zeros((1, 8)), w, None, 4, jnp.float32, "tiles")


def test_auto_reaches_the_schedules(monkeypatch):
    """causal_attention / feedback_solve with chunk_size="auto" hand the blocked paths the
    schedule and chunk of the rules above (recorded by wrapping the implementations)."""
    seen = []
    attend, solve = dispatch.blocked_causal_attention, dispatch.blocked_feedback_solve
    monkeypatch.setattr(
        dispatch, "blocked_causal_attention", lambda *a: seen.append(("attention", a[4], a[6])) or attend(*a)
    )
    monkeypatch.setattr(dispatch, "blocked_feedback_solve", lambda *a: seen.append(("solve", a[5], a[7])) or solve(*a))
    x = jnp.ones((1, 600, 4, 2))
    causal_attention(x[:, :300], x[:, :300], x[:, :300], method="blocked")
    causal_attention(x, x, x, method="blocked")
    w = jnp.ones((9, 600, 3))
    feedback_solve(w[:, :40], w[:, :40], jnp.zeros((9, 40)), w[:, :40], method="blocked")
    feedback_solve(w[:, :200], w[:, :200], jnp.zeros((9, 200)), w[:, :200], method="blocked")  # 9*128*200 <= 2**19
    feedback_solve(w, w, jnp.zeros((9, 600)), w, method="blocked")
    assert seen == [
        ("attention", 64, "panels"),
        ("attention", 256, "loop"),
        ("solve", 128, "loop"),
        ("solve", 128, "panels"),
        ("solve", 128, "loop"),
    ]


@pytest.mark.parametrize(
    "length, platform, kernels, expected",
    [
        (8192, "gpu", "xla", 1024),
        (4096, "gpu", "xla", 1024),
        (4095, "gpu", "xla", 512),
        (8192, "gpu", "gpu_gemm", 1024),
        (4095, "gpu", "gpu_gemm", 512),
        (8192, "gpu", "pallas", 512),
        (8192, "tpu", "xla", 512),
        (65536, "cpu", "xla", 512),
    ],
)
def test_auto_leaf_rule(length, platform, kernels, expected):
    assert dispatch.recursive_leaf(length, platform, kernels) == expected
    assert dispatch.resolve_leaf("auto", length, platform, kernels) == expected
    assert dispatch.resolve_leaf(256, length, platform, kernels) == 256  # an explicit leaf is kept


def test_auto_leaf_reaches_the_recursive_solve(monkeypatch):
    """feedback_solve with leaf_size="auto" (the default) hands the recursive solve the rule's leaf
    and the tile of that leaf, on the platform it runs on (a GPU here by patching the platform
    decision; the solve itself is recorded, not run)."""
    seen = []

    def record(q, k, g, f, seg, *, leaf_size, tile, **kwargs):
        seen.append((f.shape[1], leaf_size, tile))
        return f

    monkeypatch.setattr(dispatch, "recursive_feedback_solve", record)
    for platform in ("gpu", "cpu"):
        monkeypatch.setattr(dispatch, "platform_kind", lambda platform=platform: platform)
        for t in (2048, 4096):
            w = jnp.ones((1, t, 8), jnp.bfloat16)
            feedback_solve(w, w, jnp.zeros((1, t)), w, method="recursive")
        feedback_solve(w, w, jnp.zeros((1, 4096)), w, method="recursive", leaf_size=256)
    assert seen == [(2048, 512, 512), (4096, 1024, 1024), (4096, 256, 1024)] + [
        (2048, 512, 512),
        (4096, 512, 1024),
        (4096, 256, 1024),
    ]
    assert SessaConfig(d_model=8, n_heads=1).leaf_size == "auto"


def test_default_layer_matches_dense_layer_float32():
    """The whole layer with the defaults (solver and chunk "auto": panels at this length)
    against the dense oracle, outputs and every gradient."""
    cfg = SessaConfig(d_model=32, n_heads=4, max_len=96)
    x = jax.random.normal(jax.random.PRNGKey(23), (2, 96, 32))
    cot = jax.random.normal(jax.random.PRNGKey(24), (2, 96, 32))
    layer = SessaLayer(cfg)
    # Compiled, not eager: op by op the two runs and the init took about four times as long.
    params = jax.jit(layer.init)(jax.random.PRNGKey(25), x)

    def run(config):
        loss = lambda p, x: jnp.sum(SessaLayer(config).apply(p, x) * cot)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    (l_ref, g_ref), (l, g) = run(cfg.replace(solver="dense")), run(cfg)
    assert abs(float(l - l_ref)) <= 1e-4 * abs(float(l_ref))
    chex.assert_trees_all_close(g, g_ref, rtol=2e-4, atol=2e-5)


def test_row_dot_is_the_row_sum_of_products():
    a = jax.random.normal(jax.random.PRNGKey(29), (2, 3, 5))
    b = jax.random.normal(jax.random.PRNGKey(30), (2, 3, 5))
    expected = np.einsum("ijk,ijk->ij", np.asarray(a, np.float64), np.asarray(b, np.float64))
    np.testing.assert_allclose(np.asarray(row_dot(a, b)), expected, rtol=1e-6, atol=1e-6)
    assert row_dot(a, b, keepdims=True).shape == (2, 3, 1)
