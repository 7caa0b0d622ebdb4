"""Pallas Mosaic GPU (Hopper, ``plgpu``) kernel that adds a tile product into a window of a
full-length float32 buffer in place: the recursive solve's accumulations racc[R] += P s[K]
(forward), bacc[K] += P^T g[R], dq[R] += dL k[K], dk[K] += dL^T q[R] (backward), without the
operand slices, the product's own float32 result and the dynamic-update-slice pass that the
same products in XLA need.

``gpu_accumulate_product(acc, a, b, ...)``: acc[:, o : o + M] += scale * op(a) @ b[:, t : t + C],
op(a) = a or its transpose; a is a whole (bf16) tile, b and acc are full-length buffers read
and written at the windows' starts o, t (static or traced, multiples of ``BLOCK_C``). Either
operand may come in bf16 parts (a tuple, e.g. the hi and lo parts of a two-pass product), whose
products the kernel sums in the same fp32 accumulator: the buffer's window is read and written
once, and the unsplit operand read once, however many parts. Grid (M / ``BLOCK_M``, N / Bn, B),
one warpgroup per (``BLOCK_M``, Bn) output tile with Bn = N up to ``BLOCK_N`` = 256, else 256;
the contraction runs in chunks of ``BLOCK_C`` = 64 (every part's chunk of a and b copied to
shared memory by TMA, single buffered, one wgmma per part into the fp32 accumulator); the
epilogue reads the accumulator's tile, adds scale times the product in fp32 registers and
writes it back. The buffer is updated in place: the kernel takes it as a ``jax.new_ref`` (an
aliased operand of the custom call), so XLA keeps one buffer where the caller's is dead
afterwards (a loop carry) and copies it otherwise. Shared memory: 64 * 64 * 2 per part of a,
64 * Bn * 2 per part of b and 64 * Bn * 4 bytes, 104 KiB at Bn = 256 and one part each, 136
KiB with b in two parts.

``gpu_add_product(acc, a, b, ...)`` is the same kernel with a new output instead of the update
in place: (acc + scale * op(a) @ b) cast to ``out_dtype``, acc read once and the narrow result
written once (the backward's last products of dq and dk with their cast to the inputs' dtype).

Needs a Hopper GPU (sm_90a); the update in place needs jax >= 0.12 (``in_place_supported``).
Verified on CPU only, in Mosaic GPU interpret mode against the XLA products, and lowered for
"cuda". Never run on a GPU; its speed is unknown.
Used by ``kernels="gpu_gemm"`` in the "bfloat16" tier (``recursive``).
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

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
ADD_KERNEL_NAME = "sessa_add_product_gpu"  # gpu_add_product: a new, cast output
ADD_TRANSPOSED_KERNEL_NAME = "sessa_add_product_t_gpu"
_OUT_SWIZZLE = dict(transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
# plgpu.kernel lowers a jax.new_ref operand (read and written in place) from jax 0.12 on; jax 0.10
# fails to lower it ("JaxprInputEffect ... does not have a corresponding jaxpr input").
_MIN_JAX = (0, 12)
# plgpu.kernel takes a cost_estimate on newer JAX only (not on jax 0.10)
KERNEL_TAKES_COST = "cost_estimate" in inspect.signature(plgpu.kernel).parameters


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
    "ADD_KERNEL_NAME",
    "ADD_TRANSPOSED_KERNEL_NAME",
    "BLOCK_C",
    "KERNEL_NAME",
    "KERNEL_TAKES_COST",
    "TRANSPOSED_KERNEL_NAME",
    "accumulate_cost",
    "accumulate_covers",
    "add_into_tile",
    "check_in_place",
    "gpu_accumulate_product",
    "gpu_add_product",
    "in_place_supported",
    "lower_blocks",
]


def column_block(n: int) -> int:
    """Output columns per program: all of them up to ``BLOCK_N``, else ``BLOCK_N``."""
    return n if n <= BLOCK_N else BLOCK_N


def accumulate_covers(n: int) -> bool:
    """Whether the kernel takes buffers of width ``n``: a multiple of 64 up to ``BLOCK_N``, or a
    multiple of ``BLOCK_N``."""
    return n > 0 and n % 64 == 0 and n % column_block(n) == 0


def _as_parts(x) -> tuple:
    """An operand as a tuple of its parts: a tuple or list as given, one array as a 1-tuple."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _check(op: str, acc, a_parts: tuple, b_parts: tuple, transpose_a: bool, acc_start, b_start):
    """(M, C) of the product; readable errors naming the function ``op``, the value and the fix."""
    if not a_parts or not b_parts or (len(a_parts) > 1 and len(b_parts) > 1):
        raise ValueError(
            f"{op}: a and b are each one array or a tuple of parts, at most one of them in parts; got "
            f"{len(a_parts)} part(s) of a and {len(b_parts)} of b: add the other products in a second call"
        )
    a, b = a_parts[0], b_parts[0]
    for name, parts in (("a", a_parts), ("b", b_parts)):
        if any(part.shape != parts[0].shape or part.dtype != parts[0].dtype for part in parts):
            shapes = [f"{part.dtype}{list(part.shape)}" for part in parts]
            raise ValueError(f"{op}: the parts of {name} must share one shape and dtype; got {shapes}")
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


class _Fresh(NamedTuple):
    """Where the kernel writes the product alone, its accumulator's tiles not read (rows no earlier
    product reached, in a buffer left unfilled): ``rows``, (start, stop) ranges of the window's rows
    (multiples of ``BLOCK_M``), in every batch row; ``batches``, (period, indices): the batch rows b
    with b % period in indices (leaves of ``gpu_add_product``'s by-leaf batch), all their rows."""

    rows: tuple = ()
    batches: tuple = ()
    m: int = 0  # the window's rows

    @property
    def everywhere(self) -> bool:
        return any(lo <= 0 and hi >= self.m for lo, hi in self.rows)

    def __bool__(self) -> bool:
        return bool(self.rows or self.batches)

    def holds(self, i, b):
        """Inside the kernel: whether row block i of batch row b is fresh (a traced bool)."""
        found = jnp.bool_(False)
        for lo, hi in self.rows:
            found = found | ((i >= lo // BLOCK_M) & (i < hi // BLOCK_M))
        if self.batches:
            period, indices = self.batches
            for k in indices:
                found = found | (b % period == k)
        return found

    def share(self, batch: int) -> float:
        """The share of the output's tiles that are fresh, over ``batch`` batch rows."""
        if self.everywhere:
            return 1.0
        rows = sum(min(hi, self.m) - max(lo, 0) for lo, hi in self.rows) / self.m if self.m else 0.0
        if not self.batches:
            return rows
        period, indices = self.batches
        in_batches = sum(1 for x in range(batch) if x % period in indices) / batch
        return rows + (1 - rows) * in_batches


def _body(starts_ref, *refs, a_parts, b_parts, transpose_a, a_lower, chunks, block_n, scale, out_dtype, fresh):
    """One (BLOCK_M, block_n) tile of acc's window: the products of every part over ``chunks``
    contraction chunks (with ``a_lower`` only those where a's block is on or below its
    diagonal) in one fp32 accumulator, then acc + scale * their sum through shared
    memory, written back into acc (``out_dtype`` None) or cast to ``out_dtype`` into the output;
    in the tiles that ``fresh`` (``_Fresh``) names scale * the sum alone, acc's tile not read.
    refs: a's ``a_parts`` parts, b's ``b_parts`` parts, acc, the output (with ``out_dtype``), then
    the scratch."""
    a_refs, b_refs = refs[:a_parts], refs[a_parts : a_parts + b_parts]
    refs = refs[a_parts + b_parts :]
    if out_dtype is None:
        acc_ref, a_smem, b_smem, acc_smem, bar = refs
    else:
        acc_ref, out_ref, a_smem, b_smem, acc_smem, out_smem, bar = refs
    i, j, b = lax.axis_index("rows"), lax.axis_index("cols"), lax.axis_index("batch")
    acc0, b0 = read_window_starts(starts_ref, BLOCK_C, 2)
    cols = pl.ds(j * block_n, block_n)
    pairs = [(p, 0) for p in range(a_parts)] if a_parts > 1 else [(0, p) for p in range(b_parts)]

    def product(acc):
        def chunk(c, carry):
            contracted, own = pl.ds(c * BLOCK_C, BLOCK_C), pl.ds(i * BLOCK_M, BLOCK_M)
            for p, ref in enumerate(a_refs):  # a (C, M) with transpose_a: its chunk of C rows, the program's M columns
                copy_waited(
                    ref.at[b, contracted, own] if transpose_a else ref.at[b, own, contracted], a_smem.at[p], bar.at[0]
                )
            for p, ref in enumerate(b_refs):
                copy_waited(ref.at[b, pl.ds(b0 + c * BLOCK_C, BLOCK_C), cols], b_smem.at[p], bar.at[0])
            for pa, pb in pairs:
                plgpu.wgmma(acc, a_smem.at[pa].transpose((1, 0)) if transpose_a else a_smem.at[pa], b_smem.at[pb])
            plgpu.wgmma_wait(0)  # the next chunk's copies overwrite the operands
            return carry

        if a_lower:  # rows of a take the chunks up to their own; columns of a (a^T's rows) from theirs on
            lax.fori_loop(i if transpose_a else 0, chunks if transpose_a else i + 1, chunk, 0)
        else:
            lax.fori_loop(0, chunks, chunk, 0)
        return acc[...]

    prod = pl.run_scoped(product, plgpu.ACC((BLOCK_M, block_n), F32))
    rows = pl.ds(acc0 + i * BLOCK_M, BLOCK_M)

    def write(value, smem, dst):
        smem[...] = value
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem, dst)
        plgpu.wait_smem_to_gmem(0)

    def product_alone():
        if out_dtype is None:
            write(prod * scale, acc_smem, acc_ref.at[b, rows, cols])
        else:
            write((prod * scale).astype(out_dtype), out_smem, out_ref.at[b, rows, cols])

    def added():
        if out_dtype is None:
            add_into_tile(acc_ref.at[b, rows, cols], acc_smem, bar.at[0], prod * scale)  # acc + product * scale
            return
        copy_waited(acc_ref.at[b, rows, cols], acc_smem, bar.at[0])
        write(
            (_load(acc_smem, plgpu.Layout.WGMMA) + prod * scale).astype(out_dtype), out_smem, out_ref.at[b, rows, cols]
        )

    if fresh.everywhere:
        product_alone()
    elif not fresh:
        added()
    else:  # the tile's rows decide (uniform over the program)
        alone = fresh.holds(i, b)
        pl.when(alone)(product_alone)
        pl.when(jnp.logical_not(alone))(added)


def accumulate_cost(
    b: int,
    m: int,
    c: int,
    n: int,
    a_parts: int,
    b_parts: int,
    out_bytes: int = 4,
    a_lower: bool = False,
    fresh: float = 0.0,
) -> pl.CostEstimate:
    """The kernel's work, declared to the compiler (and read back by ``benchmarks/gpu_compile.py``,
    which cannot see the windows): 2 B M C N FLOPs per part; bytes: every part of the a tile and
    of b's C-row window read once, acc's M-row window read once and written once in place, or
    written to a new output of ``out_bytes`` per element (a lower bound: each column tile rereads
    a). ``a_lower`` (M = C): only a's (64, 64) blocks on and below the diagonal, m (m + 1) / 2 of
    m^2 with m = M / 64, are read and multiplied. ``fresh``: the share of acc's window that is
    written without being read (``_Fresh.share``; 1 for ``overwrite=True``)."""
    parts = max(a_parts, b_parts)
    a_area = lower_blocks(m) * BLOCK_M * BLOCK_C if a_lower else m * c
    moved = b * (a_parts * a_area * 2 + b_parts * c * n * 2 + m * n * out_bytes) + round(b * m * n * 4 * (1 - fresh))
    return pl.CostEstimate(flops=2 * b * a_area * n * parts, transcendentals=0, bytes_accessed=moved)


def lower_blocks(m: int) -> int:
    """(64, 64) blocks on and below the diagonal of an (m, m) matrix, m a multiple of 64."""
    k = m // BLOCK_C
    return k * (k + 1) // 2


def _launch(
    acc,
    a_parts,
    b_parts,
    starts,
    m: int,
    c: int,
    *,
    transpose_a,
    scale,
    out_dtype,
    name,
    interpret,
    a_lower=False,
    fresh=_Fresh(),
):
    """The kernel on acc's window of M rows, contracted over C; see ``gpu_accumulate_product`` and
    ``gpu_add_product``; ``fresh``: a ``_Fresh``. Returns acc updated in place (``out_dtype`` None)
    or the new output."""
    bsz, _, n = acc.shape
    block_n = column_block(n)
    body = functools.partial(
        _body,
        a_parts=len(a_parts),
        b_parts=len(b_parts),
        transpose_a=transpose_a,
        a_lower=a_lower,
        chunks=c // BLOCK_C,
        block_n=block_n,
        scale=float(scale),
        out_dtype=out_dtype,
        fresh=fresh,
    )
    body.__name__ = name  # plgpu.kernel names the kernel after its body
    a_tile = (BLOCK_C, BLOCK_M) if transpose_a else (BLOCK_M, BLOCK_C)
    out_swizzle = _OUT_SWIZZLE if out_dtype is not None and jnp.dtype(out_dtype).itemsize == 4 else SWIZZLE
    out_smem = [] if out_dtype is None else [plgpu.SMEM((BLOCK_M, block_n), out_dtype, **out_swizzle)]
    scratch = [
        plgpu.SMEM((len(a_parts), *a_tile), BF16, **SWIZZLE),
        plgpu.SMEM((len(b_parts), BLOCK_C, block_n), BF16, **SWIZZLE),
        plgpu.SMEM((BLOCK_M, block_n), F32, **_OUT_SWIZZLE),
        *out_smem,
        plgpu.Barrier(num_barriers=1),
    ]
    kwargs = dict(interpret=interpret) if interpret else {}
    if KERNEL_TAKES_COST:
        out_bytes = 4 if out_dtype is None else jnp.dtype(out_dtype).itemsize
        kwargs["cost_estimate"] = accumulate_cost(
            bsz, m, c, n, len(a_parts), len(b_parts), out_bytes, a_lower, fresh.share(bsz)
        )
    call = functools.partial(
        plgpu.kernel,
        body,
        scratch_types=scratch,
        grid=(m // BLOCK_M, n // block_n, bsz),
        grid_names=("rows", "cols", "batch"),
        **kwargs,
    )
    if out_dtype is not None:
        return call(out_type=jax.ShapeDtypeStruct(acc.shape, out_dtype))(starts, *a_parts, *b_parts, acc)
    acc_ref = jax.new_ref(acc)
    call(out_type=())(starts, *a_parts, *b_parts, acc_ref)
    return jax.freeze(acc_ref)


def gpu_accumulate_product(
    acc, a, b, *, acc_start=0, b_start=0, transpose_a: bool = False, scale=1.0, overwrite=False, interpret=False
):
    """acc with rows [acc_start, acc_start + M) increased by scale * op(a) @ b[:, b_start : b_start + C].

    acc (B, T, N) float32; a (B, M, C) bf16, or (B, C, M) with ``transpose_a`` (op(a) = a^T); b
    (B, S, N) bf16; M, C multiples of ``BLOCK_C`` = 64; N a multiple of 64 up to 256 or of 256
    (``accumulate_covers``). Either a or b (not both) may be a tuple of parts of that shape
    and dtype: the product is then the sum of one bf16 pass per part, op(a_p) @ b or op(a) @ b_p,
    accumulated in one fp32 accumulator. ``acc_start``, ``b_start``: Python ints or traced int32
    scalars, multiples of 64 with the windows inside acc and b (checked where static). The
    product takes one bf16 pass per part with fp32 accumulation, and is multiplied by ``scale``
    (a Python float) before it is added, as ``acc + (a @ b) * scale`` in XLA. Returns the updated
    acc (B, T, N) float32, written in place where the caller's acc is not used afterwards.
    ``overwrite``: True, the window's rows set to scale * op(a) @ b instead, acc's values there not
    read (the first product into rows of a buffer left unfilled); or a tuple of (start, stop) row
    ranges relative to the window (multiples of 64) where that holds, the rest added to.
    ``interpret``: False (compile for the GPU) or ``plgpu.InterpretGPUParams()`` (Mosaic GPU
    interpret mode, jax >= 0.11).
    """
    check_in_place("gpu_accumulate_product", "add the product in XLA")
    a_parts, b_parts = _as_parts(a), _as_parts(b)
    m, c = _check("gpu_accumulate_product", acc, a_parts, b_parts, transpose_a, acc_start, b_start)
    fresh = _fresh_rows("gpu_accumulate_product", overwrite, m)
    name = TRANSPOSED_KERNEL_NAME if transpose_a else KERNEL_NAME
    starts = window_starts(acc_start, b_start)
    return _launch(
        acc,
        a_parts,
        b_parts,
        starts,
        m,
        c,
        transpose_a=transpose_a,
        scale=scale,
        out_dtype=None,
        name=name,
        interpret=interpret,
        fresh=fresh,
    )


def _fresh_rows(op: str, overwrite, m: int) -> _Fresh:
    """``overwrite`` (a bool, or (start, stop) row ranges of the M-row window) as a ``_Fresh``;
    readable errors naming ``op``, the value and the fix."""
    if isinstance(overwrite, bool):
        return _Fresh(rows=((0, m),) if overwrite else (), m=m)
    ranges = tuple(tuple(r) if isinstance(r, (tuple, list)) else (r,) for r in overwrite)
    for r in ranges:
        if len(r) != 2 or not all(isinstance(x, int) and x % BLOCK_M == 0 for x in r) or not 0 <= r[0] < r[1] <= m:
            raise ValueError(
                f"{op}: overwrite's row ranges must be (start, stop) Python ints, multiples of {BLOCK_M} with "
                f"0 <= start < stop <= {m} (the window's rows); got {overwrite}"
            )
    return _Fresh(rows=ranges, m=m)


def gpu_add_product(
    acc,
    a,
    b,
    *,
    transpose_a: bool = False,
    a_lower: bool = False,
    scale=1.0,
    out_dtype=BF16,
    fresh_batches=None,
    interpret=False,
):
    """(acc + scale * op(a) @ b) cast to ``out_dtype``, a new array: the last product of a
    float32 accumulation and its cast in one pass (the buffer read once, the narrow result
    written once).

    acc (B, M, N) float32; a (B, M, C) bf16, or (B, C, M) with ``transpose_a``; b (B, C, N) bf16,
    or a tuple of parts as in ``gpu_accumulate_product``; M, C multiples of ``BLOCK_C`` = 64; N
    as there. One bf16 pass per part, fp32 accumulation, the sum added as
    ``(acc + (a @ b) * scale).astype(out_dtype)`` in XLA. ``a_lower``: a is square (M = C) and
    lower triangular in (64, 64) blocks, as a causal tile is: its blocks above the diagonal are
    taken as zeros, not read. ``fresh_batches``: None, or (period, indices): the batch rows b with
    b % period in indices take (scale * op(a) @ b) alone, their acc not read (rows of a buffer that
    no earlier product reached, e.g. a leaf's rows in a by-leaf batch). Returns (B, M, N)
    ``out_dtype``. ``interpret`` as in ``gpu_accumulate_product``.
    """
    a_parts, b_parts = _as_parts(a), _as_parts(b)
    m, c = _check("gpu_add_product", acc, a_parts, b_parts, transpose_a, 0, 0)
    if acc.shape[1] != m or b_parts[0].shape[1] != c:
        raise ValueError(
            f"gpu_add_product: want acc (B, M, N) and b (B, C, N) for op(a) (B, M, C) = (B, {m}, {c}); got acc "
            f"{acc.shape}, b {b_parts[0].shape}: use gpu_accumulate_product to add into a window of a longer buffer"
        )
    if a_lower and m != c:
        raise ValueError(f"gpu_add_product: a_lower needs a square a; got op(a) of (M, C) = ({m}, {c})")
    if fresh_batches is not None:
        period, indices = fresh_batches
        if not (
            isinstance(period, int) and period > 0 and all(isinstance(k, int) and 0 <= k < period for k in indices)
        ):
            raise ValueError(
                f"gpu_add_product: fresh_batches must be (period, indices), a positive int and ints in [0, period); "
                f"got {fresh_batches}"
            )
        indices = tuple(sorted(set(indices)))
        fresh_batches = (period, indices) if indices else None
    name = ADD_TRANSPOSED_KERNEL_NAME if transpose_a else ADD_KERNEL_NAME
    return _launch(
        acc,
        a_parts,
        b_parts,
        window_starts(0, 0),
        m,
        c,
        transpose_a=transpose_a,
        scale=scale,
        out_dtype=jnp.dtype(out_dtype),
        name=name,
        interpret=interpret,
        a_lower=a_lower,
        fresh=_Fresh(batches=fresh_batches or (), m=m),
    )
