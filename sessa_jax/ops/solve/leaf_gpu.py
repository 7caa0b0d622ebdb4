"""Pallas Mosaic GPU (Hopper, ``plgpu``) kernel for the recursive solve's forward leaf step: the
leaf solve s_i = X_i (f_i + gamma_i * racc_i) at bf16x3, reading X_i, f_i, racc_i and gamma_i in
place from the full-length buffers and writing s_i's bf16 copy in place, where XLA copies X_i
and the right-hand side out of their buffers, runs the product, and writes the copy in a pass
of its own.

``gpu_leaf_solve(x_inv, f, racc, gamma, s_b, row_start)``: x_inv (B, n Cs, Cs) float32 holds the
leaves' X_i one under another (rows [i Cs, (i + 1) Cs) are X_i), f, racc (B, Tp, D) float32 and
gamma (B, Tp) float32 are read at rows [o, o + Cs) with o = ``row_start`` = i Cs (traced); the
kernel returns s_i (B, Cs, D) float32 and writes bf16(s_i) into rows [o, o + Cs) of s_b (B, Tp,
D) bf16 in place (a ``jax.new_ref``). s_i is a new array, not written over f: other programs of
the same step still read f_i. Grid (Cs / 64, D / Bn, B), one warpgroup per (64, Bn) tile of
s_i, Bn = min(D, 128); the contraction over the leaf's Cs rows runs in chunks of 64: X_i's
(64, 64) chunk and the right-hand side's (64, Bn) chunk (f and racc, combined with gamma in fp32
registers) come in float32 by TMA, are split into bf16 hi + lo in registers and stored to
shared memory, and three wgmmas (hi hi + hi lo + lo hi) accumulate in fp32: the bf16x3 products
of ``precision.leaf_dot``'s explicit split. Shared memory about 176 KiB at Bn = 128.

Needs a Hopper GPU (sm_90a) and jax >= 0.12 (the in-place copy, ``accumulate_gpu.in_place_supported``);
verified on CPU only, in Mosaic GPU interpret mode against the XLA leaf step, and lowered for
"cuda". Never run on a GPU; its speed is unknown. Used by ``kernels="gpu_gemm"`` in the
"bfloat16" tier (``recursive``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sessa_jax.ops.solve.accumulate_gpu import _OUT_SWIZZLE, KERNEL_TAKES_COST, check_in_place
from sessa_jax.ops.solve.row_stats_gpu import SWIZZLE, _load, copy_waited, read_window_starts, window_starts

F32 = jnp.float32
BF16 = jnp.bfloat16
BLOCK_M = 64  # rows of s_i per warpgroup
BLOCK_N = 128  # most columns per program (the float32 staging tiles bound it)
BLOCK_C = 64  # contraction chunk (rows of the leaf)
KERNEL_NAME = "sessa_leaf_solve_gpu"

__all__ = ["KERNEL_NAME", "gpu_leaf_solve", "leaf_solve_covers"]


def _block_n(d: int) -> int:
    return d if d <= BLOCK_N else BLOCK_N


def leaf_solve_covers(leaf: int, d: int) -> bool:
    """Whether the kernel takes a leaf of ``leaf`` rows and width ``d``: both multiples of 64, and d
    up to ``BLOCK_N`` or a multiple of it."""
    return leaf > 0 and leaf % BLOCK_C == 0 and d > 0 and d % 64 == 0 and d % _block_n(d) == 0


def _split(x):
    """bf16 hi + lo parts of a float32 register value: hi = bf16(x), lo = bf16(x - hi)."""
    hi = x.astype(BF16)
    return hi, (x - hi.astype(F32)).astype(BF16)


def _body(starts_ref, x_ref, f_ref, r_ref, g_ref, sb_ref, out_ref, *scratch, chunks: int, block_n: int):
    """One (BLOCK_M, block_n) tile of s_i; see the module docstring."""
    x_stage, f_stage, r_stage, g_stage, x_parts, rhs_parts, out_smem, sb_smem, bar = scratch
    i, j, b = lax.axis_index("rows"), lax.axis_index("cols"), lax.axis_index("batch")
    (row0,) = read_window_starts(starts_ref, BLOCK_C)
    cols = pl.ds(j * block_n, block_n)
    own = pl.ds(row0 + i * BLOCK_M, BLOCK_M)  # the program's rows of X_i (x_inv's rows) and of s_i
    shape = (BLOCK_C, block_n)

    def product(acc):
        def chunk(c, carry):
            contracted = pl.ds(row0 + c * BLOCK_C, BLOCK_C)  # the leaf's rows of f, racc, gamma
            copy_waited(x_ref.at[b, own, pl.ds(c * BLOCK_C, BLOCK_C)], x_stage, bar.at[0])
            copy_waited(f_ref.at[b, contracted, cols], f_stage, bar.at[0])
            copy_waited(r_ref.at[b, contracted, cols], r_stage, bar.at[0])
            copy_waited(g_ref.at[b, contracted], g_stage, bar.at[0])
            gamma = lax.broadcast_in_dim(_load(g_stage, plgpu.Layout.WGMMA.reduce(1)), shape, [0])
            rhs = _load(f_stage, plgpu.Layout.WGMMA) + gamma * _load(r_stage, plgpu.Layout.WGMMA)
            for p, part in enumerate(_split(_load(x_stage, plgpu.Layout.WGMMA))):
                x_parts[p] = part
            for p, part in enumerate(_split(rhs)):
                rhs_parts[p] = part
            plgpu.commit_smem()
            for px, pr in ((0, 0), (0, 1), (1, 0)):  # hi hi + hi lo + lo hi
                plgpu.wgmma(acc, x_parts.at[px], rhs_parts.at[pr])
            plgpu.wgmma_wait(0)  # the next chunk overwrites the operands
            return carry

        lax.fori_loop(0, chunks, chunk, 0)
        return acc[...]

    s = pl.run_scoped(product, plgpu.ACC((BLOCK_M, block_n), F32))
    out_smem[...] = s
    sb_smem[...] = s.astype(BF16)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_ref.at[b, pl.ds(i * BLOCK_M, BLOCK_M), cols])
    plgpu.copy_smem_to_gmem(sb_smem, sb_ref.at[b, own, cols])
    plgpu.wait_smem_to_gmem(0)


def _check(x_inv, f, racc, gamma, s_b, leaf: int, row_start):
    op = "gpu_leaf_solve"
    b, tp, d = f.shape
    want = {"x_inv": (b, None, leaf), "racc": (b, tp, d), "s_b": (b, tp, d), "gamma": (b, tp)}
    got = {"x_inv": x_inv.shape, "racc": racc.shape, "s_b": s_b.shape, "gamma": gamma.shape}
    for name, shape in want.items():
        if len(got[name]) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got[name])):
            raise ValueError(f"{op}: {name} must have shape {shape} (None: any) for f {f.shape}; got {got[name]}")
    if x_inv.shape[1] % leaf:
        raise ValueError(f"{op}: x_inv's rows {x_inv.shape[1]} must be whole leaves of {leaf}")
    dtypes = (x_inv.dtype, f.dtype, racc.dtype, gamma.dtype, s_b.dtype)
    if dtypes != (F32, F32, F32, F32, BF16):
        raise ValueError(f"{op}: want x_inv, f, racc, gamma float32 and s_b bfloat16; got {dtypes}")
    if not leaf_solve_covers(leaf, d):
        raise ValueError(
            f"{op}: leaf {leaf} and width {d} must be multiples of 64, the width up to {BLOCK_N} or a multiple of it: "
            "use the XLA leaf step"
        )
    if isinstance(row_start, int) and not (0 <= row_start <= tp - leaf and row_start % leaf == 0):
        raise ValueError(f"{op}: row_start {row_start} must be a leaf's first row in [0, {tp - leaf}]")


def gpu_leaf_solve(x_inv, f, racc, gamma, s_b, row_start, *, interpret=False):
    """(s_i, s_b): the forward leaf step of leaf i = row_start / Cs.

    x_inv (B, n Cs, Cs) float32: X_i = (I - diag(gamma_i) A_ii)^-1 of every leaf, one under
    another; f, racc (B, Tp, D) float32: the right-hand side's f and pushed sums; gamma (B, Tp)
    float32; s_b (B, Tp, D) bfloat16: the leaf loop's bf16 copy of s. ``row_start``: a Python int
    or traced int32, a multiple of Cs. Returns s_i = X_i (f_i + gamma_i racc_i) (B, Cs, D) float32
    at bf16x3 (both operands split hi + lo, hi hi + hi lo + lo hi with fp32 accumulation), and
    s_b with rows [row_start, row_start + Cs) set to bf16(s_i), in place where the caller's s_b
    is not used afterwards. ``interpret``: False or ``plgpu.InterpretGPUParams()``.
    """
    check_in_place("gpu_leaf_solve", "run the leaf step in XLA")
    leaf = x_inv.shape[-1]
    _check(x_inv, f, racc, gamma, s_b, leaf, row_start)
    bsz, _, d = f.shape
    block_n = _block_n(d)
    body = functools.partial(_body, chunks=leaf // BLOCK_C, block_n=block_n)
    body.__name__ = KERNEL_NAME  # plgpu.kernel names the kernel after its body
    scratch = [
        plgpu.SMEM((BLOCK_M, BLOCK_C), F32, **_OUT_SWIZZLE),
        plgpu.SMEM((BLOCK_C, block_n), F32, **_OUT_SWIZZLE),
        plgpu.SMEM((BLOCK_C, block_n), F32, **_OUT_SWIZZLE),
        plgpu.SMEM((BLOCK_C,), F32),
        plgpu.SMEM((2, BLOCK_M, BLOCK_C), BF16, **SWIZZLE),
        plgpu.SMEM((2, BLOCK_C, block_n), BF16, **SWIZZLE),
        plgpu.SMEM((BLOCK_M, block_n), F32, **_OUT_SWIZZLE),
        plgpu.SMEM((BLOCK_M, block_n), BF16, **SWIZZLE),
        plgpu.Barrier(num_barriers=1),
    ]
    kwargs = dict(interpret=interpret) if interpret else {}
    if KERNEL_TAKES_COST:
        moved = bsz * (leaf * leaf * 4 + 3 * leaf * d * 4 + leaf * d * 2 + leaf * 4)
        kwargs["cost_estimate"] = pl.CostEstimate(
            flops=3 * 2 * bsz * leaf * leaf * d, transcendentals=0, bytes_accessed=moved
        )
    sb_ref = jax.new_ref(s_b)
    s_i = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((bsz, leaf, d), F32),
        scratch_types=scratch,
        grid=(leaf // BLOCK_M, d // block_n, bsz),
        grid_names=("rows", "cols", "batch"),
        **kwargs,
    )(window_starts(row_start), x_inv, f, racc, gamma, sb_ref)
    return s_i, jax.freeze(sb_ref)
