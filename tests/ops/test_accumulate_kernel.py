"""The Mosaic GPU in-place accumulating product (``accumulate_gpu.gpu_accumulate_product``)
against the same product in XLA, in Mosaic GPU interpret mode (jax >= 0.11, skipped before; on a
GPU compiled, ``scripts/accelerator_check.sh kernels``):
both orientations, windows at traced and static starts, one and several column tiles; its
lowering for "cuda" (the buffer an aliased operand of the kernel) and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.ops.solve import accumulate_gpu as ag
from tests.support.gpu_kernels import interpret_or_skip, lower_or_skip
from tests.support.kernel_inputs import normal

B = 2
BF16 = jnp.bfloat16
needs_in_place = pytest.mark.skipif(
    not ag.in_place_supported(), reason=f"jax {jax.__version__} cannot lower a jax.new_ref kernel operand (jax >= 0.12)"
)
SD = jax.ShapeDtypeStruct


def _xla(acc, a, b, acc_start, b_start, transpose_a, scale):
    """acc + (op(a) @ b[window]) * scale on the window of acc: the XLA path's order of operations."""
    op_a = jnp.swapaxes(a, 1, 2) if transpose_a else a
    m, c = op_a.shape[1:]
    prod = jnp.einsum("bmc,bcn->bmn", op_a, b[:, b_start : b_start + c], preferred_element_type=jnp.float32)
    return acc.at[:, acc_start : acc_start + m].set(acc[:, acc_start : acc_start + m] + prod * scale)


@pytest.mark.parametrize(
    "transpose_a,n,traced", [(False, 128, True), (True, 128, True), (False, 512, False), (True, 512, False)]
)
@needs_in_place
def test_accumulates_the_window_in_place_like_xla(transpose_a, n, traced):
    """Rows [acc_start, acc_start + M) of acc gain scale * op(a) b[b_start : b_start + C]; every other
    row is untouched; equal to XLA's one bf16 pass to fp32 accumulation order."""
    t, m, c, acc_start, b_start = 512, 128, 192, 256, 64
    acc = normal(1, (B, t, n))
    a = normal(2, (B, c, m) if transpose_a else (B, m, c), BF16)
    b = normal(3, (B, t, n), BF16)
    interp = False if jax.default_backend() == "gpu" else interpret_or_skip()  # compiled on a GPU

    def run(acc, a, b, acc_start, b_start):
        return ag.gpu_accumulate_product(
            acc, a, b, acc_start=acc_start, b_start=b_start, transpose_a=transpose_a, scale=0.25, interpret=interp
        )

    if traced:
        got = jax.jit(run)(acc, a, b, jnp.int32(acc_start), jnp.int32(b_start))
    else:
        got = jax.jit(run, static_argnums=(3, 4))(acc, a, b, acc_start, b_start)
    want = _xla(acc, a, b, acc_start, b_start, transpose_a, 0.25)
    got, want, acc = np.asarray(got), np.asarray(want), np.asarray(acc)
    window = slice(acc_start, acc_start + m)
    outside = np.ones(t, bool)
    outside[window] = False
    np.testing.assert_array_equal(got[:, outside], acc[:, outside])
    # the product's terms are bf16 x bf16 (exact in fp32): only fp32 summation order differs
    np.testing.assert_allclose(got[:, window], want[:, window], rtol=0, atol=c * 2.0**-23 * 0.25 * 16.0)
    assert np.abs(got[:, window] - acc[:, window]).max() > 1.0  # the product really landed


@needs_in_place
def test_accumulated_buffer_is_an_aliased_operand_when_lowered_for_cuda():
    acc, a, b = SD((B, 512, 256), jnp.float32), SD((B, 128, 64), BF16), SD((B, 512, 256), BF16)

    def run(acc, a, b, start):
        return ag.gpu_accumulate_product(acc, a, b, acc_start=start, b_start=0, transpose_a=True)

    text = lower_or_skip(jax.jit(run), (acc, a, b, SD((), jnp.int32)))
    assert ag.TRANSPOSED_KERNEL_NAME in text and "mosaic_gpu" in text
    assert "output_operand_alias" in text  # the kernel writes acc's buffer, no copy of the result


@needs_in_place
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(acc_dtype=BF16), "acc must be float32 and a, b bfloat16"),
        (dict(n=96), "width N=96 must be a multiple of 64"),
        (dict(n=320), "width N=320 must be a multiple of 64 up to 256, or a multiple of 256"),
        (dict(m=96), "M=96 must be a multiple of 64"),
        (dict(acc_start=32), "window \\[32, 160\\) of acc must lie inside its 512 rows and start at a multiple of 64"),
        (dict(b_start=448), "window \\[448, 576\\) of b must lie inside its 512 rows"),
    ],
)
def test_accumulate_errors(kwargs, match):
    n, m = kwargs.get("n", 128), kwargs.get("m", 128)
    acc = jnp.zeros((1, 512, n), kwargs.get("acc_dtype", jnp.float32))
    a, b = jnp.zeros((1, m, 128), BF16), jnp.zeros((1, 512, n), BF16)
    with pytest.raises(ValueError, match=match):
        ag.gpu_accumulate_product(acc, a, b, acc_start=kwargs.get("acc_start", 0), b_start=kwargs.get("b_start", 0))


@pytest.mark.skipif(ag.in_place_supported(), reason="this jax lowers the kernel")
def test_accumulate_refuses_an_old_jax_by_name():
    acc, a = jnp.zeros((1, 128, 64)), jnp.zeros((1, 64, 64), BF16)
    with pytest.raises(ValueError, match="needs jax >= 0.12"):
        ag.gpu_accumulate_product(acc, a, a)
