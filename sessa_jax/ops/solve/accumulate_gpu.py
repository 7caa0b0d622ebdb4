"""Pallas Mosaic GPU (Hopper, ``plgpu``) kernel that adds a tile product into a window of a
full-length float32 buffer in place: the recursive solve's accumulations racc[R] += P s[K]
(forward), bacc[K] += P^T g[R], dq[R] += dL k[K], dk[K] += dL^T q[R] (backward), without the
operand slices, the product's own float32 result and the dynamic-update-slice pass that the
same products in XLA need.

``gpu_accumulate_product(acc, a, b, ...)``: acc[:, o : o + M] += scale * op(a) @ b[:, t : t + C],
op(a) = a or its transpose; a is a whole (bf16) tile, b and acc are full-length buffers read
and written at the windows' starts o, t (static or traced, multiples of ``BLOCK_C``). Grid (M /
``BLOCK_M``, N / Bn, B), one warpgroup per (``BLOCK_M``, Bn) output tile with Bn = N up to
``BLOCK_N`` = 256, else 256; the contraction runs in chunks of ``BLOCK_C`` = 64 (a's and b's
chunks copied to shared memory by TMA, single buffered, one wgmma each into an fp32
accumulator); the epilogue reads the accumulator's tile, adds scale times the product in fp32
registers and writes it back. The buffer is updated in place: the kernel takes it as a
``jax.new_ref`` (an aliased operand of the custom call), so XLA keeps one buffer where the
caller's is dead afterwards (a loop carry) and copies it otherwise. Shared memory: 64 * 64 * 2
+ 64 * Bn * 2 + 64 * Bn * 4 bytes, 104 KiB at Bn = 256.

Needs a Hopper GPU (sm_90a) and jax >= 0.12 (``in_place_supported``); verified on CPU only, in
Mosaic GPU interpret mode against the XLA product, and lowered for "cuda". Never run on a GPU;
its speed is unknown.
Used by ``kernels="gpu_gemm"`` in the "bfloat16" tier (``recursive``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sessa_jax.ops.solve.row_stats_gpu import (
    BLOCK_D,
    SWIZZLE,
    _load,
    copy_waited,
    read_window_starts,
    window_starts,
)

F32 = jnp.float32
BF16 = jnp.bfloat16
BLOCK_M = 64  # output rows per warpgroup (the wgmma M granule)
BLOCK_N = 256  # most output columns per program: a (64, 256) fp32 accumulator is 128 registers a thread
BLOCK_C = BLOCK_D  # contraction chunk: one 128-byte swizzled row of bf16
KERNEL_NAME = "sessa_accumulate_product_gpu"
TRANSPOSED_KERNEL_NAME = "sessa_accumulate_product_t_gpu"  # op(a) = a^T
_OUT_SWIZZLE = dict(transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
# plgpu.kernel lowers a jax.new_ref operand (read and written in place) from jax 0.12 on; jax 0.10
# fails to lower it ("JaxprInputEffect ... does not have a corresponding jaxpr input").
_MIN_JAX = (0, 12)


def in_place_supported() -> bool:
    """Whether this JAX lowers the kernel (a ``jax.new_ref`` operand of ``plgpu.kernel``: jax >= 0.12)."""
    return tuple(int(x) for x in jax.__version__.split(".")[:2]) >= _MIN_JAX


def check_in_place(op: str, fallback: str) -> None:
    """Raises ValueError naming ``op``, this JAX and the way out (``fallback``) unless this JAX lowers
    a kernel that updates a buffer in place (``in_place_supported``)."""
    if not in_place_supported():
        raise ValueError(
            f"{op} needs jax >= {'.'.join(map(str, _MIN_JAX))} (a jax.new_ref operand of a Mosaic GPU kernel); "
            f"jax {jax.__version__} cannot lower it: upgrade jax, or {fallback}"
        )


def add_into_tile(ref_tile, tile_smem, barrier, value) -> None:
    """Inside a kernel: ref_tile += value in place, the tile brought in by TMA through ``tile_smem``
    (float32, WGMMA layout), added in fp32 registers as ``tile + value`` (the XLA path's order) and
    written back."""
    copy_waited(ref_tile, tile_smem, barrier)
    tile_smem[...] = _load(tile_smem, plgpu.Layout.WGMMA) + value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(tile_smem, ref_tile)
    plgpu.wait_smem_to_gmem(0)


__all__ = [
    "BLOCK_C",
    "KERNEL_NAME",
    "TRANSPOSED_KERNEL_NAME",
    "accumulate_covers",
    "add_into_tile",
    "check_in_place",
    "gpu_accumulate_product",
    "in_place_supported",
]


def column_block(n: int) -> int:
    """Output columns per program: all of them up to ``BLOCK_N``, else ``BLOCK_N``."""
    return n if n <= BLOCK_N else BLOCK_N


def accumulate_covers(n: int) -> bool:
    """Whether the kernel takes buffers of width ``n``: a multiple of 64 up to ``BLOCK_N``, or a
    multiple of ``BLOCK_N``."""
    return n > 0 and n % 64 == 0 and n % column_block(n) == 0


def _check(acc, a, b, transpose_a: bool, acc_start, b_start):
    """(M, C) of the product; readable errors naming the value and the fix."""
    op = "gpu_accumulate_product"
    if acc.ndim != 3 or a.ndim != 3 or b.ndim != 3 or not acc.shape[0] == a.shape[0] == b.shape[0]:
        raise ValueError(
            f"{op}: want acc (B, T, N), a (B, M, C) or (B, C, M), b (B, S, N); got {acc.shape}, {a.shape}, {b.shape}"
        )
    if acc.dtype != F32 or a.dtype != BF16 or b.dtype != BF16:
        raise ValueError(
            f"{op}: acc must be float32 and a, b bfloat16 (one bf16 pass, fp32 accumulation); got "
            f"{acc.dtype}, {a.dtype}, {b.dtype}: cast them, or use the XLA product"
        )
    c, m = a.shape[1:] if transpose_a else a.shape[:0:-1]
    n = acc.shape[2]
    if b.shape[2] != n:
        raise ValueError(f"{op}: b's width {b.shape[2]} must equal acc's {n}")
    if not accumulate_covers(n):
        raise ValueError(
            f"{op}: width N={n} must be a multiple of 64 up to {BLOCK_N}, or a multiple of {BLOCK_N}: "
            "pad the buffers, or use the XLA product"
        )
    for name, size in (("M", m), ("C", c)):
        if size % BLOCK_C:
            raise ValueError(f"{op}: {name}={size} must be a multiple of {BLOCK_C} (the kernel's blocks)")
    for name, start, size, full in (("acc", acc_start, m, acc.shape[1]), ("b", b_start, c, b.shape[1])):
        if isinstance(start, int) and not (0 <= start <= full - size and start % BLOCK_C == 0):
            raise ValueError(
                f"{op}: the window [{start}, {start + size}) of {name} must lie inside its {full} rows and start "
                f"at a multiple of {BLOCK_C}: pass {name}_start in [0, {full - size}], a multiple of {BLOCK_C}"
            )
    return m, c


def _body(starts_ref, a_ref, b_ref, acc_ref, a_smem, b_smem, out_smem, bar, *, transpose_a, chunks, block_n, scale):
    """One (BLOCK_M, block_n) tile of acc's window: the product over ``chunks`` contraction chunks,
    then acc += scale * product through shared memory."""
    i, j, b = lax.axis_index("rows"), lax.axis_index("cols"), lax.axis_index("batch")
    acc0, b0 = read_window_starts(starts_ref, BLOCK_C)
    cols = pl.ds(j * block_n, block_n)

    def product(acc):
        def chunk(c, carry):
            if transpose_a:  # a (C, M): its chunk of C rows, the program's M columns
                copy_waited(a_ref.at[b, pl.ds(c * BLOCK_C, BLOCK_C), pl.ds(i * BLOCK_M, BLOCK_M)], a_smem, bar.at[0])
            else:
                copy_waited(a_ref.at[b, pl.ds(i * BLOCK_M, BLOCK_M), pl.ds(c * BLOCK_C, BLOCK_C)], a_smem, bar.at[0])
            copy_waited(b_ref.at[b, pl.ds(b0 + c * BLOCK_C, BLOCK_C), cols], b_smem, bar.at[0])
            plgpu.wgmma(acc, a_smem.transpose((1, 0)) if transpose_a else a_smem, b_smem)
            plgpu.wgmma_wait(0)  # the next chunk's copies overwrite the operands
            return carry

        lax.fori_loop(0, chunks, chunk, 0)
        return acc[...]

    prod = pl.run_scoped(product, plgpu.ACC((BLOCK_M, block_n), F32))
    rows = pl.ds(acc0 + i * BLOCK_M, BLOCK_M)
    add_into_tile(acc_ref.at[b, rows, cols], out_smem, bar.at[0], prod * scale)  # acc + product * scale


def gpu_accumulate_product(acc, a, b, *, acc_start=0, b_start=0, transpose_a: bool = False, scale=1.0, interpret=False):
    """acc with rows [acc_start, acc_start + M) increased by scale * op(a) @ b[:, b_start : b_start + C].

    acc (B, T, N) float32; a (B, M, C) bf16, or (B, C, M) with ``transpose_a`` (op(a) = a^T); b
    (B, S, N) bf16; M, C multiples of ``BLOCK_C`` = 64; N a multiple of 64 up to 256 or of 256
    (``accumulate_covers``). ``acc_start``, ``b_start``: Python ints or traced int32 scalars,
    multiples of 64 with the windows inside acc and b (checked where static). The product takes
    one bf16 pass with fp32 accumulation, and is multiplied by ``scale`` (a Python float) before
    it is added, as ``acc + (a @ b) * scale`` in XLA. Returns the updated acc (B, T, N) float32,
    written in place where the caller's acc is not used afterwards. ``interpret``: False (compile
    for the GPU) or ``plgpu.InterpretGPUParams()`` (Mosaic GPU interpret mode, jax >= 0.11).
    """
    check_in_place("gpu_accumulate_product", "add the product in XLA")
    m, c = _check(acc, a, b, transpose_a, acc_start, b_start)
    bsz, _, n = acc.shape
    block_n = column_block(n)
    body = functools.partial(_body, transpose_a=transpose_a, chunks=c // BLOCK_C, block_n=block_n, scale=float(scale))
    body.__name__ = TRANSPOSED_KERNEL_NAME if transpose_a else KERNEL_NAME  # plgpu.kernel names it after its body
    scratch = [
        plgpu.SMEM((BLOCK_C, BLOCK_M) if transpose_a else (BLOCK_M, BLOCK_C), BF16, **SWIZZLE),
        plgpu.SMEM((BLOCK_C, block_n), BF16, **SWIZZLE),
        plgpu.SMEM((BLOCK_M, block_n), F32, **_OUT_SWIZZLE),
        plgpu.Barrier(num_barriers=1),
    ]
    kwargs = dict(interpret=interpret) if interpret else {}
    acc_ref = jax.new_ref(acc)
    plgpu.kernel(
        body,
        out_type=(),
        scratch_types=scratch,
        grid=(m // BLOCK_M, n // block_n, bsz),
        grid_names=("rows", "cols", "batch"),
        **kwargs,
    )(window_starts(acc_start, b_start), a, b, acc_ref)
    return jax.freeze(acc_ref)
