"""The Mosaic GPU in-place accumulating product (``accumulate_gpu.gpu_accumulate_product``) and
its add-and-cast twin (``gpu_add_product``) against the same products in XLA, in Mosaic GPU
interpret mode (jax >= 0.11, skipped before; on a GPU compiled, ``scripts/accelerator_check.sh
kernels``): both orientations, windows at traced and static starts, one and several column
tiles, operands in two parts; their lowering for "cuda" (the buffer an aliased operand of the
in-place kernel) and their errors."""

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


def _interpret():
    return False if jax.default_backend() == "gpu" else interpret_or_skip()  # compiled on a GPU


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("overwrite", [True, ((0, 64), (128, 192))])
@needs_in_place
def test_overwrite_writes_its_rows_without_reading_them(transpose_a, overwrite):
    """``overwrite``: True, the window's rows become scale * op(a) b; row ranges of the window,
    those rows do and the others gain it. NaN in the written rows before is never read: the same
    numbers as adding the product to a buffer holding -0.0 there; every row outside the window
    untouched."""
    t, m, c, n, acc_start, b_start = 512, 256, 128, 128, 128, 64
    fresh = np.zeros(t, bool)
    for lo, hi in ((0, m),) if overwrite is True else overwrite:
        fresh[acc_start + lo : acc_start + hi] = True
    acc = normal(1, (B, t, n))
    a = normal(2, (B, c, m) if transpose_a else (B, m, c), BF16)
    b = normal(3, (B, t, n), BF16)
    interp = _interpret()

    def run(acc, overwrite):
        return ag.gpu_accumulate_product(
            acc,
            a,
            b,
            acc_start=acc_start,
            b_start=b_start,
            transpose_a=transpose_a,
            scale=0.25,
            overwrite=overwrite,
            interpret=interp,
        )

    got = np.asarray(jax.jit(run, static_argnums=1)(jnp.where(fresh[None, :, None], jnp.nan, acc), overwrite))
    want = np.asarray(jax.jit(run, static_argnums=1)(jnp.where(fresh[None, :, None], -0.0, acc), False))
    np.testing.assert_array_equal(got, want)
    assert not np.isnan(got).any()


@pytest.mark.parametrize(
    "overwrite,match",
    [(((0, 96),), "multiples of 64"), (((64, 64),), "start < stop"), (((0, 192),), "stop <= 128"), ((0,), "ranges")],
)
@needs_in_place
def test_overwrite_ranges_are_checked(overwrite, match):
    acc, a, b = jnp.zeros((1, 512, 128)), jnp.zeros((1, 128, 128), BF16), z16()
    with pytest.raises(ValueError, match=match):
        ag.gpu_accumulate_product(acc, a, b, overwrite=overwrite)


@pytest.mark.parametrize("split,n", [("a", 128), ("b", 128), ("b", 512)])
@needs_in_place
def test_operand_parts_add_as_one_product(split, n):
    """With a (or b) in two parts, the window gains scale * (op(a_hi) b + op(a_lo) b) (or op(a)
    (b_hi + b_lo)), as the two products in XLA, summed before they are added; the rows outside
    the window untouched; one and two column tiles."""
    t, m, c, acc_start, b_start = 384, 128, 128, 192, 64
    acc = normal(1, (B, t, n))
    a = normal(2, (B, c, m), BF16)  # transposed, as the backward's P^T g
    b = normal(3, (B, t, n), BF16)
    other = normal(4, (B, c, m) if split == "a" else (B, t, n), BF16) * 2.0**-8
    a_arg, b_arg = ((a, other), b) if split == "a" else (a, (b, other))
    got = jax.jit(
        lambda acc, a, b, start: ag.gpu_accumulate_product(
            acc, a, b, acc_start=start, b_start=b_start, transpose_a=True, scale=0.5, interpret=_interpret()
        )
    )(acc, a_arg, b_arg, jnp.int32(acc_start))

    def product(a, b):
        return jnp.einsum("bcm,bcn->bmn", a, b[:, b_start : b_start + c], preferred_element_type=jnp.float32)

    prod = product(a, b) + (product(other, b) if split == "a" else product(a, other))
    window = slice(acc_start, acc_start + m)
    want = np.asarray(acc).copy()
    want[:, window] = np.asarray(acc[:, window] + prod * 0.5)
    got = np.asarray(got)
    np.testing.assert_array_equal(np.delete(got, np.s_[window], axis=1), np.delete(want, np.s_[window], axis=1))
    np.testing.assert_allclose(got[:, window], want[:, window], rtol=0, atol=2 * c * 2.0**-23 * 0.5 * 16.0)
    # the small part really landed: the one-part result misses it by far more than the tolerance
    one_part = np.asarray(acc[:, window] + product(a, b) * 0.5)
    assert np.abs(got[:, window] - one_part).max() > 100 * 2 * c * 2.0**-23 * 0.5 * 16.0


@pytest.mark.parametrize("transpose_a,out_dtype", [(False, BF16), (True, BF16), (True, jnp.float32)])
def test_add_product_adds_and_casts_like_xla(transpose_a, out_dtype):
    """gpu_add_product: (acc + scale * op(a) b) in out_dtype, as XLA's add then cast: equal up to
    the fp32 summation order, which can move a bf16 result by at most one bf16 ulp."""
    m, c, n = 128, 192, 256
    acc = normal(5, (B, m, n)) * 4.0
    a = normal(6, (B, c, m) if transpose_a else (B, m, c), BF16)
    b = normal(7, (B, c, n), BF16)
    got = jax.jit(
        lambda acc, a, b: ag.gpu_add_product(
            acc, a, b, transpose_a=transpose_a, scale=0.125, out_dtype=out_dtype, interpret=_interpret()
        )
    )(acc, a, b)
    op_a = jnp.swapaxes(a, 1, 2) if transpose_a else a
    exact = acc + jnp.einsum("bmc,bcn->bmn", op_a, b, preferred_element_type=jnp.float32) * 0.125
    assert got.dtype == out_dtype and got.shape == acc.shape
    got, exact = np.asarray(got, np.float32), np.asarray(exact)
    ulp = 2.0**-8 if out_dtype == BF16 else 2.0**-23
    np.testing.assert_allclose(got, exact, rtol=ulp, atol=c * 2.0**-23 * 0.125 * 16.0)
    assert np.abs(got - np.asarray(acc)).max() > 1.0  # the product really landed


@pytest.mark.parametrize("transpose_a", [False, True])
def test_add_product_fresh_batches_take_the_product_alone(transpose_a):
    """``fresh_batches=(period, indices)``: batch rows b with b % period in indices take scale *
    op(a) b alone (NaN in their acc is never read), the others acc + it: as adding to -0.0 there."""
    m, c, n, batch = 128, 128, 128, 6
    fresh = np.array([b % 3 in (0, 2) for b in range(batch)])
    acc = normal(5, (batch, m, n))
    a = normal(6, (batch, c, m) if transpose_a else (batch, m, c), BF16)
    b = normal(7, (batch, c, n), BF16)
    interp = _interpret()

    def run(acc, fresh_batches):
        return ag.gpu_add_product(
            acc, a, b, transpose_a=transpose_a, scale=0.5, fresh_batches=fresh_batches, interpret=interp
        )

    got = jax.jit(run, static_argnums=1)(jnp.where(fresh[:, None, None], jnp.nan, acc), (3, (2, 0)))
    want = jax.jit(run, static_argnums=1)(jnp.where(fresh[:, None, None], -0.0, acc), None)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with pytest.raises(ValueError, match="fresh_batches must be"):
        ag.gpu_add_product(acc, a, b, transpose_a=transpose_a, fresh_batches=(3, (3,)))


@pytest.mark.parametrize("transpose_a", [False, True])
def test_add_product_of_a_lower_triangular_a_reads_only_its_lower_blocks(transpose_a):
    """With ``a_lower`` (a square, lower triangular in (64, 64) blocks: the diagonal leaves' dL) the
    result equals the full product's, and NaN in a's blocks above the diagonal changes nothing:
    they are never read."""
    m, n = 192, 128
    acc = normal(8, (B, m, n))
    block = np.arange(m) // 64
    below = jnp.asarray(block[None, :] <= block[:, None])  # blocks on and below the diagonal
    a = jnp.where(below, normal(9, (B, m, m)), 0.0).astype(BF16)
    b = normal(10, (B, m, n), BF16)

    def run(a, lower):
        return ag.gpu_add_product(
            acc, a, b, transpose_a=transpose_a, a_lower=lower, scale=0.5, out_dtype=jnp.float32, interpret=_interpret()
        )

    full = jax.jit(lambda a: run(a, False))(a)
    lower = jax.jit(lambda a: run(a, True))
    np.testing.assert_array_equal(np.asarray(lower(a)), np.asarray(full))
    np.testing.assert_array_equal(np.asarray(lower(jnp.where(below, a, jnp.nan))), np.asarray(full))
    cost = ag.accumulate_cost(B, m, m, n, 1, 1, 4, a_lower=True)
    assert cost.flops == 2 * B * int(below.sum()) * n  # the blocks it multiplies
    with pytest.raises(ValueError, match="a_lower needs a square a"):
        ag.gpu_add_product(acc, a[:, :, :128], b[:, :128], a_lower=True)


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


def test_add_product_lowers_for_cuda_with_a_narrow_output():
    acc, a, b = SD((B, 256, 256), jnp.float32), SD((B, 256, 256), BF16), SD((B, 256, 256), BF16)
    text = lower_or_skip(jax.jit(lambda acc, a, b: ag.gpu_add_product(acc, a, b, transpose_a=True)), (acc, a, b))
    assert ag.ADD_TRANSPOSED_KERNEL_NAME in text and "mosaic_gpu" in text
    assert "output_operand_alias" not in text  # a new bf16 array, the buffer only read


@needs_in_place
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda z, t: ag.gpu_accumulate_product(z, (t, t), (z16(), z16())), "at most one of them in parts"),
        (lambda z, t: ag.gpu_accumulate_product(z, (t, t[:, :64]), z16()), "parts of a must share one shape"),
        (lambda z, t: ag.gpu_add_product(z, t, z16()), "want acc \\(B, M, N\\) and b \\(B, C, N\\)"),
    ],
)
def test_part_and_add_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.zeros((1, 512, 128)), jnp.zeros((1, 128, 128), BF16))


def z16():
    return jnp.zeros((1, 512, 128), BF16)


@pytest.mark.skipif(ag.in_place_supported(), reason="this jax lowers the kernel")
def test_accumulate_refuses_an_old_jax_by_name():
    acc, a = jnp.zeros((1, 128, 64)), jnp.zeros((1, 64, 64), BF16)
    with pytest.raises(ValueError, match="needs jax >= 0.12"):
        ag.gpu_accumulate_product(acc, a, a)
