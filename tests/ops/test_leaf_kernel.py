"""The Mosaic GPU leaf steps (``leaf_gpu.gpu_leaf_solve`` and its transposed twin) against the XLA
leaf steps they replace (the right-hand side f_i + gamma_i racc_i, Y_i times it at bf16x3 by the
explicit split, r_i = racc_i + that, s_i = f_i + gamma_i r_i, bf16(s_i) written into the leaf's
rows; lambda_i = w_i + Y_i^T (gamma_i w_i)), in Mosaic GPU interpret mode (jax >= 0.12,
skipped before; on a GPU compiled, ``scripts/accelerator_check.sh kernels``); its lowering for
"cuda" and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.ops.solve import accumulate_gpu as ag
from sessa_jax.ops.solve import leaf_gpu as lg
from sessa_jax.ops.solve.precision import chained_dot, split_bf16
from tests.support.gpu_kernels import interpret_or_skip, lower_or_skip
from tests.support.kernel_inputs import normal

B, LEAF, LEAVES = 2, 128, 3
BF16 = jnp.bfloat16
SD = jax.ShapeDtypeStruct
needs_in_place = pytest.mark.skipif(
    not ag.in_place_supported(), reason=f"jax {jax.__version__} cannot lower a jax.new_ref kernel operand (jax >= 0.12)"
)


def _lower(y_rows):
    """y_rows with each leaf's Y_i strictly lower triangular, as the solve's resolvents are."""
    return y_rows * jnp.tile(jnp.tri(LEAF, k=-1, dtype=y_rows.dtype), (y_rows.shape[1] // LEAF, 1))


def _upper_blocks(y_rows):
    """Where y_rows holds a Y_i's (64, 64) blocks above its diagonal: what the kernels never read."""
    block = jnp.arange(LEAF) // 64
    above = block[None, :] > block[:, None]
    return jnp.tile(above, (y_rows.shape[1] // LEAF, 1))


def _inputs(d: int):
    tp = LEAF * LEAVES
    y_rows = _lower(normal(40, (B, tp, LEAF)) * 0.1)
    f, racc = normal(41, (B, tp, d)), normal(42, (B, tp, d))
    gamma = 0.999 * jnp.tanh(normal(43, (B, tp)))
    s_b = normal(44, (B, tp, d), BF16)  # earlier leaves' copies: must survive
    return y_rows, f, racc, gamma, s_b


@pytest.mark.parametrize("d,traced,f_dtype", [(64, True, jnp.float32), (256, False, jnp.float32), (128, True, BF16)])
@needs_in_place
def test_leaf_solve_matches_the_xla_leaf_step(d, traced, f_dtype):
    """r_i = racc_i + Y_i (f_i + gamma_i racc_i) at the explicit bf16x3 split and s_i = f_i +
    gamma_i r_i, to fp32 summation order (and as close to the float32-exact product), written into
    r's and s's leaf rows; s_b gains bf16(s_i) there; all keep every other row; one and two column
    tiles, traced and static starts; f in float32 or read as bf16 (the same numbers as its float32
    widening)."""
    y_rows, f, racc, gamma, s_b = _inputs(d)
    f = f.astype(f_dtype)
    s_old, r_old = normal(46, f.shape), normal(49, f.shape)  # earlier leaves' s and r: must survive
    start = LEAF  # the middle leaf
    interp = False if jax.default_backend() == "gpu" else interpret_or_skip()

    def run(*args):
        return lg.gpu_leaf_solve(*args[:7], r=args[7], interpret=interp)

    if traced:
        s_new, s_b_new, r_new = jax.jit(run)(y_rows, f, racc, gamma, s_b, s_old, jnp.int32(start), r_old)
    else:
        s_new, s_b_new, r_new = jax.jit(run, static_argnums=6)(y_rows, f, racc, gamma, s_b, s_old, start, r_old)
    rows = slice(start, start + LEAF)
    assert s_new.shape == r_new.shape == f.shape and s_new.dtype == r_new.dtype == jnp.float32
    for new, old in ((s_new, s_old), (r_new, r_old)):
        np.testing.assert_array_equal(np.delete(new, np.s_[rows], axis=1), np.delete(old, np.s_[rows], axis=1))
    f_i, racc_i, gamma_i = f[:, rows].astype(jnp.float32), racc[:, rows], gamma[:, rows, None]
    y_i, rhs = y_rows[:, rows], f_i + gamma_i * racc_i
    twin = chained_dot("bij,bjd->bid", y_i, rhs, "bf16x3", "cpu")
    exact = jnp.einsum("bij,bjd->bid", y_i, rhs, precision=jax.lax.Precision.HIGHEST)
    scale = float(jnp.abs(exact).max())
    # bf16x3 drops lo.lo (~2^-16 relative per term); the rest is fp32 summation order
    tol = LEAF * 2.0**-22 * scale + 2.0**-22 * float(jnp.abs(racc_i).max())
    np.testing.assert_allclose(r_new[:, rows], racc_i + twin, rtol=0, atol=tol)
    s_i = s_new[:, rows]
    np.testing.assert_allclose(
        s_i, f_i + gamma_i * (racc_i + twin), rtol=0, atol=tol + 2.0**-22 * float(jnp.abs(f_i).max())
    )
    s_exact, s_twin = f_i + gamma_i * (racc_i + exact), f_i + gamma_i * (racc_i + twin)
    assert float(jnp.abs(s_i - s_exact).max()) <= 2 * float(jnp.abs(s_twin - s_exact).max()) + 2.0**-20 * scale
    got, old = np.asarray(s_b_new.astype(jnp.float32)), np.asarray(s_b.astype(jnp.float32))
    np.testing.assert_array_equal(got[:, rows], np.asarray(s_i.astype(BF16).astype(jnp.float32)))
    np.testing.assert_array_equal(np.delete(got, np.s_[rows], axis=1), np.delete(old, np.s_[rows], axis=1))
    # without r the same s and copies
    plain = jax.jit(lambda *a: lg.gpu_leaf_solve(*a, interpret=interp))(
        y_rows, f, racc, gamma, s_b, s_old, jnp.int32(start)
    )
    assert len(plain) == 2
    for a, b in zip(plain, (s_new, s_b_new)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


@pytest.mark.parametrize("f_dtype", [jnp.float32, BF16])
@needs_in_place
def test_leaf_solve_without_pushed_sums_takes_them_as_zero(f_dtype):
    """racc None (the first leaf, which no push reaches): the same s, bf16(s) and r as with a racc
    of -0.0 there, bit for bit, and no racc read."""
    y_rows, f, _, gamma, s_b = _inputs(128)
    f = f.astype(f_dtype)
    s_old, r_old = normal(46, f.shape), normal(49, f.shape)
    interp = False if jax.default_backend() == "gpu" else interpret_or_skip()

    def run(racc):
        return lg.gpu_leaf_solve(y_rows, f, racc, gamma, s_b, s_old, 0, r=r_old, interpret=interp)

    got = jax.jit(lambda: run(None))()
    want = jax.jit(run)(jnp.full(f.shape, -0.0, jnp.float32))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    assert float(jnp.abs(got[2][:, :LEAF] - r_old[:, :LEAF]).max()) > 0  # r_i = Y_i f_i landed


def _split_y(y_rows):
    """y_rows (B, n LEAF, LEAF) as the pair (diag, low) of ``lower_resolvent(split_top=True)``."""
    b, h = y_rows.shape[0], LEAF // 2
    leaves = y_rows.reshape(b, -1, LEAF, LEAF)
    diag = jnp.concatenate([leaves[:, :, :h, :h], leaves[:, :, h:, h:]], axis=2).reshape(b, -1, h)
    return diag, leaves[:, :, h:, :h].reshape(b, -1, h)


@pytest.mark.parametrize("transposed", [False, True])
@needs_in_place
def test_leaf_kernels_take_y_in_the_split_form_alike(transposed):
    """y_rows as (diag, low) (``_y_parts``: the diagonal halves one buffer, Y21 another): every
    result bit for bit as from y_rows whole, at a traced start (the middle leaf)."""
    y_rows, f, racc, gamma, s_b = _inputs(128)
    y_rows = jnp.where(_upper_blocks(y_rows), 0.0, normal(50, y_rows.shape) * 0.1)  # Y21's blocks dense
    y_rows = _lower(y_rows)
    interp = False if jax.default_backend() == "gpu" else interpret_or_skip()
    start = jnp.int32(LEAF)
    if transposed:
        g_lo = normal(45, s_b.shape, BF16)
        run = jax.jit(
            lambda y: lg.gpu_leaf_solve_transposed(
                y, racc, gamma, s_b, g_lo, normal(47, f.shape), start, interpret=interp
            )
        )
    else:
        run = jax.jit(lambda y: lg.gpu_leaf_solve(y, f, racc, gamma, s_b, normal(46, f.shape), start, interpret=interp))
    whole, split = run(y_rows), run(_split_y(y_rows))
    for got, want in zip(split, whole):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with pytest.raises(ValueError, match="as \\(diag, low\\)"):
        lg.gpu_leaf_solve(_split_y(y_rows)[::-1], f, racc, gamma, s_b, None, 0, interpret=interp)


@pytest.mark.parametrize("d,traced", [(128, True), (256, False)])
@needs_in_place
def test_transposed_leaf_solve_matches_the_xla_leaf_step(d, traced):
    """lambda_i equals X_i^T bacc_i = bacc_i + Y_i^T (gamma_i bacc_i), the product at the explicit
    bf16x3 split, to fp32 summation order, written
    into lam's leaf rows; g_hi and g_lo gain the bf16 hi + lo parts of gamma_i lambda_i there; all
    keep every other row."""
    from sessa_jax.ops.solve.precision import split_bf16

    y_rows, bacc, _, gamma, g_hi = _inputs(d)
    g_lo = normal(45, g_hi.shape, BF16)
    start = 2 * LEAF  # the last leaf
    interp = False if jax.default_backend() == "gpu" else interpret_or_skip()

    def run(*args):
        return lg.gpu_leaf_solve_transposed(*args, interpret=interp)

    lam_old = normal(47, bacc.shape)
    args = (y_rows, bacc, gamma, g_hi, g_lo, lam_old)
    if traced:
        lam_new, hi, lo = jax.jit(run)(*args, jnp.int32(start))
    else:
        lam_new, hi, lo = jax.jit(run, static_argnums=6)(*args, start)
    rows = slice(start, start + LEAF)
    np.testing.assert_array_equal(np.delete(lam_new, np.s_[rows], axis=1), np.delete(lam_old, np.s_[rows], axis=1))
    lam = lam_new[:, rows]
    w = bacc[:, rows]
    product = chained_dot("bji,bjd->bid", y_rows[:, rows], gamma[:, rows, None] * w, "bf16x3", "cpu")
    tol = LEAF * 2.0**-22 * float(jnp.abs(product).max()) + 2.0**-22 * float(jnp.abs(w).max())
    np.testing.assert_allclose(lam, w + product, rtol=0, atol=tol)
    g = gamma[:, rows, None] * lam
    want_hi, _ = split_bf16(g)
    f32 = lambda x: np.asarray(x.astype(jnp.float32))  # noqa: E731
    # hi is g rounded once, as the backward's delta rounds it; lo = bf16(g - hi) may round a tie
    # the other way where the compiler fuses g's product into the subtraction (one fma)
    np.testing.assert_array_equal(f32(hi[:, rows]), f32(want_hi))
    np.testing.assert_allclose(f32(hi[:, rows]) + f32(lo[:, rows]), np.asarray(g), rtol=2.0**-16, atol=0)
    assert np.abs(f32(lo[:, rows])).max() > 0  # the low part really landed
    for new, old in ((hi, g_hi), (lo, g_lo)):
        np.testing.assert_array_equal(
            np.delete(f32(new), np.s_[rows], axis=1), np.delete(f32(old), np.s_[rows], axis=1)
        )
    # with lam_b the step also writes bf16(lambda_i) there, the rest of it kept, the other results the same
    lam_b_old = normal(48, bacc.shape, BF16)
    out = jax.jit(lambda *a: lg.gpu_leaf_solve_transposed(*a, lam_b=lam_b_old, interpret=interp))(
        *args, jnp.int32(start)
    )
    assert len(out) == 4
    for got, want in zip(out[:3], (lam_new, hi, lo)):
        np.testing.assert_array_equal(f32(got), f32(want))
    np.testing.assert_array_equal(f32(out[3][:, rows]), f32(lam.astype(BF16)))
    np.testing.assert_array_equal(
        np.delete(f32(out[3]), np.s_[rows], axis=1), np.delete(f32(lam_b_old), np.s_[rows], axis=1)
    )


@pytest.mark.parametrize("transposed", [False, True])
@needs_in_place
def test_leaf_kernels_never_read_the_blocks_above_the_diagonal(transposed):
    """Y_i is strictly lower triangular, so its (64, 64) blocks above the diagonal hold zeros the kernels
    skip: NaN there leaves both steps' results and bf16 copies as they are with zeros."""
    d = 128
    y_rows, rhs, racc, gamma, s_b = _inputs(d)
    poisoned = jnp.where(_upper_blocks(y_rows), jnp.nan, y_rows)
    interp = False if jax.default_backend() == "gpu" else interpret_or_skip()
    if transposed:
        step = lambda x: lg.gpu_leaf_solve_transposed(x, rhs, gamma, s_b, s_b, racc, LEAF, interpret=interp)  # noqa: E731
    else:
        step = lambda x: lg.gpu_leaf_solve(x, rhs, racc, gamma, s_b, racc, LEAF, interpret=interp)  # noqa: E731
    for want, got in zip(jax.jit(step)(y_rows), jax.jit(step)(poisoned)):
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


@needs_in_place
def test_leaf_solve_writes_s_parts_with_or_without_a_float32_s():
    """With ``s_lo`` the step also writes bf16(s_i - bf16(s_i)): with s_b, split_bf16 of the s_i it
    writes; with s=None no float32 s is written and the bf16 parts are the same; other rows of
    every buffer stay."""
    d = 128
    y_rows, f, racc, gamma, s_b = _inputs(d)
    s_lo = normal(47, f.shape, BF16)
    s_old = normal(46, f.shape)
    interp = False if jax.default_backend() == "gpu" else interpret_or_skip()
    full = jax.jit(lambda *a: lg.gpu_leaf_solve(*a, s_lo=s_lo, interpret=interp))(
        y_rows, f, racc, gamma, s_b, s_old, jnp.int32(LEAF)
    )
    s_new, hi, lo = full
    want_hi, want_lo = split_bf16(s_new[:, LEAF : 2 * LEAF])
    rows = np.s_[:, LEAF : 2 * LEAF]
    for got, want, old in ((hi, want_hi, s_b), (lo, want_lo, s_lo)):
        np.testing.assert_array_equal(np.asarray(got[rows].astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
        outside = np.delete(np.asarray(got.astype(jnp.float32)), np.s_[LEAF : 2 * LEAF], axis=1)
        np.testing.assert_array_equal(
            outside, np.delete(np.asarray(old.astype(jnp.float32)), np.s_[LEAF : 2 * LEAF], axis=1)
        )
    bare = jax.jit(lambda *a: lg.gpu_leaf_solve(*a, s_lo=s_lo, interpret=interp), static_argnums=5)(
        y_rows, f.astype(BF16), racc, gamma, s_b, None, LEAF
    )
    assert bare[0] is None and len(bare) == 3
    want = jax.jit(lambda *a: lg.gpu_leaf_solve(*a, s_lo=s_lo, interpret=interp))(
        y_rows, f.astype(BF16), racc, gamma, s_b, s_old, jnp.int32(LEAF)
    )
    for got, ref in zip(bare[1:], want[1:]):
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32)))


@needs_in_place
def test_leaf_solve_lowers_for_cuda_with_the_copy_in_place():
    tp, d = LEAF * LEAVES, 256
    wide = SD((B, tp, d), jnp.float32)
    args = (SD((B, tp, LEAF), jnp.float32), wide, wide, SD((B, tp), jnp.float32))
    args = (*args, SD((B, tp, d), BF16), wide, SD((), jnp.int32))
    text = lower_or_skip(jax.jit(lambda *a: lg.gpu_leaf_solve(*a)), args)
    assert lg.KERNEL_NAME in text and "mosaic_gpu" in text
    assert "output_operand_alias" in text  # s's and s_b's rows are written where they are
    text = lower_or_skip(jax.jit(lambda *a: lg.gpu_leaf_solve(*a)), (args[0], args[4], *args[2:]))
    assert lg.KERNEL_NAME in text  # f read as bf16
    text = lower_or_skip(jax.jit(lambda *a: lg.gpu_leaf_solve(*a[:7], r=a[7])), (*args, wide))
    assert lg.KERNEL_NAME in text and text.count("output_operand_alias") >= 3  # r written in place too
    args = (args[0], args[1], args[3], args[4], args[4], wide, args[6])
    text = lower_or_skip(jax.jit(lambda *a: lg.gpu_leaf_solve_transposed(*a)), args)
    assert lg.TRANSPOSED_KERNEL_NAME in text and "output_operand_alias" in text


@needs_in_place
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(d=96), "leaf 128 and width 96 must be multiples of 64"),
        (dict(s_b_dtype=jnp.float32), "s_b bfloat16"),
        (dict(f_dtype=jnp.float16), "want f float32 or bfloat16; got float16"),
        (dict(gamma_len=100), "gamma must have shape"),
        (dict(start=64), "row_start 64 must be a leaf's first row"),
    ],
)
def test_leaf_solve_errors(change, match):
    d, tp = change.get("d", 128), LEAF * LEAVES
    y_rows, f = jnp.zeros((1, tp, LEAF)), jnp.zeros((1, tp, d))
    gamma = jnp.zeros((1, change.get("gamma_len", tp)))
    s_b = jnp.zeros((1, tp, d), change.get("s_b_dtype", BF16))
    with pytest.raises(ValueError, match=match):
        lg.gpu_leaf_solve(
            y_rows, f.astype(change.get("f_dtype", jnp.float32)), f, gamma, s_b, f, change.get("start", 0)
        )


@needs_in_place
@pytest.mark.parametrize("d", [128, 256])
def test_transposed_leaf_solve_writes_the_row_sums_partial_sums(d):
    """``row_sums``: the leaf rows of the two partial-sum buffers take, per block of Bn columns,
    rowsum(g_hi * r) (g rounded to bf16 once, as the dual GEMM's g s^T takes it) and rowsum(lambda
    * r), to fp32 summation order; their other rows are kept, and the step's other results are
    the same bit for bit as without them."""
    y_rows, bacc, _, gamma, g_hi = _inputs(d)
    g_lo = normal(45, g_hi.shape, BF16)
    r, lam_old = normal(46, bacc.shape), normal(47, bacc.shape)
    bn = lg.leaf_column_block(d)
    parts_shape = (B, d // bn, bacc.shape[1])
    delta_old, dgamma_old = normal(48, parts_shape), normal(49, parts_shape)
    start = LEAF  # a middle leaf
    interp = False if jax.default_backend() == "gpu" else interpret_or_skip()
    args = (y_rows, bacc, gamma, g_hi, g_lo, lam_old, jnp.int32(start))
    plain = jax.jit(lambda *a: lg.gpu_leaf_solve_transposed(*a, interpret=interp))(*args)
    out = jax.jit(lambda *a: lg.gpu_leaf_solve_transposed(*a, row_sums=(r, delta_old, dgamma_old), interpret=interp))(
        *args
    )
    assert len(out) == 5
    f32 = lambda x: np.asarray(x.astype(jnp.float32))  # noqa: E731
    for got, want in zip(out[:3], plain):
        np.testing.assert_array_equal(f32(got), f32(want))
    lam_new, hi, _, delta_parts, dgamma_parts = out
    rows = slice(start, start + LEAF)
    lam, g_rounded, r_rows = np.asarray(lam_new[:, rows]), f32(hi[:, rows]), np.asarray(r[:, rows])
    blocks = lambda x: x.reshape(B, LEAF, d // bn, bn).transpose(0, 2, 1, 3)  # noqa: E731
    want_delta = np.sum(blocks(g_rounded * r_rows), axis=-1, dtype=np.float64)
    want_dgamma = np.sum(blocks(lam * r_rows), axis=-1, dtype=np.float64)
    for got, want, old in ((delta_parts, want_delta, delta_old), (dgamma_parts, want_dgamma, dgamma_old)):
        got = np.asarray(got)
        scale = np.abs(want).max()
        np.testing.assert_allclose(got[:, :, rows], want, rtol=0, atol=bn * 2.0**-22 * scale)
        np.testing.assert_array_equal(
            np.delete(got, np.s_[rows], axis=2), np.delete(np.asarray(old), np.s_[rows], axis=2)
        )
    with pytest.raises(ValueError, match=rf"delta_parts must be float32 \(2, {d // bn}, 384\)"):
        lg.gpu_leaf_solve_transposed(*args[:6], 0, row_sums=(r, delta_old[:, :, :64], dgamma_old), interpret=interp)


@needs_in_place
def test_transposed_leaf_solve_without_a_float32_lambda():
    """lam None: no float32 lambda is written (None returned), and g's parts, bf16(lambda) and the
    row sums' partial sums are the same bit for bit as with it."""
    d = 128
    y_rows, bacc, _, gamma, g_hi = _inputs(d)
    g_lo, lam_b, r = normal(45, g_hi.shape, BF16), normal(46, g_hi.shape, BF16), normal(47, bacc.shape)
    parts = (normal(48, (B, 1, bacc.shape[1])), normal(49, (B, 1, bacc.shape[1])))
    interp = False if jax.default_backend() == "gpu" else interpret_or_skip()

    def run(lam):
        return jax.jit(
            lambda *a: lg.gpu_leaf_solve_transposed(
                *a, lam, jnp.int32(LEAF), lam_b=lam_b, row_sums=(r, *parts), interpret=interp
            )
        )(y_rows, bacc, gamma, g_hi, g_lo)

    with_lam, without = run(normal(50, bacc.shape)), run(None)
    assert without[0] is None and len(without) == len(with_lam) == 6
    for got, want in zip(without[1:], with_lam[1:]):
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
