"""The TPU (Mosaic) kernels of the recursive solve against their XLA twins (interpret mode on
CPU), their TPU lowering, and the recursive solve run with them (``kernels="pallas"``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.ops import feedback_solve
from sessa_jax.ops.solve import block_product_tpu, row_stats_tpu
from sessa_jax.ops.solve.block_product import block_probs, block_product
from sessa_jax.ops.solve.recursive import recursive_feedback_solve
from sessa_jax.ops.solve.row_stats import EMPTY_LOGL, row_statistics
from sessa_jax.ops.solve.schedule import PushSchedule
from tests.support.kernel_inputs import kernel_segments, normal

B, D = 2, 128


@pytest.fixture(params=["plain", "tpu"])
def interpret(request):
    """The kernels' ``interpret`` argument, and a check to call after running them.

    "plain": Pallas interpret mode. "tpu": TPU interpret mode:
    VMEM scratch filled with NaN (an accumulator read before it is set turns the output NaN),
    two simulated cores sharing the "parallel" grid axes, and the race detector, which the
    check consults (a block written by both cores is a race).
    """
    if request.param == "plain":
        yield True, lambda: None
        return
    try:  # the race detector's result is only kept in this private module (InterpretParams' docs)
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as state
    except ImportError as err:
        pytest.skip(f"this JAX keeps TPU interpret mode's race results elsewhere: {err}")
    from jax.experimental.pallas import tpu as pltpu

    pltpu.reset_tpu_interpret_mode_state()

    def no_races():
        assert state.races is not None, "the race detector did not run"
        assert not state.races.races_found, "TPU interpret mode found a data race"

    yield pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2), no_races
    pltpu.reset_tpu_interpret_mode_state()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stats_kernel_matches_xla_twin(dtype, interpret):
    t = 256
    q, k, seg = normal(0, (B, t, D), dtype), normal(1, (B, t, D), dtype) * 2, kernel_segments(B, t)
    m, logl = row_stats_tpu.tpu_row_statistics(q, k, seg, scale=D**-0.5, block=128, interpret=interpret[0])
    interpret[1]()
    m_x, logl_x = row_statistics(
        q, k, seg, leaf=128, scale=D**-0.5, tier="float32", schedule=PushSchedule.make(2, None)
    )
    np.testing.assert_allclose(m, m_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logl, logl_x, rtol=1e-6, atol=1e-6)
    assert logl[0, 0] == np.float32(EMPTY_LOGL) and logl[0, 150] == np.float32(EMPTY_LOGL)


@pytest.mark.parametrize("tier,tol", [("float32", 1e-6), ("bf16x3", 1e-5), ("bfloat16", 5e-3)])
def test_block_product_matches_xla_twin(tier, tol, interpret):
    rows, keys = 256, 384
    q, k = normal(2, (B, rows, D), jnp.bfloat16), normal(3, (B, keys, D), jnp.bfloat16)
    s = normal(4, (B, keys, D))
    m = normal(5, (B, rows)) + 3.0
    logl = jax.random.uniform(jax.random.PRNGKey(6), (B, rows)) + 2.0
    seg_r = jnp.ones((B, rows), jnp.int32)
    seg_k = jnp.asarray(np.arange(keys) >= 100, jnp.int32)[None].repeat(B, 0)
    out = block_product_tpu.tpu_block_product(
        q, seg_r, m, logl, k, seg_k, s, scale=D**-0.5, tier=tier, interpret=interpret[0]
    )
    interpret[1]()
    want = block_product(q, seg_r, m, logl, k, seg_k, s, scale=D**-0.5, tier="float32", platform="cpu")
    err = float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want))
    assert err <= tol, (tier, err)
    assert float(jnp.abs(out[:, :, :1]).sum()) > 0


@pytest.mark.parametrize(
    "tier,plain,dtype,tol", [("float32", "float32", jnp.float32, 1e-6), ("bf16x3", "bfloat16", jnp.bfloat16, 5e-3)]
)
def test_block_product_backward_matches_xla_twin(tier, plain, dtype, tol, interpret):
    rows, keys = 256, 128
    q, k = normal(11, (B, rows, D), dtype), normal(12, (B, keys, D), dtype)
    s, g, r = normal(13, (B, keys, D)), normal(14, (B, rows, D)), normal(15, (B, rows, D))
    m = normal(16, (B, rows)) + 3.0
    logl = jax.random.uniform(jax.random.PRNGKey(17), (B, rows)) + 2.0
    seg_r = jnp.asarray(np.arange(rows) < 200, jnp.int32)[None].repeat(B, 0)
    seg_k = jnp.ones((B, keys), jnp.int32)
    got = block_product_tpu.tpu_block_product_bwd(
        q,
        seg_r,
        m,
        logl,
        g,
        jnp.sum(g * r, -1),
        k,
        seg_k,
        s,
        scale=D**-0.5,
        tier=tier,
        plain_tier=plain,
        interpret=interpret[0],
    )
    interpret[1]()
    probs = block_probs(q, seg_r, m, logl, k, seg_k, scale=D**-0.5, tier="float32", platform="cpu")
    dl = probs * (jnp.einsum("bpd,bkd->bpk", g, s, precision="highest") - jnp.sum(g * r, -1, keepdims=True))
    want = (
        jnp.einsum("bpk,bpd->bkd", probs, g, precision="highest"),
        jnp.einsum("bpk,bkd->bpd", dl, k.astype(jnp.float32), precision="highest") * D**-0.5,
        jnp.einsum("bpk,bpd->bkd", dl, q.astype(jnp.float32), precision="highest") * D**-0.5,
    )
    for name, a, w in zip(("A^T g", "dq", "dk"), got, want):
        err = float(jnp.linalg.norm(a - w) / jnp.linalg.norm(w))
        assert err <= tol, (name, tier, err)


def test_block_sizes_do_not_grow_with_t():
    """VMEM holds (Bq, D) and (Bk, D) blocks whose size is capped whatever T is (no T cap)."""
    assert row_stats_tpu.key_block(65536) == 512 and row_stats_tpu.row_block(65536) == 512
    assert row_stats_tpu.key_block(384) == 128 and row_stats_tpu.row_block(384) == 128


def _solve(kernels, t=384, leaf=128):
    seg = kernel_segments(B, t)
    gamma = 0.9 * jnp.tanh(normal(7, (B, t)))

    def loss(q, k, g, f):
        s = recursive_feedback_solve(
            q,
            k,
            g,
            f,
            seg,
            leaf_size=leaf,
            tile=128,
            tier="float32",
            platform="cpu",
            dtype=jnp.float32,
            kernels=kernels,
        )
        return jnp.sum(s * jnp.cos(f)), s

    args = (normal(8, (B, t, D)), normal(9, (B, t, D)), gamma, normal(10, (B, t, D)))
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*args)


def test_recursive_solve_with_kernels_matches_xla():
    (_, s_k), g_k = _solve("pallas")
    (_, s_x), g_x = _solve("xla")
    np.testing.assert_allclose(s_k, s_x, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_k, g_x):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_recursive_solve_with_kernels_lowers_for_tpu():
    t = 1024
    seg = jnp.ones((B, t), jnp.int32)

    def loss(q, k, g, f):
        return jnp.sum(
            recursive_feedback_solve(
                q,
                k,
                g,
                f,
                seg,
                leaf_size=128,
                tile=256,
                tier="bf16x3",
                platform="tpu",
                dtype=jnp.float32,
                kernels="pallas",
            )
        )

    x = jax.ShapeDtypeStruct((B, t, D), jnp.bfloat16)
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    try:
        text = fn.trace(x, x, jax.ShapeDtypeStruct((B, t), jnp.float32), x).lower(lowering_platforms=("tpu",)).as_text()
    except Exception as err:  # noqa: BLE001 - report why the installed JAX cannot
        pytest.skip(f"lowering for tpu not supported here: {type(err).__name__}: {err}"[:500])
    for name in (
        "sessa_row_stats_tpu",
        "sessa_block_product_tpu",
        "sessa_block_product_bwd_keys_tpu",
        "sessa_block_product_bwd_rows_tpu",
    ):
        assert name in text


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernels="cuda"), "unknown feedback kernels"),
        (dict(kernels="pallas", leaf_size=96), "multiple of 128"),
    ],
)
def test_kernel_option_errors(kwargs, match):
    x = jnp.zeros((1, 256, 16))
    with pytest.raises(ValueError, match=match):
        feedback_solve(x, x, jnp.zeros((1, 256)), x, method="recursive", **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(feedback_kernels="mosaic"), "feedback_kernels='mosaic' is unknown"),
        (dict(feedback_kernels="pallas", leaf_size=96), "multiple of 128"),
    ],
)
def test_config_rejects_bad_kernels(kwargs, match):
    from sessa_jax.config import SessaConfig

    with pytest.raises(ValueError, match=match):
        SessaConfig(d_model=64, n_heads=2, **kwargs).validate()
