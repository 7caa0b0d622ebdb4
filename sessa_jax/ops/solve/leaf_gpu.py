"""Pallas Mosaic GPU (Hopper, ``plgpu``) kernels for the recursive solve's leaf steps at bf16x3,
through Y_i = A_ii (I - diag(gamma_i) A_ii)^-1 (``trsolve.lower_resolvent``): the forward's
r_i = racc_i + Y_i (f_i + gamma_i racc_i) and s_i = f_i + gamma_i r_i (= X_i (f_i + gamma_i
racc_i) with X_i = (I - diag(gamma_i) A_ii)^-1, and r_i = racc_i + A_ii s_i, the backward's
residual, without a product by A_ii), and the backward's lambda_i = X_i^T w_i = w_i + Y_i^T
(gamma_i w_i), each reading Y_i and its right-hand side in place from the full-length buffers
and writing the bf16 copies the pushes read (s's, or g = gamma lambda's two parts) in place,
where XLA copies Y_i and the right-hand side out of their buffers, runs the product, and writes
each result in a pass of its own.

``gpu_leaf_solve(y_rows, f, racc, gamma, s_b, s, row_start)`` and
``gpu_leaf_solve_transposed(y_rows, bacc, gamma, g_hi, g_lo, lam, row_start)``: y_rows (B, n Cs,
Cs) float32 holds the leaves' Y_i one under another (rows [i Cs, (i + 1) Cs) are Y_i), each
strictly lower triangular: the kernels read only its (64, 64) blocks on and below the diagonal,
and take the products over them alone; the other buffers are (B, Tp, D) (gamma (B, Tp)), read
and written at rows [o, o + Cs) with o = ``row_start`` = i Cs (traced). Each writes the leaf's
results into the leaf's rows of float32 buffers of their own (s and r, or lam: not over the
right-hand side, which other programs of the same step still read) and the bf16 copies, all in
place (``jax.new_ref``). Grid (Cs / 64, D / Bn, B), one warpgroup per (64, Bn) tile of the
result, Bn = min(D, 128); the contraction over the leaf's rows runs in chunks of 64 (the tile's
own chunk last: the chunks before it, or transposed those after it, then its own, whose staged
right-hand side and gamma the result then adds): Y_i's (64, 64) chunk and the right-hand side's
(64, Bn) chunk come by TMA (float32; the forward's f also bf16: f and racc, or bacc, combined
with gamma in fp32 registers), are split into bf16 hi + lo in registers and stored to shared
memory, and three wgmmas (hi hi + hi lo + lo hi; Y_i transposed through the shared-memory view
in the backward) accumulate in fp32: the bf16x3 products of ``precision.leaf_dot``'s explicit
split. Shared memory at most about 176 KiB.

Needs a Hopper GPU (sm_90a) and jax >= 0.12 (the in-place writes,
``accumulate_gpu.in_place_supported``); verified on CPU only, in Mosaic GPU interpret mode
against the XLA leaf steps, and lowered for "cuda". Never run on a GPU; its speed is unknown.
Used by ``kernels="gpu_gemm"`` in the "bfloat16" tier (``recursive``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sessa_jax.ops.solve.accumulate_gpu import (
    _OUT_SWIZZLE,
    KERNEL_TAKES_COST,
    check_in_place,
    lower_blocks,
)
from sessa_jax.ops.solve.block_product_gpu import _split
from sessa_jax.ops.solve.row_stats_gpu import SWIZZLE, _load, copy_waited, read_window_starts, window_starts

F32 = jnp.float32
BF16 = jnp.bfloat16
BLOCK_M = 64  # rows of s_i per warpgroup
BLOCK_N = 128  # most columns per program (the float32 staging tiles bound it)
BLOCK_C = 64  # contraction chunk (rows of the leaf)
KERNEL_NAME = "sessa_leaf_solve_gpu"
TRANSPOSED_KERNEL_NAME = "sessa_leaf_solve_t_gpu"  # the backward's X_i^T = I + Y_i^T Gamma_i

__all__ = [
    "KERNEL_NAME",
    "TRANSPOSED_KERNEL_NAME",
    "gpu_leaf_solve",
    "gpu_leaf_solve_transposed",
    "leaf_column_block",
    "leaf_solve_covers",
]


def leaf_column_block(d: int) -> int:
    """Bn, the columns of the result one program of the leaf kernels computes at width ``d``: d up
    to ``BLOCK_N``, else ``BLOCK_N``. The transposed step's row sums come as d / Bn partial sums."""
    return d if d <= BLOCK_N else BLOCK_N


def leaf_solve_covers(leaf: int, d: int) -> bool:
    """Whether the kernel takes a leaf of ``leaf`` rows and width ``d``: both multiples of 64, and d
    up to ``BLOCK_N`` or a multiple of it."""
    return leaf > 0 and leaf % BLOCK_C == 0 and d > 0 and d % 64 == 0 and d % leaf_column_block(d) == 0


def _bf16x3_chunk(acc, x_stage, rhs, x_parts, rhs_parts, transposed: bool) -> None:
    """acc += X's staged float32 chunk (transposed through the shared-memory view) times ``rhs``
    (fp32 registers), both split into bf16 hi + lo in registers and stored to shared memory: hi hi
    + hi lo + lo hi in three wgmmas, waited for (the next chunk overwrites the operands). ``rhs``
    None: its parts are in ``rhs_parts`` already."""
    for p, part in enumerate(_split(_load(x_stage, plgpu.Layout.WGMMA), True)):
        x_parts[p] = part
    for p, part in enumerate(_split(rhs, True) if rhs is not None else ()):
        rhs_parts[p] = part
    plgpu.commit_smem()
    for px, pr in ((0, 0), (0, 1), (1, 0)):
        x_op = x_parts.at[px].transpose((1, 0)) if transposed else x_parts.at[px]
        plgpu.wgmma(acc, x_op, rhs_parts.at[pr])
    plgpu.wgmma_wait(0)


def _copy_y_block(x_refs, b, row0, block, chunks: int, x_stage, barrier) -> None:
    """Inside a kernel: Y_i's (64, 64) block (row block r, column block c) of the leaf starting at
    row0 into ``x_stage``, from y_rows, or from the two buffers of ``_y_parts``: the diagonal halves'
    (the leaf's rows from row0, the column block within its half) or, below the diagonal halves
    (r in the lower half, c in the upper), Y21's (its rows from row0 / 2, a multiple of 64 as Cs / 2
    is)."""
    r, c = block
    if len(x_refs) == 1:
        copy_waited(x_refs[0].at[b, pl.ds(row0 + r * BLOCK_C, BLOCK_C), pl.ds(c * BLOCK_C, BLOCK_C)], x_stage, barrier)
        return
    diag, low = x_refs
    half = chunks // 2
    low0 = pl.multiple_of(row0 // 2, BLOCK_C)
    in_low = (r >= half) & (c < half)

    @pl.when(in_low)
    def _():
        copy_waited(
            low.at[b, pl.ds(low0 + (r - half) * BLOCK_C, BLOCK_C), pl.ds(c * BLOCK_C, BLOCK_C)], x_stage, barrier
        )

    @pl.when(jnp.logical_not(in_low))
    def _():
        rows, cols = pl.ds(row0 + r * BLOCK_C, BLOCK_C), pl.ds(lax.rem(c, half) * BLOCK_C, BLOCK_C)
        copy_waited(diag.at[b, rows, cols], x_stage, barrier)


def _body(
    starts_ref,
    *refs,
    transposed: bool,
    chunks: int,
    block_n: int,
    copies: int,
    has_result: bool,
    row_sums: bool = False,
    has_r: bool = False,
    has_racc: bool = True,
    split: bool = False,
):
    """One (BLOCK_M, block_n) tile of s_i (forward) or of lambda_i (``transposed``); see the module
    docstring. ``split``: Y_i in two buffers (``_y_parts``). refs: y_rows (or its two buffers),
    then f, racc, gamma and the ``copies`` s_b [, s_lo] (forward) or bacc,
    gamma [, r], g_hi and g_lo [, lam_b] (transposed), the float32 output where ``has_result``,
    [the row sums' partial-sum buffers (transposed) or r's buffer (forward, ``has_r``),] then the
    scratch. ``row_sums`` (transposed): the tile's partial sums of delta = rowsum(bf16(g) * r) and
    dgamma = rowsum(lambda * r) over its columns.

    The contraction's last chunk is the tile's own rows (the forward runs the chunks up to its
    own, the transposed step from the last down to its own), so after it the staged right-hand
    side and gamma are the own rows' that the result adds: s_i = f_i + gamma_i r_i with
    r_i = racc_i + Y_i rhs_i, lambda_i = w_i + Y_i^T (gamma_i w_i)."""
    x_refs, refs = (refs[:2], refs[2:]) if split else (refs[:1], refs[1:])
    if transposed:  # g's two parts, and bf16(lambda) where asked
        b_ref, g_ref, *refs = refs
        r_ref, refs = (refs[0], refs[1:]) if row_sums else (None, refs)
        copy_refs, refs = refs[:copies], refs[copies:]
        out_ref, refs = (refs[0], refs[1:]) if has_result else (None, refs)
        sum_refs, scratch = (refs[:2], refs[2:]) if row_sums else ((), refs)
        x_stage, b_stage, g_stage, x_parts, rhs_parts, out_smem, *copy_smem, bar = scratch
        copy_smem, sum_smem = (copy_smem[:-2], copy_smem[-2:]) if row_sums else (copy_smem, ())
    else:  # s_b, and s_lo where the caller keeps s's low part too
        f_ref, *refs = refs
        r_ref, g_ref, *refs = refs if has_racc else (None, *refs)
        sb_refs, refs = refs[:copies], refs[copies:]
        out_ref, refs = (refs[0], refs[1:]) if has_result else (None, refs)
        r_out_ref, scratch = (refs[0], refs[1:]) if has_r else (None, refs)
        x_stage, f_stage, r_stage, g_stage, x_parts, rhs_parts, out_smem, *copy_smem, bar = scratch
    i, j, b = lax.axis_index("rows"), lax.axis_index("cols"), lax.axis_index("batch")
    (row0,) = read_window_starts(starts_ref, BLOCK_C, 1)  # the leaf's first row
    cols = pl.ds(j * block_n, block_n)
    own = pl.ds(row0 + i * BLOCK_M, BLOCK_M)  # the program's rows of the leaf in the full-length buffers

    def gamma_rows():  # gamma of the 64 rows staged in g_stage, along the tile's columns
        return lax.broadcast_in_dim(_load(g_stage, plgpu.Layout.WGMMA.reduce(1)), (BLOCK_C, block_n), [0])

    def product(acc):
        def chunk(t, carry):
            c = chunks - 1 - t if transposed else t  # the own chunk last
            contracted = pl.ds(row0 + c * BLOCK_C, BLOCK_C)  # the leaf's rows being contracted
            # Y_i's (64, 64) block (row block, column block): (c, i) transposed, as the smem view
            # transposes it for Y_i^T, else (i, c)
            _copy_y_block(x_refs, b, row0, (c, i) if transposed else (i, c), chunks, x_stage, bar.at[0])
            if transposed:  # gamma_c * w_c
                copy_waited(b_ref.at[b, contracted, cols], b_stage, bar.at[0])
                copy_waited(g_ref.at[b, contracted], g_stage, bar.at[0])
                rhs = gamma_rows() * _load(b_stage, plgpu.Layout.WGMMA)
            else:
                copy_waited(f_ref.at[b, contracted, cols], f_stage, bar.at[0])
                copy_waited(g_ref.at[b, contracted], g_stage, bar.at[0])
                rhs = _load(f_stage, plgpu.Layout.WGMMA).astype(F32)  # f may come in bf16
                if has_racc:
                    copy_waited(r_ref.at[b, contracted, cols], r_stage, bar.at[0])
                    rhs = rhs + gamma_rows() * _load(r_stage, plgpu.Layout.WGMMA)
            _bf16x3_chunk(acc, x_stage, rhs, x_parts, rhs_parts, transposed)
            return carry

        # Y_i is strictly lower triangular: the forward's rows take the chunks up to their own,
        # the transposed step's columns the chunks from theirs on (BLOCK_M == BLOCK_C)
        lax.fori_loop(0, chunks - i if transposed else i + 1, chunk, 0)
        return acc[...]

    u = pl.run_scoped(product, plgpu.ACC((BLOCK_M, block_n), F32))
    # the stages hold the own rows' right-hand side and gamma (the last chunk's)
    if transposed:
        y = _load(b_stage, plgpu.Layout.WGMMA) + u  # lambda_i = w_i + Y_i^T (gamma_i w_i)
    else:
        r = _load(r_stage, plgpu.Layout.WGMMA) + u if has_racc else u  # r_i = racc_i + A_ii s_i
        y = _load(f_stage, plgpu.Layout.WGMMA).astype(F32) + gamma_rows() * r  # s_i = f_i + gamma_i r_i
        if has_r:
            r_stage[...] = r
    if has_result:
        out_smem[...] = y
    if transposed:  # g = gamma * lambda of the program's rows, split into g's two bf16 buffers
        parts = _split(gamma_rows() * y, True) + ((y.astype(BF16),) if len(copy_refs) == 3 else ())
        for smem, part in zip(copy_smem, parts):
            smem[...] = part
        copies = tuple((smem, ref.at[b, own, cols]) for smem, ref in zip(copy_smem, copy_refs))
        if row_sums:  # over the tile's columns, with g as the dual GEMM takes it (its bf16 hi part)
            copy_waited(r_ref.at[b, own, cols], b_stage, bar.at[0])
            r_tile = _load(b_stage, plgpu.Layout.WGMMA)
            sum_smem[0][...] = (parts[0].astype(F32) * r_tile).sum(axis=1)
            sum_smem[1][...] = (y * r_tile).sum(axis=1)
            copies += tuple((smem, ref.at[b, j, own]) for smem, ref in zip(sum_smem, sum_refs))
    else:  # bf16(s_i), and bf16(s_i - bf16(s_i)) where asked
        for smem, part in zip(copy_smem, _split(y, len(sb_refs) == 2)):
            smem[...] = part
        copies = tuple((smem, ref.at[b, own, cols]) for smem, ref in zip(copy_smem, sb_refs))
        if has_r:
            copies += ((r_stage, r_out_ref.at[b, own, cols]),)
    plgpu.commit_smem()
    if out_ref is not None:
        plgpu.copy_smem_to_gmem(out_smem, out_ref.at[b, own, cols])
    for smem, dst in copies:
        plgpu.copy_smem_to_gmem(smem, dst)
    plgpu.wait_smem_to_gmem(0)


def _check_covers(op: str, leaf: int, d: int, fix: str) -> None:
    """ValueError naming ``op``, the leaf and width and ``fix`` where ``leaf_solve_covers`` refuses them."""
    if not leaf_solve_covers(leaf, d):
        raise ValueError(
            f"{op}: leaf {leaf} and width {d} must be multiples of 64, the width up to {BLOCK_N} or a multiple "
            f"of it: {fix}"
        )


def _cost(batch: int, leaf: int, d: int, other_bytes: int) -> pl.CostEstimate:
    """A leaf kernel's declared work: three bf16 passes over the (64, 64) blocks on and below the
    diagonal of each of ``batch`` (leaf, leaf) matrices times (leaf, d), those blocks read once in
    float32, plus ``other_bytes`` per matrix (its other operands and results)."""
    blocks = lower_blocks(leaf)
    moved = batch * (blocks * BLOCK_M * BLOCK_C * 4 + other_bytes)
    return pl.CostEstimate(
        flops=3 * 2 * batch * blocks * BLOCK_M * BLOCK_C * d, transcendentals=0, bytes_accessed=moved
    )


def _y_parts(y_rows) -> tuple:
    """y_rows as the kernels' Y buffers: (y_rows,), or with y_rows a pair (diag, low)
    (``trsolve.lower_resolvent(split_top=True)`` of every leaf), (diag, low): diag (B, n Cs, Cs /
    2) holds each leaf's diagonal halves Y11 over Y22 at the leaf's rows, low (B, n Cs / 2, Cs / 2)
    its Y21 at rows [i Cs / 2, (i + 1) Cs / 2)."""
    return tuple(y_rows) if isinstance(y_rows, (tuple, list)) else (y_rows,)


def _check(op: str, y_rows, wide: dict, gamma, narrow: dict, row_start):
    """Readable errors naming ``op``, the value and the fix; ``wide``: the float32 (B, Tp, D)
    buffers by name, ``narrow``: the bf16 ones. Returns (leaf, d)."""
    parts = _y_parts(y_rows)
    first = next(iter({**wide, **narrow}.values()))
    b, tp, d = first.shape
    if len(parts) == 2:
        diag, low = parts
        leaf = 2 * diag.shape[-1]
        if leaf % (2 * BLOCK_C) or low.shape != (b, diag.shape[1] // 2, leaf // 2) or diag.shape[:2] != (b, tp):
            raise ValueError(
                f"{op}: y_rows as (diag, low) wants diag (B, Tp, Cs / 2) = ({b}, {tp}, Cs / 2) with Cs a multiple of "
                f"{2 * BLOCK_C} and low (B, Tp / 2, Cs / 2); got {diag.shape} and {low.shape}"
            )
        shapes = {"gamma": (gamma.shape, (b, tp))}
        f32 = [diag, low]
    else:
        leaf = y_rows.shape[-1]
        shapes = {"y_rows": (y_rows.shape, (b, None, leaf)), "gamma": (gamma.shape, (b, tp))}
        f32 = [y_rows]
    shapes.update({name: (x.shape, (b, tp, d)) for name, x in (*wide.items(), *narrow.items())})
    for name, (got, want) in shapes.items():
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            raise ValueError(f"{op}: {name} must have shape {want} (None: any) for {first.shape}; got {got}")
    if parts[0].shape[1] % leaf:
        raise ValueError(f"{op}: y_rows' {parts[0].shape[1]} rows must be whole leaves of {leaf}")
    f32 += [gamma, *wide.values()]
    if any(x.dtype != F32 for x in f32) or any(x.dtype != BF16 for x in narrow.values()):
        names = ", ".join(["y_rows", "gamma", *wide])
        raise ValueError(
            f"{op}: want {names} float32 and {', '.join(narrow)} bfloat16; got "
            f"{[str(x.dtype) for x in f32]}, {[str(x.dtype) for x in narrow.values()]}"
        )
    _check_covers(op, leaf, d, "use the XLA leaf step")
    if isinstance(row_start, int) and not (0 <= row_start <= tp - leaf and row_start % leaf == 0):
        raise ValueError(f"{op}: row_start {row_start} must be a leaf's first row in [0, {tp - leaf}]")
    return leaf, d


def _launch(
    inputs, in_place, result, leaf: int, d: int, row_start, *, transposed: bool, interpret, row_sums=(), r_out=None
):
    """The kernel on one leaf; ``inputs``: the operands read, Y's buffers first as one tuple
    (``_y_parts``; the forward's f in float32 or bfloat16), ``in_place``: the bf16 buffers
    written in place, ``result``: the float32 buffer whose
    leaf rows take the result, in place (the forward: or None, no float32 result); ``row_sums``
    (transposed): () or the two (B, D / Bn, Tp) float32 buffers of the row sums' partial sums,
    written in place (``inputs`` then end with r); ``r_out`` (forward): None or the float32 (B,
    Tp, D) buffer whose leaf rows take r_i, in place. Returns (result, *in_place, *row_sums[,
    r_out]) updated."""
    tail = tuple(row_sums) + (() if r_out is None else (r_out,))
    y_parts, inputs = inputs[0], inputs[1:]
    bsz = inputs[0].shape[0]
    block_n = leaf_column_block(d)
    body = functools.partial(
        _body,
        transposed=transposed,
        chunks=leaf // BLOCK_C,
        block_n=block_n,
        copies=len(in_place),
        has_result=result is not None,
        row_sums=bool(row_sums),
        has_r=r_out is not None,
        has_racc=transposed or len(inputs) == 3,
        split=len(y_parts) == 2,
    )
    body.__name__ = TRANSPOSED_KERNEL_NAME if transposed else KERNEL_NAME  # plgpu.kernel names it after its body
    wide_tile = plgpu.SMEM((BLOCK_C, block_n), F32, **_OUT_SWIZZLE)
    bf16_tile = plgpu.SMEM((BLOCK_M, block_n), BF16, **SWIZZLE)
    f_tile = bf16_tile if inputs[0].dtype == BF16 else wide_tile
    scratch = [
        plgpu.SMEM((BLOCK_C, BLOCK_M) if transposed else (BLOCK_M, BLOCK_C), F32, **_OUT_SWIZZLE),
        *([wide_tile] if transposed else [f_tile, wide_tile]),
        plgpu.SMEM((BLOCK_C,), F32),
        plgpu.SMEM((2, BLOCK_C, BLOCK_M) if transposed else (2, BLOCK_M, BLOCK_C), BF16, **SWIZZLE),
        plgpu.SMEM((2, BLOCK_C, block_n), BF16, **SWIZZLE),
        plgpu.SMEM((BLOCK_M, block_n), F32, **_OUT_SWIZZLE),
        *[bf16_tile] * len(in_place),
        *[plgpu.SMEM((BLOCK_M,), F32) for _ in row_sums],
        plgpu.Barrier(num_barriers=1),
    ]
    kwargs = dict(interpret=interpret) if interpret else {}
    if KERNEL_TAKES_COST:
        # the right-hand side's buffers (bacc; or f and racc), the result and r, by element size
        rhs_bytes = 4 if transposed else inputs[0].dtype.itemsize + 4 * (len(inputs) == 3)
        row_bytes = rhs_bytes + (4 if result is not None else 0)
        row_bytes += 4 if row_sums or r_out is not None else 0  # r, read (transposed) or written
        sums = len(row_sums) * (d // block_n) * leaf * 4
        kwargs["cost_estimate"] = _cost(
            bsz, leaf, d, row_bytes * leaf * d + len(in_place) * leaf * d * 2 + leaf * 4 + sums
        )
    refs = [jax.new_ref(x) for x in (*in_place, *([] if result is None else [result]), *tail)]
    plgpu.kernel(
        body,
        out_type=(),
        scratch_types=scratch,
        grid=(leaf // BLOCK_M, d // block_n, bsz),
        grid_names=("rows", "cols", "batch"),
        **kwargs,
    )(window_starts(row_start), *y_parts, *inputs, *refs)
    out = [jax.freeze(r) for r in refs]
    out, sums = out[: len(out) - len(tail)], out[len(out) - len(tail) :]
    return ((None, *out) if result is None else (out[-1], *out[:-1])) + tuple(sums)


def gpu_leaf_solve(y_rows, f, racc, gamma, s_b, s, row_start, *, s_lo=None, r=None, interpret=False):
    """(s, s_b), with ``s_lo`` (s, s_b, s_lo), with ``r`` also r last: the forward leaf step of
    leaf i = row_start / Cs.

    y_rows (B, n Cs, Cs) float32: Y_i = A_ii (I - diag(gamma_i) A_ii)^-1 of every leaf
    (``trsolve.lower_resolvent``), one under another, strictly lower triangular (its (64, 64)
    blocks above the diagonal are not read), or the same as the pair (diag, low) of every leaf's
    ``lower_resolvent(split_top=True)`` (``_y_parts``; Cs a multiple of 128); f (B, Tp, D)
    float32 or bfloat16 (read as it is and widened in registers: no float32 copy of a bf16 f), racc
    (B, Tp, D) float32: the right-hand side's f and pushed sums; gamma (B, Tp) float32; s_b (B, Tp, D)
    bfloat16: the leaf loop's bf16 copy of s; s (B, Tp, D) float32: the solution's buffer (a
    buffer of its own: the step reads f_i while it writes), or None: s_i is written only as its
    bf16 copies (s returned as None). ``row_start``: a Python int or traced
    int32, a multiple of Cs. With r_i = racc_i + Y_i (f_i + gamma_i racc_i), the product at bf16x3
    (both operands split hi + lo, hi hi + hi lo + lo hi with fp32 accumulation), returns s with
    rows [row_start, row_start + Cs) set to s_i = f_i + gamma_i r_i (= (I - diag(gamma_i)
    A_ii)^-1 (f_i + gamma_i racc_i)), and s_b with those rows set to bf16(s_i), both in place
    (racc None: no pushed sums, racc_i taken as 0 and not read: the first leaf's step)
    where the caller's buffers are not used afterwards. ``s_lo`` (B, Tp, D) bfloat16, optional:
    also set to bf16(s_i - bf16(s_i)) there (with s_b, ``precision.split_bf16`` of s_i: the
    backward's parts of s, written here instead of split from s in a pass of their own). ``r``
    (B, Tp, D) float32, optional: also set to r_i there (the residual racc + A s for the backward;
    a buffer of its own, not racc, which the step's other programs still read). ``interpret``:
    False or ``plgpu.InterpretGPUParams()``.
    """
    check_in_place("gpu_leaf_solve", "run the leaf step in XLA")
    if f.dtype not in (F32, BF16):
        raise ValueError(f"gpu_leaf_solve: want f float32 or bfloat16; got {f.dtype}")
    copies = (s_b,) if s_lo is None else (s_b, s_lo)
    wide, narrow = {} if racc is None else {"racc": racc}, {"s_b": s_b} if s_lo is None else {"s_b": s_b, "s_lo": s_lo}
    if s is not None:
        wide["s"] = s
    if r is not None:
        wide["r"] = r
    (wide if f.dtype == F32 else narrow)["f"] = f
    leaf, d = _check("gpu_leaf_solve", y_rows, wide, gamma, narrow, row_start)
    inputs = (_y_parts(y_rows), f, gamma) if racc is None else (_y_parts(y_rows), f, racc, gamma)
    return _launch(inputs, copies, s, leaf, d, row_start, transposed=False, interpret=interpret, r_out=r)


def gpu_leaf_solve_transposed(
    y_rows, bacc, gamma, g_hi, g_lo, lam, row_start, *, lam_b=None, row_sums=None, interpret=False
):
    """(lam, g_hi, g_lo[, lam_b][, delta_parts, dgamma_parts]): the backward leaf step of leaf i =
    row_start / Cs.

    y_rows, gamma, ``row_start`` and ``interpret`` as in ``gpu_leaf_solve``; bacc (B, Tp, D)
    float32: the backward's right-hand sides (ds plus the transposed pushes); g_hi, g_lo (B, Tp, D)
    bfloat16: the backward's g = gamma * lambda as bf16 hi + lo parts; lam (B, Tp, D) float32: the
    solution's buffer, or None: lambda_i is written only as g's parts (and as ``lam_b`` and the row
    sums, where asked; lam returned as None). Returns lam with the leaf's rows set to lambda_i =
    X_i^T bacc_i = bacc_i + Y_i^T (gamma_i bacc_i) (the product at bf16x3), and g_hi, g_lo with
    those rows set to the parts of gamma_i lambda_i (``precision.split_bf16``'s hi and lo), all in
    place where the caller's buffers are not used afterwards. ``lam_b`` (B, Tp, D) bfloat16,
    optional: also set to bf16(lambda_i) there (a bf16 f's cotangent, written here instead of cast
    from lam in a pass of its own). ``row_sums`` (r, delta_parts, dgamma_parts), optional: r (B, Tp,
    D) float32, the forward's r = A s, and two (B, D / Bn, Tp) float32 buffers (Bn =
    ``leaf_column_block(D)``) whose leaf rows are set to the partial sums over each block of Bn
    columns of delta = rowsum(g_hi * r) (g as the backward's g s^T takes it, rounded to bf16 once)
    and dgamma = rowsum(lambda * r), in place: summed over their second axis they are delta and
    dgamma of those rows.
    """
    op = "gpu_leaf_solve_transposed"
    check_in_place(op, "run the leaf step in XLA")
    narrow = {"g_hi": g_hi, "g_lo": g_lo} if lam_b is None else {"g_hi": g_hi, "g_lo": g_lo, "lam_b": lam_b}
    wide = {"bacc": bacc} if lam is None else {"bacc": bacc, "lam": lam}
    if row_sums is not None:
        wide["r"] = row_sums[0]
    leaf, d = _check(op, y_rows, wide, gamma, narrow, row_start)
    copies = tuple(narrow.values())
    inputs, sums = (_y_parts(y_rows), bacc, gamma), ()
    if row_sums is not None:
        r, *sums = row_sums
        want = (bacc.shape[0], d // leaf_column_block(d), bacc.shape[1])
        for name, x in zip(("delta_parts", "dgamma_parts"), sums):
            if x.shape != want or x.dtype != F32:
                raise ValueError(f"{op}: {name} must be float32 {want}; got {x.dtype} {x.shape}")
        inputs += (r,)
    return _launch(inputs, copies, lam, leaf, d, row_start, transposed=True, interpret=interpret, row_sums=tuple(sums))
