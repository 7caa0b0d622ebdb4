"""The Mosaic GPU kernel of the recursive solve (``row_stats_gpu.gpu_row_statistics``) against its
XLA twin in Mosaic GPU interpret mode (jax >= 0.11, skipped before), its lowering for "cuda"
(skipped where the installed JAX cannot lower Mosaic GPU on this machine), and its errors.
Nothing here runs on a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.ops.solve import row_stats_gpu as gk
from sessa_jax.ops.solve.row_stats import EMPTY_LOGL, row_statistics
from sessa_jax.ops.solve.schedule import PushSchedule
from tests.support.gpu_kernels import interpret_or_skip, lower_or_skip
from tests.support.kernel_inputs import kernel_segments, normal

B, D = 2, 128
SD = jax.ShapeDtypeStruct


@pytest.mark.parametrize(
    "dtype,tier,rel", [(jnp.float32, "bf16x3", 1e-5), (jnp.bfloat16, "bf16x3", 1e-6), (jnp.bfloat16, "bfloat16", 1e-6)]
)
def test_stats_kernel_matches_xla_twin(dtype, tier, rel):
    t = 256
    q, k, seg = normal(0, (B, t, D), dtype), normal(1, (B, t, D), dtype) * 2, kernel_segments(B, t)
    m, logl = gk.gpu_row_statistics(q, k, seg, scale=D**-0.5, tier=tier, interpret=interpret_or_skip())
    m_x, logl_x = row_statistics(
        q, k, seg, leaf=64, scale=D**-0.5, tier=tier, schedule=PushSchedule.make(4, None), platform="gpu"
    )
    for name, a, w in (("m", m, m_x), ("logl", logl, logl_x)):
        assert a.shape == (B, t) and a.dtype == jnp.float32
        err = float(jnp.linalg.norm(a - w) / jnp.linalg.norm(w))
        assert err <= rel, (name, dtype, tier, err)
        np.testing.assert_allclose(a, w, rtol=10 * rel, atol=10 * rel)
    segs = np.asarray(seg)
    empty = np.concatenate([np.ones((B, 1), bool), segs[:, 1:] != segs[:, :-1]], axis=1)  # segment starts
    assert empty.sum() == 7  # rows 0, 150, 151 (and 200 in batch row 1)
    np.testing.assert_array_equal(np.asarray(m)[empty], 0.0)  # rows without keys: exactly (0, EMPTY_LOGL)
    np.testing.assert_array_equal(np.asarray(logl)[empty], np.float32(EMPTY_LOGL))
    assert np.all(np.asarray(logl)[~empty] < 10.0)


@pytest.mark.parametrize(
    "d,dtype,tier,masked", [(320, jnp.bfloat16, "bfloat16", True), (384, jnp.float32, "bf16x3", False)]
)
def test_streamed_stats_kernel_matches_xla_twin(d, dtype, tier, masked):
    """D above ``MAX_D``: the contraction streamed in chunks of 64 (five and six chunks), with
    segment ids and without (one sequence per row: no segment mask)."""
    t = 256
    q, k = normal(4, (B, t, d), dtype), normal(5, (B, t, d), dtype) * 2
    seg = kernel_segments(B, t) if masked else None
    m, logl = gk.gpu_row_statistics(q, k, seg, scale=d**-0.5, tier=tier, interpret=interpret_or_skip())
    m_x, logl_x = row_statistics(
        q, k, seg, leaf=64, scale=d**-0.5, tier=tier, schedule=PushSchedule.make(4, None), platform="gpu"
    )
    rel = 1e-5 if dtype == jnp.float32 else 1e-6
    for name, a, w in (("m", m, m_x), ("logl", logl, logl_x)):
        assert a.shape == (B, t) and a.dtype == jnp.float32
        err = float(jnp.linalg.norm(a - w) / jnp.linalg.norm(w))
        assert err <= rel, (name, err)
        np.testing.assert_allclose(a, w, rtol=10 * rel, atol=10 * rel)
    np.testing.assert_array_equal(np.asarray(logl)[:, 0], np.float32(EMPTY_LOGL))  # row 0 has no keys


def test_stats_kernel_float32_split_beats_one_pass():
    """float32 inputs: bf16x3 (hi/lo split) is ~100x closer to exact fp32 logits than one bf16 pass."""
    t = 128
    q, k, seg = normal(2, (1, t, 64)), normal(3, (1, t, 64)), jnp.zeros((1, t), jnp.int32)
    params = interpret_or_skip()
    m_x, _ = row_statistics(q, k, seg, leaf=64, scale=0.125, tier="float32", schedule=PushSchedule.make(2, None))
    err = {
        tier: float(jnp.abs(gk.gpu_row_statistics(q, k, seg, scale=0.125, tier=tier, interpret=params)[0] - m_x).max())
        for tier in gk.TIERS
    }
    assert err["bf16x3"] < 5e-5 and 100 * err["bf16x3"] < err["bfloat16"], err


@pytest.mark.parametrize(
    "d,dtype,tier",
    [
        (128, jnp.float32, "bf16x3"),
        (64, jnp.bfloat16, "bf16x3"),
        (256, jnp.float32, "bfloat16"),
        (256, jnp.float32, "bf16x3"),
        (1024, jnp.bfloat16, "bfloat16"),  # streamed
        (512, jnp.float32, "bf16x3"),
    ],
)
def test_stats_kernel_lowers_for_cuda(d, dtype, tier):
    t = 256
    fn = jax.jit(lambda q, k, s: gk.gpu_row_statistics(q, k, s, scale=0.1, tier=tier))
    text = lower_or_skip(fn, (SD((B, t, d), dtype), SD((B, t, d), dtype), SD((B, t), jnp.int32)))
    assert gk.KERNEL_NAME in text and "mosaic_gpu" in text
    fn = jax.jit(lambda q, k: gk.gpu_row_statistics(q, k, None, scale=0.1, tier=tier))  # no segment ids
    text = lower_or_skip(fn, (SD((B, t, d), dtype), SD((B, t, d), dtype)))
    assert gk.KERNEL_NAME in text and "mosaic_gpu" in text


@pytest.mark.parametrize(
    "shape,kwargs,match",
    [
        ((1, 100, 64), {}, "T=100 must be a multiple of block_q=64"),
        ((1, 128, 96), {}, "D=96 is not supported"),
        ((1, 128, 64), dict(tier="float32"), "tier 'float32' is not supported"),
        ((1, 128, 64), dict(block_k=32), "block_k=32 must be a positive multiple of 64"),
        ((1, 192, 64), dict(block_q=128), "T=192 must be a multiple of block_q=128"),
    ],
)
def test_stats_kernel_errors(shape, kwargs, match):
    x = jnp.zeros(shape)
    with pytest.raises(ValueError, match=match):
        gk.gpu_row_statistics(x, x, jnp.zeros(shape[:2], jnp.int32), scale=1.0, **kwargs)


# --------------------------------------------------------------------------- the recursive solve with it
def _solve_grad(kernels, t, d, seg):
    from sessa_jax.ops.solve.recursive import recursive_feedback_solve

    def loss(q, k, g, f):
        s = recursive_feedback_solve(
            q, k, g, f, seg, leaf_size=128, tile=128, tier="bf16x3", platform="gpu", dtype=jnp.float32, kernels=kernels
        )
        return jnp.sum(s * jnp.cos(f)), s

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def test_recursive_solve_with_gpu_kernel_lowers_for_cuda():
    t, d = 512, 128
    fn = _solve_grad("pallas", t, d, jnp.ones((B, t), jnp.int32))
    x = SD((B, t, d), jnp.bfloat16)
    text = lower_or_skip(fn, (x, x, SD((B, t), jnp.float32), x))
    assert text.count(gk.KERNEL_NAME) >= 1 and "mosaic_gpu" in text
    assert "sessa_block_product" not in text and "sessa_row_stats_tpu" not in text  # pushes stay XLA on GPU


def test_recursive_solve_with_gpu_kernel_matches_xla():
    """Forward and gradients with the stats kernel (Mosaic GPU interpret mode) against kernels='xla'."""
    interpret_or_skip()
    from jax.experimental.pallas import mosaic_gpu as plgpu

    t, d = 384, 64
    seg = kernel_segments(B, t)
    args = (normal(8, (B, t, d)), normal(9, (B, t, d)), 0.9 * jnp.tanh(normal(7, (B, t))), normal(10, (B, t, d)))
    with plgpu.force_gpu_interpret_mode():
        (_, s_k), g_k = _solve_grad("pallas", t, d, seg)(*args)
    (_, s_x), g_x = _solve_grad("xla", t, d, seg)(*args)
    assert float(jnp.abs(s_x).max()) > 0.1
    np.testing.assert_allclose(s_k, s_x, rtol=1e-4, atol=1e-4)
    for name, a, w in zip(("dq", "dk", "dgamma", "df"), g_k, g_x):
        np.testing.assert_allclose(a, w, rtol=1e-3, atol=1e-3, err_msg=name)


@pytest.mark.parametrize(
    "width,tier,dtypes,match",
    [
        (96, "bf16x3", (jnp.float32,) * 2, "D a multiple of 64 .* got D=96"),
        (128, "float32", (jnp.float32,) * 2, "precision 'float32' with float32 q_b/k_b"),
    ],
)
def test_gpu_kernel_option_errors(width, tier, dtypes, match):
    from sessa_jax.ops.dispatch import check_gpu_kernels

    with pytest.raises(ValueError, match=match):
        check_gpu_kernels(width, tier, dtypes)
    check_gpu_kernels(128, "float32", (jnp.bfloat16,) * 2)  # bf16 q/k: one exact pass at any tier
    check_gpu_kernels(1024, "bf16x3", (jnp.float32,) * 2)  # any multiple of 64: streamed above 256
