"""Pallas Mosaic GPU (Hopper, ``plgpu``) GEMM-with-epilogue kernels of the recursive solve's
pushed blocks: the P tiles of A, made from their logits with the known row statistics and
written in bf16, so that no float32 P tile and no separate elementwise pass over it reach HBM,
and the forward push fused whole, so that no P tile reaches HBM at all. The products that use
the written tiles (P s at wide Dv, P^T g, dL k, dL^T q) stay in XLA (cuBLAS).

* ``gpu_block_probs`` (twin: ``block_product.block_probs``): forward. P = exp((scale q k^T - m)
  - logl), masked where segment ids differ (and, ``causal``, where key >= row), written as
  bf16 hi (and, ``split``, lo = bf16(P - hi)) tiles: the pushes take P s with P's low part
  (three passes in the bf16x3 tier, two in the bfloat16 tier, whose s is rounded once).
* ``gpu_block_product`` (twin: ``block_product.split_block_product``): the forward push
  A[rows, keys] s[keys] fused, like a flash-attention forward with known statistics: grid (P/Bq,
  Dv/Bv, B), the key blocks looped inside; per key block the logits (wgmma over D chunks), P in
  fp32 registers, its bf16 hi + lo parts through shared memory, and P_hi s_hi + P_hi s_lo +
  P_lo s_hi (s given split) into one fp32 (Bq, Bv) accumulator, or, s given as one bf16 part
  (the bfloat16 tier), P_hi s + P_lo s in two wgmmas; the float32 (B, P, Dv) result is written once.
  Bv = Dv up to ``BLOCK_V`` = 256, else 256-column tiles that each recompute the logits; the
  solve takes it up to ``FUSED_MAX_DV`` = 512 (``product_fused``).
* ``gpu_block_probs_and_grad`` (twin: ``block_product.block_probs_and_grad``): backward, a dual
  GEMM on the same tile: q k^T (P recomputed with the known statistics) and g s^T, whose
  epilogue forms dL = P * (g s^T - delta) with delta = rowsum(g * r) given per row; writes P
  (hi, and lo with ``split``: the bf16x3 tier's P^T g needs it) and dL in bf16 (the dq, dk
  products take dL in one bf16 pass at the tiers these kernels serve).

Layout of the P-tile kernels: ``plgpu.kernel`` with grid (P/Bq, K/Bk, B), one warpgroup per
(Bq, Bk) tile. The D contraction runs in chunks of ``BLOCK_D`` = 64 columns (one 128-byte
swizzled row of bf16): each chunk of every operand is copied into shared memory by TMA (single
buffered, no warp specialisation), then ``plgpu.wgmma`` accumulates into fp32 (Bq, Bk)
accumulators (two in the backward, issued on the same chunk; the fused product does the same
per key block). The epilogue runs in fp32 registers (WGMMA layout); row
vectors (m, logl, delta, segment ids) come through shared memory; the bf16 tiles go back
through swizzled shared memory by TMA.

Operands are bf16: q, k bf16 (the logits then take one exact pass at every tier) or q, k cast
to bf16 at tier "bfloat16" (which takes its logits in one pass); g is g as the solve rounds it
once (``precision.difference_dot``) and s comes split hi + lo (two wgmmas). Accumulation is
fp32, as in the twins. D must be a multiple of 64 (any size: the contraction is streamed);
P and K multiples of the blocks (multiples of 64). Shared memory, forward: (Bq + Bk) * 64 * 2
bytes of operands plus (1 or 2) * Bq * Bk * 2 of output; backward: (2 Bq + 3 Bk) * 64 * 2 plus
(2 or 3) * Bq * Bk * 2; at the default Bq = 64, Bk = 128: 24 + 32 KiB and 64 + 48 KiB. The
fused product: 160 KiB at its default Bq = Bk = 64 and Bv = 256 (``gpu_block_product``).

Needs a Hopper GPU (sm_90a: wgmma and TMA); ROCm is not supported. Verified on CPU only: in
Mosaic GPU interpret mode (``plgpu.InterpretGPUParams()``, jax >= 0.11) against the XLA twins,
lowered for the "cuda" platform, and compiled for an H100 without a device (the deviceless
compile of ``benchmarks/gpu_compile.py --kernels gpu_gemm``). Never run on a GPU; its
performance is unknown.
Opt-in via ``kernels="gpu_gemm"`` of the recursive solve.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sessa_jax.ops.solve.accumulate_gpu import _OUT_SWIZZLE, KERNEL_TAKES_COST, add_into_tile, check_in_place
from sessa_jax.ops.solve.row_stats_gpu import (
    BLOCK_D,
    SWIZZLE,
    _load,
    chunked_logits,
    copy_waited,
    interpret_params,
    read_window_starts,
    window_starts,
)

F32 = jnp.float32
BF16 = jnp.bfloat16
BLOCK_Q, BLOCK_K = 64, 128  # default tile: rows per warpgroup (wgmma M granule) x keys
PRODUCT_BLOCK_K = 64  # keys per step of the fused product: its P and s tiles share the shared memory
SMEM_BYTES = 227 * 1024  # an H100 block's shared memory (opt-in maximum)
BLOCK_V = 256  # most columns of s (Dv) per program: the (BLOCK_Q, BLOCK_V) fp32 accumulator is 128 registers a thread
FWD_KERNEL_NAME = "sessa_block_probs_gpu"
BWD_KERNEL_NAME = "sessa_block_probs_grad_gpu"
PRODUCT_KERNEL_NAME = "sessa_block_product_gpu"
PRODUCT_BF16_KERNEL_NAME = "sessa_block_product_bf16_gpu"  # s given rounded once: two passes
FUSED_MAX_DV = 2 * BLOCK_V  # widest s the solve's forward pushes take fused (``product_fused``)
PANEL_ALIGN = 64  # the P-tile kernels' panels start at multiples of this (a wgmma M granule)


__all__ = [
    "BLOCK_D",
    "BLOCK_Q",
    "BLOCK_K",
    "BLOCK_V",
    "FUSED_MAX_DV",
    "check_solve_support",
    "gpu_block_product",
    "gpu_block_probs",
    "gpu_block_probs_and_grad",
    "interpret_params",
    "product_covers",
    "product_fused",
]


def check_solve_support(width: int, tier: str, input_dtype, platform: str) -> None:
    """Raises ValueError unless the recursive solve can run its pushes with these kernels
    (``kernels="gpu_gemm"``): ``width`` D a multiple of ``BLOCK_D``; ``tier`` "bf16x3" or
    "bfloat16" with the logits in one bf16 pass (``input_dtype`` of q_b, k_b bf16, or tier
    "bfloat16"), since the kernels multiply bf16 operands; off the GPU, a JAX with the Mosaic GPU
    interpret mode."""
    if width % BLOCK_D:
        raise ValueError(
            f"feedback kernels 'gpu_gemm' need the head width D a multiple of {BLOCK_D}; got D={width}: "
            "use kernels='xla'"
        )
    if tier not in ("bf16x3", "bfloat16"):
        raise ValueError(
            f"feedback kernels 'gpu_gemm' run the tiers 'bf16x3' and 'bfloat16' (bf16 P tiles); got "
            f"precision {tier!r}: pass precision='bfloat16' or 'bf16x3', or use kernels='xla'"
        )
    if tier == "bf16x3" and jnp.dtype(input_dtype) != BF16:
        raise ValueError(
            "feedback kernels 'gpu_gemm' at precision 'bf16x3' need bf16 q_b and k_b (their logits are "
            f"one exact bf16 pass; float32 ones take six); got {jnp.dtype(input_dtype)}: cast them to "
            "bf16, use precision='bfloat16', or kernels='xla'"
        )
    if platform != "gpu" and interpret_params() is None:
        raise ValueError(
            f"feedback kernels 'gpu_gemm' off the GPU run in Mosaic GPU interpret mode, which jax "
            f"{jax.__version__} lacks (jax >= 0.11): upgrade jax, or use kernels='xla'"
        )


def _check(op: str, q, seg_q, k, seg_k, block_q: int, block_k: int, rows_extra=(), keys_extra=(), panel=None):
    """Shapes, dtypes and block sizes of either kernel (readable errors: value, cause, fix);
    ``panel``: the (rows, keys) sizes the blocks tile (default: all of q's rows and k's keys)."""
    if q.ndim != 3 or k.ndim != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: want q (B, P, D) and k (B, K, D); got q {q.shape}, k {k.shape}")
    b, p, d = q.shape
    kk = k.shape[1]
    for name, x in (("q", q), ("k", k), *rows_extra, *keys_extra):
        if x.dtype != BF16:
            raise ValueError(
                f"{op}: {name} must be bfloat16 (the kernels multiply bf16 operands with fp32 "
                f"accumulation); got {x.dtype}: cast it, or split float32 values with "
                "precision.split_bf16"
            )
    for name, x in rows_extra:
        if x.shape != (b, p, d):
            raise ValueError(f"{op}: {name} must have q's shape {(b, p, d)}; got {x.shape}")
    for name, x in keys_extra:
        if x.shape != (b, kk, d):
            raise ValueError(f"{op}: {name} must have k's shape {(b, kk, d)}; got {x.shape}")
    if (seg_q is None) != (seg_k is None):
        raise ValueError(f"{op}: give both seg_q and seg_k, or neither (no segment mask)")
    if seg_q is not None and (seg_q.shape != (b, p) or seg_k.shape != (b, kk)):
        raise ValueError(
            f"{op}: want seg_q (B, P) = {(b, p)} and seg_k (B, K) = {(b, kk)}; got {seg_q.shape}, {seg_k.shape}"
        )
    for name, blk, n in (
        ("block_q", block_q, p if panel is None else panel[0]),
        ("block_k", block_k, kk if panel is None else panel[1]),
    ):
        if blk <= 0 or blk % 64 or blk > 256:
            raise ValueError(f"{op}: {name}={blk} must be a multiple of 64 up to 256 (wgmma tiles)")
        if n % blk:
            raise ValueError(
                f"{op}: {'P' if name == 'block_q' else 'K'}={n} must be a multiple of {name}={blk}; "
                f"pick a smaller block or pad to a multiple of it"
            )
    if d % BLOCK_D:
        raise ValueError(
            f"{op}: D={d} must be a multiple of {BLOCK_D} (the kernels contract D in chunks of "
            f"{BLOCK_D}); use kernels='xla' for this D"
        )


def _row_vector(smem):
    """A (Bq,) shared-memory row vector in the WGMMA row layout."""
    return _load(smem, plgpu.Layout.WGMMA.reduce(1))


def _probs(logits, m_smem, l_smem, seg_smem, *, scale: float, causal: bool, shape, r0, k0):
    """P = exp((scale logits - m) - logl), masked, in fp32 registers (the twins' order of operations)."""
    row = functools.partial(lax.broadcast_in_dim, shape=shape, broadcast_dimensions=[0])
    z = (logits * scale - row(_row_vector(m_smem))) - row(_row_vector(l_smem))
    probs = jnp.exp(z)
    allowed = None
    if seg_smem is not None:
        qseg_smem, kseg_smem = seg_smem
        kseg = lax.broadcast_in_dim(_load(kseg_smem, plgpu.Layout.WGMMA.reduce(0)), shape, [1])
        allowed = row(_row_vector(qseg_smem)) == kseg
    if causal:
        row_ids = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + r0
        key_ids = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + k0
        below = key_ids < row_ids
        allowed = below if allowed is None else allowed & below
    return probs if allowed is None else jnp.where(allowed, probs, 0.0)


def _panel_blocks(starts_ref, r0, block_q: int, k0, block_k: int):
    """(rows, keys) index slices of this program's block in the full-length inputs: the panel's
    first row and key, read from ``starts_ref`` (``window_starts(row_start, key_start)``, multiples
    of ``PANEL_ALIGN``), plus the block's offsets r0, k0 within the panel."""
    row0, key0 = read_window_starts(starts_ref, PANEL_ALIGN, 2)
    return pl.ds(row0 + r0, block_q), pl.ds(key0 + k0, block_k)


def _panel(op: str, full_rows: int, full_keys: int, rows, keys, row_start, key_start) -> tuple[int, int]:
    """The panel's (rows, keys) sizes, None meaning all of them; statically known starts are
    checked against the inputs' lengths (traced ones are the caller's to keep in range)."""
    rows = full_rows if rows is None else rows
    keys = full_keys if keys is None else keys
    for name, start, size, full in (("row", row_start, rows, full_rows), ("key", key_start, keys, full_keys)):
        if isinstance(start, int) and not (0 <= start <= full - size and start % PANEL_ALIGN == 0):
            raise ValueError(
                f"{op}: the panel's {name}s [{start}, {start + size}) must lie inside the inputs' {full} {name}s "
                f"and start at a multiple of {PANEL_ALIGN}: pass {name}_start in [0, {full - size}], a multiple of "
                f"{PANEL_ALIGN}"
            )
    return rows, keys


def _write(tiles, out_smem, out_refs, dst):
    """bf16 tiles out through shared memory, TMA to ``dst`` (an index into each output)."""
    for i, tile in enumerate(tiles):
        out_smem[i] = tile
    plgpu.commit_smem()
    for i, ref in enumerate(out_refs):
        plgpu.copy_smem_to_gmem(out_smem.at[i], ref.at[dst])
    plgpu.wait_smem_to_gmem(0)


def _split(probs, split: bool):
    """(hi,) or (hi, lo) bf16 parts of fp32 probs: hi = bf16(P), lo = bf16(P - hi)."""
    hi = probs.astype(BF16)
    return (hi, (probs - hi.astype(F32)).astype(BF16)) if split else (hi,)


def _fwd_body(
    *refs, masked: bool, split: bool, wide: bool, causal: bool, block_q: int, block_k: int, chunks: int, scale: float
):
    """Forward kernel body (one (Bq, Bk) tile of one batch row); see the module docstring.
    ``wide``: P written in float32 (one output) instead of bf16 parts."""
    starts_ref, q_ref, k_ref, m_ref, l_ref, *refs = refs
    seg_refs, refs = (refs[:2], refs[2:]) if masked else (None, refs)
    nout = 2 if split else 1
    out_refs, refs = refs[:nout], refs[nout:]
    a_smem, b_smem, m_smem, l_smem, *refs = refs
    seg_smem, refs = (refs[:2], refs[2:]) if masked else (None, refs)
    out_smem, bar = refs
    i, j, b = lax.axis_index("rows"), lax.axis_index("keys"), lax.axis_index("batch")
    r0, k0 = i * block_q, j * block_k
    rows, keys = _panel_blocks(starts_ref, r0, block_q, k0, block_k)
    shape = (block_q, block_k)

    copy_waited(m_ref.at[b, rows], m_smem, bar.at[0])
    copy_waited(l_ref.at[b, rows], l_smem, bar.at[0])
    if masked:
        copy_waited(seg_refs[0].at[b, rows], seg_smem[0], bar.at[0])
        copy_waited(seg_refs[1].at[b, keys], seg_smem[1], bar.at[0])

    trips = _causal_trips(causal, chunks, r0, k0, block_q)
    acc = chunked_logits([q_ref.at[b, rows]], [k_ref.at[b, keys]], a_smem, b_smem, bar, trips, shape)
    probs = _probs(acc, m_smem, l_smem, seg_smem, scale=scale, causal=causal, shape=shape, r0=r0, k0=k0)
    tiles = (probs,) if wide else _split(probs, split)
    _write(tiles, out_smem, out_refs, (b, pl.ds(r0, block_q), pl.ds(k0, block_k)))


def _causal_trips(causal: bool, chunks: int, r0, k0, block_q: int):
    """The D chunks a tile's logits take: all of them, or with ``causal`` none where no key of the
    tile comes before any of its rows (the mask zeroes that whole tile)."""
    return jnp.where(k0 < r0 + block_q - 1, chunks, 0) if causal else chunks


def _bwd_body(
    *refs,
    masked: bool,
    split: bool,
    causal: bool,
    block_q: int,
    block_k: int,
    chunks: int,
    scale: float,
    delta_parts: int,
):
    """Backward kernel body (one (Bq, Bk) tile of one batch row): the dual GEMM and dL's epilogue.
    ``delta_parts``: 0 where delta comes whole (B, P), else how many partial sums (B, n, P) add up
    to it, summed here in order."""
    starts_ref, q_ref, k_ref, g_ref, s_hi_ref, s_lo_ref, m_ref, l_ref, delta_ref, *refs = refs
    seg_refs, refs = (refs[:2], refs[2:]) if masked else (None, refs)
    nout = 3 if split else 2
    out_refs, refs = refs[:nout], refs[nout:]
    a_smem, b_smem, m_smem, l_smem, delta_smem, *refs = refs
    seg_smem, refs = (refs[:2], refs[2:]) if masked else (None, refs)
    out_smem, bar = refs
    i, j, b = lax.axis_index("rows"), lax.axis_index("keys"), lax.axis_index("batch")
    r0, k0 = i * block_q, j * block_k
    rows, keys = _panel_blocks(starts_ref, r0, block_q, k0, block_k)
    shape = (block_q, block_k)

    copy_waited(m_ref.at[b, rows], m_smem, bar.at[0])
    copy_waited(l_ref.at[b, rows], l_smem, bar.at[0])
    copy_waited(delta_ref.at[b, :, rows] if delta_parts else delta_ref.at[b, rows], delta_smem, bar.at[0])
    if masked:
        copy_waited(seg_refs[0].at[b, rows], seg_smem[0], bar.at[0])
        copy_waited(seg_refs[1].at[b, keys], seg_smem[1], bar.at[0])

    def products(acc_l, acc_g):
        def chunk(c, carry):
            cols = pl.ds(c * BLOCK_D, BLOCK_D)
            for p, ref in enumerate((q_ref, g_ref)):
                copy_waited(ref.at[b, rows, cols], a_smem.at[p], bar.at[0])
            for p, ref in enumerate((k_ref, s_hi_ref, s_lo_ref)):
                copy_waited(ref.at[b, keys, cols], b_smem.at[p], bar.at[0])
            kt = lambda p: b_smem.at[p].transpose((1, 0))  # noqa: E731
            plgpu.wgmma(acc_l, a_smem.at[0], kt(0))  # q k^T
            plgpu.wgmma(acc_g, a_smem.at[1], kt(1))  # g s_hi^T
            plgpu.wgmma(acc_g, a_smem.at[1], kt(2))  # + g s_lo^T
            plgpu.wgmma_wait(0)
            return carry

        lax.fori_loop(0, _causal_trips(causal, chunks, r0, k0, block_q), chunk, 0)
        return acc_l[...], acc_g[...]

    logits, g_dot_s = pl.run_scoped(products, plgpu.ACC(shape, F32), plgpu.ACC(shape, F32))
    probs = _probs(logits, m_smem, l_smem, seg_smem, scale=scale, causal=causal, shape=shape, r0=r0, k0=k0)
    if delta_parts:
        row_delta = _row_vector(delta_smem.at[0])
        for part in range(1, delta_parts):
            row_delta = row_delta + _row_vector(delta_smem.at[part])
    else:
        row_delta = _row_vector(delta_smem)
    delta = lax.broadcast_in_dim(row_delta, shape, [0])
    dlogits = probs * (g_dot_s - delta)
    _write(
        (*_split(probs, split), dlogits.astype(BF16)), out_smem, out_refs, (b, pl.ds(r0, block_q), pl.ds(k0, block_k))
    )


def _call(
    body,
    name: str,
    inputs,
    outputs: int,
    out_shape,
    scratch,
    grid,
    interpret,
    dtype=BF16,
    grid_names=("rows", "keys", "batch"),
    cost=None,
):
    """``outputs`` arrays of ``out_shape`` and ``dtype`` from the kernel ``body`` on ``grid`` (``grid_names``);
    ``cost``: a ``pl.CostEstimate`` for the compiler, where this JAX's ``plgpu.kernel`` takes one."""
    body.__name__ = name  # plgpu.kernel names the kernel after its body
    kwargs = dict(interpret=interpret) if interpret else {}
    if cost is not None and KERNEL_TAKES_COST:
        kwargs["cost_estimate"] = cost
    call = plgpu.kernel(
        body,
        out_type=[jax.ShapeDtypeStruct(out_shape, dtype)] * outputs,
        scratch_types=scratch,
        grid=grid,
        grid_names=grid_names,
        **kwargs,
    )
    return tuple(call(*inputs))


def _row_scratch(masked: bool, block_q: int, block_k: int, vectors: int):
    rows = [plgpu.SMEM((block_q,), F32) for _ in range(vectors)]
    segs = [plgpu.SMEM((block_q,), jnp.int32), plgpu.SMEM((block_k,), jnp.int32)] if masked else []
    return rows + segs


def gpu_block_probs(
    q,
    seg_q,
    m,
    logl,
    k,
    seg_k,
    *,
    scale: float,
    split: bool = True,
    causal: bool = False,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    interpret=False,
    rows: int | None = None,
    keys: int | None = None,
    row_start=0,
    key_start=0,
    out_dtype=BF16,
):
    """P tiles of a (rows, keys) panel of A in bf16 (Mosaic GPU): (hi,) or, ``split``, (hi, lo).

    q (B, P, D), k (B, K, D): bf16, D a multiple of 64; m, logl (B, P) float32: the rows' known
    statistics; seg_q (B, P), seg_k (B, K): integer segment ids, or both None (no segment mask).
    Arguments in the order of the twin ``block_product.block_probs``.
    P = exp((scale q k^T - m) - logl), zero where the segment ids differ and, with ``causal``,
    where key index >= row index (a diagonal panel). Returns bf16 (B, P, K) arrays: hi = bf16(P)
    and, with ``split``, lo = bf16(P - hi), so hi + lo is P to ~2^-16. P, K multiples of
    ``block_q``, ``block_k`` (multiples of 64 up to 256). ``interpret``: False (compile for the
    GPU) or ``plgpu.InterpretGPUParams()`` (Mosaic GPU interpret mode, jax >= 0.11).

    ``rows``, ``keys``, ``row_start``, ``key_start``: the panel as a window of longer inputs, read
    in place (no slice is copied out): rows [row_start, row_start + rows) of q, m, logl and seg_q,
    keys [key_start, key_start + keys) of k and seg_k; then P = rows, K = keys in the above and
    ``causal`` compares indices within the panel. The starts are multiples of ``PANEL_ALIGN`` = 64
    and may be traced int32 scalars (a loop's offsets), which must keep the window inside the
    inputs (checked where they are Python ints); sizes None: all rows / keys (start 0).

    ``out_dtype`` float32 (``split`` False): P itself, (P,) in float32 (the diagonal leaves' A_ii,
    which the leaves take at bf16x3). With ``causal`` a tile with no key before any of its rows
    skips its logits (it is zeros either way), and the kernel declares the work it does.
    """
    p, kk = _panel("gpu_block_probs", q.shape[1], k.shape[1], rows, keys, row_start, key_start)
    _check("gpu_block_probs", q, seg_q, k, seg_k, block_q, block_k, panel=(p, kk))
    wide = jnp.dtype(out_dtype) == F32
    if wide and split or jnp.dtype(out_dtype) not in (F32, BF16):
        raise ValueError(
            f"gpu_block_probs: out_dtype {jnp.dtype(out_dtype)} with split={split}: want bfloat16 parts, or float32 "
            "with split=False"
        )
    b, _, d = q.shape
    masked = seg_q is not None
    nout = 2 if split else 1
    dtype = F32 if wide else BF16
    scratch = [
        plgpu.SMEM((1, block_q, BLOCK_D), BF16, **SWIZZLE),
        plgpu.SMEM((1, block_k, BLOCK_D), BF16, **SWIZZLE),
        *_row_scratch(masked, block_q, block_k, 2),
        plgpu.SMEM((nout, block_q, block_k), dtype, **(_OUT_SWIZZLE if wide else SWIZZLE)),
        plgpu.Barrier(num_barriers=1),
    ]
    body = functools.partial(
        _fwd_body,
        masked=masked,
        split=split,
        wide=wide,
        causal=causal,
        block_q=block_q,
        block_k=block_k,
        chunks=d // BLOCK_D,
        scale=float(scale),
    )
    segs = (seg_q.astype(jnp.int32), seg_k.astype(jnp.int32)) if masked else ()
    inputs = (window_starts(row_start, key_start), q, k, m.astype(F32), logl.astype(F32), *segs)
    cost = None
    if causal:  # the skipped tiles' logits are not computed: say so to the compiler (and the report)
        moved = b * ((p + kk) * d * 2 + (2 * p + masked * (p + kk)) * 4 + nout * p * kk * jnp.dtype(dtype).itemsize)
        flops = 2 * b * causal_tiles(p, kk, block_q, block_k) * block_q * block_k * d
        cost = pl.CostEstimate(flops=flops, transcendentals=b * p * kk, bytes_accessed=moved)
    grid = (p // block_q, kk // block_k, b)
    return _call(body, FWD_KERNEL_NAME, inputs, nout, (b, p, kk), scratch, grid, interpret, dtype, cost=cost)


def gpu_block_probs_and_grad(
    q,
    seg_q,
    m,
    logl,
    k,
    seg_k,
    g,
    s_hi,
    s_lo,
    delta,
    *,
    scale: float,
    split: bool = False,
    causal: bool = False,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    interpret=False,
    rows: int | None = None,
    keys: int | None = None,
    row_start=0,
    key_start=0,
):
    """(P parts, dL) of a (rows, keys) panel in bf16 (Mosaic GPU): the backward's dual GEMM.

    q, m, logl, seg_q, seg_k, ``causal``, blocks and ``interpret`` as in ``gpu_block_probs``;
    g (B, P, D) bf16: the rows' g as the solve uses it (rounded once); s_hi, s_lo (B, K, D)
    bf16: the keys' s split hi + lo (``precision.split_bf16``); delta (B, P) float32:
    rowsum(g * r) of the same g, or (B, n, P) float32: n partial sums of it (over column blocks
    of g and r), added in order in the kernel. Returns ((hi,) or, ``split``, (hi, lo), dL): bf16 (B, P, K)
    tiles of P and of dL = P * (g s_hi^T + g s_lo^T - delta), all in fp32 before the cast; with
    ``causal``, tiles with no key before any of their rows skip the products (their P and dL
    are zeros either way).
    ``rows``, ``keys``, ``row_start``, ``key_start``: a window of longer inputs, as in
    ``gpu_block_probs`` (g and delta are rows, s_hi and s_lo keys).
    """
    p, kk = _panel("gpu_block_probs_and_grad", q.shape[1], k.shape[1], rows, keys, row_start, key_start)
    _check(
        "gpu_block_probs_and_grad",
        q,
        seg_q,
        k,
        seg_k,
        block_q,
        block_k,
        rows_extra=(("g", g),),
        keys_extra=(("s_hi", s_hi), ("s_lo", s_lo)),
        panel=(p, kk),
    )
    b, _, d = q.shape
    masked = seg_q is not None
    nout = 3 if split else 2
    parts = delta.shape[1] if delta.ndim == 3 else 0
    want = (b, parts, q.shape[1]) if parts else (b, q.shape[1])
    if delta.shape != want:
        raise ValueError(
            f"gpu_block_probs_and_grad: delta must be (B, P) = {(b, q.shape[1])} or partial sums (B, n, P); "
            f"got {delta.shape}"
        )
    row_scratch = _row_scratch(masked, block_q, block_k, 3)
    if parts:  # delta's partial sums, one row vector each
        row_scratch[2] = plgpu.SMEM((parts, block_q), F32)
    scratch = [
        plgpu.SMEM((2, block_q, BLOCK_D), BF16, **SWIZZLE),
        plgpu.SMEM((3, block_k, BLOCK_D), BF16, **SWIZZLE),
        *row_scratch,
        plgpu.SMEM((nout, block_q, block_k), BF16, **SWIZZLE),
        plgpu.Barrier(num_barriers=1),
    ]
    body = functools.partial(
        _bwd_body,
        masked=masked,
        split=split,
        causal=causal,
        block_q=block_q,
        block_k=block_k,
        chunks=d // BLOCK_D,
        scale=float(scale),
        delta_parts=parts,
    )
    segs = (seg_q.astype(jnp.int32), seg_k.astype(jnp.int32)) if masked else ()
    inputs = (
        window_starts(row_start, key_start),
        *(q, k, g, s_hi, s_lo, m.astype(F32), logl.astype(F32), delta.astype(F32), *segs),
    )
    # the skipped tiles' products are not done: say so to the compiler (and the compile report)
    cost = causal_grad_cost(b, p, kk, d, nout, masked, block_q, block_k, max(parts, 1)) if causal else None
    *parts, dlogits = _call(
        body,
        BWD_KERNEL_NAME,
        inputs,
        nout,
        (b, p, kk),
        scratch,
        (p // block_q, kk // block_k, b),
        interpret,
        cost=cost,
    )
    return tuple(parts), dlogits


def causal_grad_cost(
    b: int,
    p: int,
    kk: int,
    d: int,
    nout: int,
    masked: bool,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    delta_parts: int = 1,
) -> pl.CostEstimate:
    """What ``gpu_block_probs_and_grad`` with ``causal`` does on a (B, P, K) panel of width D with
    ``nout`` bf16 outputs: three bf16 passes (q k^T, g s_hi^T, g s_lo^T) on the ``causal_tiles``
    only; it reads q and g (P rows), k, s_hi, s_lo (K keys), m, logl, delta (``delta_parts``
    partial sums of it; and the segment ids) once each and writes the outputs."""
    moved = b * ((2 * p + 3 * kk) * d * 2 + ((2 + delta_parts) * p + masked * (p + kk)) * 4 + nout * p * kk * 2)
    flops = 3 * 2 * b * causal_tiles(p, kk, block_q, block_k) * block_q * block_k * d
    return pl.CostEstimate(flops=flops, transcendentals=b * p * kk, bytes_accessed=moved)


def causal_tiles(rows: int, keys: int, block_q: int, block_k: int) -> int:
    """(block_q, block_k) tiles of a (rows, keys) causal panel with a key before one of its rows
    (key < row, both counted from the panel's start): the tiles the causal kernels compute."""
    return sum(
        sum(1 for j in range(keys // block_k) if j * block_k < (i + 1) * block_q - 1) for i in range(rows // block_q)
    )


def product_covers(dv: int) -> bool:
    """Whether ``gpu_block_product`` takes s of width ``dv``: a multiple of 64 up to ``BLOCK_V``, or
    a multiple of ``BLOCK_V``."""
    return dv > 0 and dv % 64 == 0 and dv % value_block(dv) == 0


def product_fused(dv: int) -> bool:
    """Whether the solve's forward pushes (``kernels="gpu_gemm"``) take ``gpu_block_product`` at s
    width ``dv``: where the kernel covers it with at most ``FUSED_MAX_DV`` / ``BLOCK_V`` = 2 Dv
    tiles, i.e. computes the logits at most twice. The deviceless H100 compile rates the fused
    push faster than ``gpu_block_probs`` + cuBLAS at D = Dv = 256 and 512 and slower at 1024
    (four logits passes; docs/kernels.md), so wider pushes keep the P tiles."""
    return product_covers(dv) and dv <= FUSED_MAX_DV


def value_block(dv: int) -> int:
    """Columns of s (Dv) per program of ``gpu_block_product``: all of them up to ``BLOCK_V``, else
    ``BLOCK_V`` (each program then recomputes its row block's logits: Dv / BLOCK_V logits passes)."""
    return dv if dv <= BLOCK_V else BLOCK_V


def _product_body(
    *refs,
    masked: bool,
    split: bool,
    accumulate: bool,
    block_q: int,
    block_k: int,
    block_v: int,
    chunks: int,
    key_blocks: int,
    scale: float,
):
    """Fused forward push (one (Bq, Bv) output tile of one batch row): the loop over key blocks,
    each a logits GEMM over D chunks, the P epilogue and its hi + lo split in fp32 registers, the
    parts stored to shared memory, and three wgmmas (two without ``split``: s given as one part) into
    the fp32 (Bq, Bv) accumulator (a zero-initialised ``plgpu.ACC`` that lives across the loop),
    written out, or, ``accumulate``, added to the output buffer's tile in place; see
    ``gpu_block_product``."""
    starts_ref, *refs = refs
    q_ref, k_ref, *s_refs = refs[:4] if split else refs[:3]
    m_ref, l_ref, *refs = refs[len(s_refs) + 2 :]
    seg_refs, refs = (refs[:2], refs[2:]) if masked else (None, refs)
    out_ref, a_smem, b_smem, p_smem, v_smem, m_smem, l_smem, *refs = refs
    seg_smem, refs = (refs[:2], refs[2:]) if masked else (None, refs)
    out_smem, bar = refs
    i, j, b = lax.axis_index("rows"), lax.axis_index("values"), lax.axis_index("batch")
    r0 = i * block_q
    rows, _ = _panel_blocks(starts_ref, r0, block_q, 0, block_k)  # of the inputs; the output is the panel's
    values = pl.ds(j * block_v, block_v)
    shape = (block_q, block_k)

    copy_waited(m_ref.at[b, rows], m_smem, bar.at[0])
    copy_waited(l_ref.at[b, rows], l_smem, bar.at[0])
    if masked:
        copy_waited(seg_refs[0].at[b, rows], seg_smem[0], bar.at[0])

    def key_blocks_into(acc):
        def key_block(kb, carry):
            k0 = kb * block_k
            _, keys = _panel_blocks(starts_ref, r0, block_q, k0, block_k)
            if masked:
                copy_waited(seg_refs[1].at[b, keys], seg_smem[1], bar.at[0])

            scores = chunked_logits([q_ref.at[b, rows]], [k_ref.at[b, keys]], a_smem, b_smem, bar, chunks, shape)
            probs = _probs(scores, m_smem, l_smem, seg_smem, scale=scale, causal=False, shape=shape, r0=r0, k0=k0)
            # P's parts go through shared memory: a wgmma with its left operand in registers
            # has no Mosaic GPU interpret mode, so the CPU tests could not check that variant
            for part, tile in enumerate(_split(probs, True)):
                p_smem[part] = tile
            plgpu.commit_smem()
            for part, s_ref in enumerate(s_refs):
                copy_waited(s_ref.at[b, keys, values], v_smem.at[part], bar.at[0])
            plgpu.wgmma(acc, p_smem.at[0], v_smem.at[0])  # P_hi s_hi
            if split:
                plgpu.wgmma(acc, p_smem.at[0], v_smem.at[1])  # + P_hi s_lo
            plgpu.wgmma(acc, p_smem.at[1], v_smem.at[0])  # + P_lo s_hi
            plgpu.wgmma_wait(0)  # the next key block's copies overwrite s
            return carry

        lax.fori_loop(0, key_blocks, key_block, 0)
        return acc[...]

    acc = pl.run_scoped(key_blocks_into, plgpu.ACC((block_q, block_v), F32))  # zero-initialised
    if accumulate:  # out_ref is the full-length buffer: its tile at the window's rows, plus the product
        add_into_tile(out_ref.at[b, rows, values], out_smem, bar.at[0], acc)
        return
    out_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_ref.at[b, pl.ds(r0, block_q), values])
    plgpu.wait_smem_to_gmem(0)


def gpu_block_product(
    q,
    seg_q,
    m,
    logl,
    k,
    seg_k,
    s_hi,
    s_lo,
    *,
    scale: float,
    block_q: int = BLOCK_Q,
    block_k: int = PRODUCT_BLOCK_K,
    interpret=False,
    rows: int | None = None,
    keys: int | None = None,
    row_start=0,
    key_start=0,
    acc=None,
):
    """A[rows, keys] s[keys] of one pushed block, fused (Mosaic GPU): (B, P, Dv) float32, or, given
    ``acc``, acc with the product added into the window's rows in place.

    q, m, logl, seg_q, seg_k, blocks and ``interpret`` as in ``gpu_block_probs`` (no causal
    option: the solve's pushed blocks need none); s_hi, s_lo (B, K, Dv) bf16: the keys' s split
    hi + lo (``precision.split_bf16``), or s_lo None: s rounded to bf16 once (s_hi). Per (row
    block, Dv tile, batch row) the kernel loops over the key blocks: logits by wgmma over D
    chunks, P = exp((scale q k^T - m) - logl) (zero where the segment ids differ) in fp32
    registers, split into bf16 hi = bf16(P) and lo = bf16(P - hi), and P_hi s_hi + P_hi s_lo +
    P_lo s_hi accumulated in fp32; with s_lo None, P_hi s_hi + P_lo s_hi (two passes). The twin is
    ``block_product.split_block_product`` (``split=s_lo is not None``). No P tile reaches HBM.
    Dv: a multiple of 64, at most ``BLOCK_V`` = 256 (one accumulator) or a multiple of it (Dv /
    256 tiles, each recomputing the logits). Shared memory: (Bq + Bk) * 64 * 2 bytes of q, k
    chunks, 2 * Bq * Bk * 2 of P's parts, n * Bk * Bv * 2 of s (n = 2 parts, 1 with s_lo None),
    Bq * Bv * 4 of output: 160 KiB (128 KiB) at the default Bq = Bk = 64, Bv = 256 (more than
    ``SMEM_BYTES`` is refused).

    ``rows``, ``keys``, ``row_start``, ``key_start``: the block as a window of longer inputs, read
    in place, as in ``gpu_block_probs``: rows of q, m, logl and seg_q; keys of k, seg_k and the s
    parts (which then have k's length). The result is the window's (B, rows, Dv).

    ``acc``: a float32 (B, T, Dv) buffer on q's time axis (T = q's length): the kernel adds the
    product into rows [row_start, row_start + rows) of it, as ``acc + product`` in XLA, through an
    aliased operand (``jax.new_ref``, as ``accumulate_gpu.gpu_accumulate_product``; jax >= 0.12),
    and returns the updated buffer, written in place where the caller's acc is not used afterwards.
    """
    p, kk = _panel("gpu_block_product", q.shape[1], k.shape[1], rows, keys, row_start, key_start)
    _check("gpu_block_product", q, seg_q, k, seg_k, block_q, block_k, panel=(p, kk))
    b, _, d = q.shape
    s_parts = (s_hi,) if s_lo is None else (s_hi, s_lo)
    for name, x in zip(("s_hi", "s_lo"), s_parts):
        if x.dtype != BF16 or x.ndim != 3 or x.shape[:2] != k.shape[:2]:
            raise ValueError(
                f"gpu_block_product: {name} must be bfloat16 (B, K, Dv) with (B, K) = {k.shape[:2]} (s split by "
                f"precision.split_bf16, or s_hi = bf16(s) and s_lo None); got {x.dtype} {x.shape}"
            )
    if s_lo is not None and s_hi.shape != s_lo.shape:
        raise ValueError(f"gpu_block_product: s_hi {s_hi.shape} and s_lo {s_lo.shape} must have one shape")
    dv = s_hi.shape[2]
    block_v = value_block(dv)
    if not product_covers(dv):
        raise ValueError(
            f"gpu_block_product: Dv={dv} must be a multiple of 64 up to {BLOCK_V}, or a multiple of {BLOCK_V} "
            f"(the fp32 accumulator holds at most {BLOCK_V} columns of s); pad s to such a width, or use "
            "gpu_block_probs and split_dot"
        )
    split, parts = s_lo is not None, len(s_parts)
    smem = (
        (block_q + block_k) * BLOCK_D * 2
        + 2 * block_q * block_k * 2
        + parts * block_k * block_v * 2
        + block_q * block_v * 4
    )
    if smem > SMEM_BYTES:
        raise ValueError(
            f"gpu_block_product: block_q={block_q}, block_k={block_k} at Dv tile {block_v} need {smem // 1024} KiB of "
            f"shared memory, over the H100's {SMEM_BYTES // 1024} KiB: use smaller blocks (default 64 x 64)"
        )
    if acc is not None:
        check_in_place("gpu_block_product with acc", "add the returned product in XLA")
        if acc.dtype != F32 or acc.shape != (b, q.shape[1], dv):
            raise ValueError(
                f"gpu_block_product: acc must be float32 (B, T, Dv) = {(b, q.shape[1], dv)} (q's time axis, s's "
                f"width); got {acc.dtype} {acc.shape}"
            )
    masked = seg_q is not None
    scratch = [
        plgpu.SMEM((1, block_q, BLOCK_D), BF16, **SWIZZLE),
        plgpu.SMEM((1, block_k, BLOCK_D), BF16, **SWIZZLE),
        plgpu.SMEM((2, block_q, block_k), BF16, **SWIZZLE),
        plgpu.SMEM((parts, block_k, block_v), BF16, **SWIZZLE),
        *_row_scratch(masked, block_q, block_k, 2),
        plgpu.SMEM((block_q, block_v), F32, transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))),
        plgpu.Barrier(num_barriers=1),
    ]
    body = functools.partial(
        _product_body,
        masked=masked,
        split=split,
        accumulate=acc is not None,
        block_q=block_q,
        block_k=block_k,
        block_v=block_v,
        chunks=d // BLOCK_D,
        key_blocks=kk // block_k,
        scale=float(scale),
    )
    segs = (seg_q.astype(jnp.int32), seg_k.astype(jnp.int32)) if masked else ()
    inputs = (window_starts(row_start, key_start), q, k, *s_parts, m.astype(F32), logl.astype(F32), *segs)
    grid = (p // block_q, dv // block_v, b)
    name = PRODUCT_KERNEL_NAME if split else PRODUCT_BF16_KERNEL_NAME
    cost = product_cost(b, p, kk, d, dv, parts, masked, accumulate=acc is not None)
    names = ("rows", "values", "batch")
    if acc is None:
        (out,) = _call(body, name, inputs, 1, (b, p, dv), scratch, grid, interpret, F32, names, cost=cost)
        return out
    acc_ref = jax.new_ref(acc)
    _call(body, name, (*inputs, acc_ref), 0, (), scratch, grid, interpret, F32, names, cost=cost)
    return jax.freeze(acc_ref)


def product_cost(
    b: int, p: int, kk: int, d: int, dv: int, parts: int, masked: bool, accumulate: bool = False
) -> pl.CostEstimate:
    """``gpu_block_product``'s work on a (P, K) block, declared to the compiler (and read back by
    ``benchmarks/gpu_compile.py``, which cannot see into the kernel or its windows): the logits'
    2 B P K D FLOPs once per Dv tile and P s's 2 B P K Dv per bf16 pass (3 with s split, else 2);
    bytes: the window's operands read once and the float32 result written once (a lower bound:
    each row block rereads its keys), with ``accumulate`` also the buffer's tile read; one
    exponential per P entry per Dv tile."""
    tiles = -(-dv // value_block(dv))
    passes = 3 if parts == 2 else 2
    flops = 2 * b * p * kk * (tiles * d + passes * dv)
    read = b * ((p + kk) * d * 2 + parts * kk * dv * 2 + 2 * p * 4 + ((p + kk) * 4 if masked else 0))
    written = b * p * dv * 4
    moved = read + written * (2 if accumulate else 1)
    return pl.CostEstimate(flops=flops, transcendentals=b * p * kk * tiles, bytes_accessed=moved)
