"""Pallas Mosaic GPU (Hopper, ``plgpu``) kernel of the recursive solve: the row statistics.

* ``gpu_row_statistics`` (twin: ``row_stats.row_statistics``; same contract as
  ``row_stats_tpu.tpu_row_statistics``): the softmax max m and log-normaliser logl of every row
  over its allowed keys (tau < t, same segment).

Layout: ``plgpu.kernel`` with grid (T/Bq row blocks, B) and one warpgroup per block. The key
blocks 0 .. the diagonal one are read one at a time (single buffered, no warp specialisation)
and multiplied with ``plgpu.wgmma`` into an fp32 (Bq, Bk) accumulator; key blocks above the
diagonal are never read. Up to D = ``MAX_D`` the row block of q is copied once into shared
memory by TMA and each key block whole; above it the D contraction is streamed
(``chunked_logits``): each key block's logits are a loop over D chunks of ``BLOCK_D`` = 64
columns, each chunk of q and k copied by TMA and contracted by one wgmma per operand part, so D
may be any multiple of 64. Operands are bf16: float32 inputs at tier "bf16x3" are split outside
the kernel into hi = bf16(x) and lo = bf16(x - hi), and the logits are q_hi k_hi + q_hi k_lo +
q_lo k_hi (three wgmmas into the same accumulator); tier "bfloat16", or bf16 inputs, use one
pass. The online (max, sum) merge per row runs in fp32 registers (WGMMA row layout), with the
strict-causal mask (and, given segment ids, the segment mask) in the diagonal key block(s) and
the segment mask only elsewhere. The finite -1e30 stands in for -inf, so exp(-inf - -inf) = NaN
cannot occur. (m, logl) go back through shared memory to (B, T) float32 outputs; rows without
keys get (0, EMPTY_LOGL).

Shared memory: (Bq + Bk) * D * 2 bytes per operand part (x2 for bf16x3) up to D = 256, at most
128 KiB at Bq = Bk = 64; streamed, (Bq + Bk) * 64 * 2 per part whatever D is. T must be a
multiple of both blocks.

Needs a Hopper GPU (sm_90a: wgmma and TMA); ROCm is not supported. Off the GPU it runs in
Mosaic GPU interpret mode (``interpret=plgpu.InterpretGPUParams()``, jax >= 0.11). Opt-in via
``kernels="pallas"``.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sessa_jax.ops.solve.precision import split_bf16
from sessa_jax.ops.solve.row_stats import EMPTY_LOGL

F32 = jnp.float32
BF16 = jnp.bfloat16
_NEG = -1e30  # finite "minus infinity": exp(-inf - -inf) would be NaN
TIERS = ("bf16x3", "bfloat16")
MAX_D = 256  # widest D contracted whole (q and k, hi and lo, in shared memory); wider D is streamed
BLOCK_D = 64  # columns of D per TMA copy and wgmma when streamed: one 128-byte swizzled row of bf16
SWIZZLE = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
KERNEL_NAME = "sessa_row_stats_gpu"
# (q part, k part) of each wgmma of the logits, by operand parts: one bf16 pass, or the bf16x3
# split's q_hi k_hi + q_hi k_lo + q_lo k_hi
PART_PRODUCTS = {1: ((0, 0),), 2: ((0, 0), (0, 1), (1, 0))}
_LOAD_TAKES_IDX = "idx" in inspect.signature(plgpu.load).parameters  # jax 0.10: load(ref, idx, layout=)


def _load(ref, layout):
    """The whole 1-D ``ref`` as an array in ``layout`` (``plgpu.load`` lost its index after jax 0.10)."""
    return plgpu.load(ref, (), layout=layout) if _LOAD_TAKES_IDX else plgpu.load(ref, layout=layout)


def interpret_params():
    """``plgpu.InterpretGPUParams()`` where this JAX has the Mosaic GPU interpret mode (>= 0.11), else None."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    return params() if params is not None else None


def _check(q, k, seg, tier, block_q, block_k):
    if q.ndim != 3 or k.shape != q.shape or (seg is not None and seg.shape != q.shape[:2]):
        raise ValueError(
            "gpu_row_statistics: want q, k (B, T, D) and seg (B, T) or None; got q "
            f"{q.shape}, k {k.shape}, seg {None if seg is None else seg.shape}"
        )
    if tier not in TIERS:
        raise ValueError(
            f"gpu_row_statistics: tier {tier!r} is not supported; use one of {TIERS} "
            "(float32 logits are not done on the GPU kernel: use kernels='xla')"
        )
    _, t, d = q.shape
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk % 64 or blk <= 0:
            raise ValueError(f"gpu_row_statistics: {name}={blk} must be a positive multiple of 64 (wgmma tiles)")
        if t % blk:
            raise ValueError(
                f"gpu_row_statistics: T={t} must be a multiple of {name}={blk}; pad T "
                f"(e.g. a leaf size that is a multiple of {blk}) or pick a smaller block"
            )
    if d % BLOCK_D or d <= 0:
        raise ValueError(
            f"gpu_row_statistics: D={d} is not supported; D must be a positive multiple of {BLOCK_D} "
            f"(the wgmma tile; above {MAX_D} the contraction is streamed in chunks of {BLOCK_D}); "
            "use kernels='xla' for this D"
        )


# Two entries after constant window starts, which no start (>= 0) equals: the compiler rewrites a
# constant operand that is an iota times c, e.g. the starts (0, 4096), or one value throughout, e.g.
# (0, 0), into a kernel launch of its own; with these entries no constant starts operand is either.
_STARTS_TAIL = (-1, -1)


def window_starts(*starts):
    """A kernel's window starts as its int32 operand; each start a Python int or a traced int32
    scalar (a loop's block offset). Python ints alone: one literal constant, (len(starts) + 2,) with
    ``_STARTS_TAIL`` after them; else the starts stacked, (len(starts),). Kernels read the first
    len(starts) entries (``read_window_starts``)."""
    if all(isinstance(x, int) for x in starts):
        return jnp.asarray(np.asarray(starts + _STARTS_TAIL, np.int32))
    return jnp.stack([jnp.asarray(x, jnp.int32) for x in starts])


def read_window_starts(starts_ref, align: int, count: int):
    """Inside a kernel: the first ``count`` starts of ``window_starts`` as scalars, each declared a
    multiple of ``align``, which the TMA copies into tiled shared memory need proven
    (``pl.multiple_of``)."""
    return tuple(pl.multiple_of(starts_ref[i], align) for i in range(count))


def copy_waited(src, dst, barrier):
    """One TMA copy global -> shared memory, waited for (single buffered)."""
    plgpu.copy_gmem_to_smem(src, dst, barrier)
    plgpu.barrier_wait(barrier)


def chunked_logits(q_rows, k_keys, a_smem, b_smem, bar, chunks: int, shape):
    """q_rows k_keys^T as a float32 ``shape`` (rows, keys) value, the D contraction streamed:
    ``chunks`` steps over D chunks of ``BLOCK_D`` columns, each copying every part's chunk into
    ``a_smem`` / ``b_smem`` (parts, rows or keys, BLOCK_D) and issuing one wgmma per product.

    q_rows, k_keys: sequences of one ref (one bf16 pass) or of the hi and lo refs of a bf16x3
    split (q_hi k_hi + q_hi k_lo + q_lo k_hi), each a (rows or keys, D) view."""

    def logits(acc):
        def chunk(c, carry):
            cols = pl.ds(c * BLOCK_D, BLOCK_D)
            for p, ref in enumerate(q_rows):
                copy_waited(ref.at[:, cols], a_smem.at[p], bar.at[0])
            for p, ref in enumerate(k_keys):
                copy_waited(ref.at[:, cols], b_smem.at[p], bar.at[0])
            for pq, pk in PART_PRODUCTS[len(q_rows)]:
                plgpu.wgmma(acc, a_smem.at[pq], b_smem.at[pk].transpose((1, 0)))
            plgpu.wgmma_wait(0)  # the next chunk's copies overwrite the operands
            return carry

        lax.fori_loop(0, chunks, chunk, 0)
        return acc[...]

    return pl.run_scoped(logits, plgpu.ACC(shape, F32))


def _parts(x, split: bool):
    """(hi,) or, with ``split``, (hi, lo) bf16 parts of x: hi = bf16(x), lo = bf16(x - hi).

    The split runs in XLA before the kernel, so it rounds on the bits
    (``precision.split_bf16``): XLA's GPU compiler would fold ``x - float32(bfloat16(x))`` to 0."""
    if not split:
        return (x.astype(BF16),)
    hi, lo = split_bf16(x)
    return hi, jnp.zeros_like(hi) if lo is None else lo


def _stats_body(*refs, parts: int, masked: bool, chunks: int, block_q: int, block_k: int, scale: float):
    """Kernel body (one row block of one batch row); see the module docstring. ``chunks``: 0
    contracts D whole (q copied once), else the number of streamed D chunks."""
    q_refs, k_refs, refs = refs[:parts], refs[parts : 2 * parts], refs[2 * parts :]
    seg_ref, refs = (refs[0], refs[1:]) if masked else (None, refs)
    m_ref, logl_ref, q_smem, k_smem, *refs = refs
    (qseg_smem, kseg_smem, *refs) = refs if masked else (None, None, *refs)
    m_smem, l_smem, q_bar, k_bar = refs
    i, b = lax.axis_index("rows"), lax.axis_index("batch")
    r0 = i * block_q
    rows = pl.ds(r0, block_q)
    shape = (block_q, block_k)

    if not chunks:
        for p in range(parts):
            copy_waited(q_refs[p].at[b, rows], q_smem.at[p], q_bar.at[0])
    if masked:
        copy_waited(seg_ref.at[b, rows], qseg_smem, q_bar.at[0])
        qseg2 = lax.broadcast_in_dim(_load(qseg_smem, plgpu.Layout.WGMMA.reduce(1)), shape, [0])

    def whole_logits(keys):
        for p in range(parts):
            copy_waited(k_refs[p].at[b, keys], k_smem.at[p], k_bar.at[0])

        def logits(acc):
            for pq, pk in PART_PRODUCTS[parts]:
                plgpu.wgmma(acc, q_smem.at[pq], k_smem.at[pk].transpose((1, 0)))
            return acc[...]

        return pl.run_scoped(logits, plgpu.ACC(shape, F32))

    def step(j, carry, diagonal: bool):
        m_old, l_old = carry
        keys = pl.ds(j * block_k, block_k)
        if chunks:
            q_rows = [ref.at[b, rows] for ref in q_refs]
            k_keys = [ref.at[b, keys] for ref in k_refs]
            z = chunked_logits(q_rows, k_keys, q_smem, k_smem, k_bar, chunks, shape) * scale
        else:
            z = whole_logits(keys) * scale
        allowed = None
        if masked:
            copy_waited(seg_ref.at[b, keys], kseg_smem, k_bar.at[0])
            kseg = _load(kseg_smem, plgpu.Layout.WGMMA.reduce(0))
            allowed = qseg2 == lax.broadcast_in_dim(kseg, shape, [1])
        if diagonal:
            row_ids = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + r0
            key_ids = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + j * block_k
            below = key_ids < row_ids
            allowed = below if allowed is None else allowed & below
        if allowed is not None:
            z = jnp.where(allowed, z, _NEG)
        m_new = jnp.maximum(m_old, z.max(axis=1))
        p = jnp.exp(z - lax.broadcast_in_dim(m_new, shape, [0]))
        if allowed is not None:
            p = jnp.where(allowed, p, 0.0)
        l_new = l_old * jnp.exp(m_old - m_new) + p.sum(axis=1)
        return m_new, l_new

    m0 = plgpu.layout_cast(jnp.full((block_q,), _NEG, F32), plgpu.Layout.WGMMA.reduce(1))
    l0 = plgpu.layout_cast(jnp.full((block_q,), 0.0, F32), plgpu.Layout.WGMMA.reduce(1))
    full = lax.div(r0, jnp.int32(block_k))  # key blocks entirely before the row block
    last = lax.div(r0 + block_q + block_k - 1, jnp.int32(block_k))  # ... through the diagonal
    carry = lax.fori_loop(0, full, functools.partial(step, diagonal=False), (m0, l0))
    m, l = lax.fori_loop(full, last, functools.partial(step, diagonal=True), carry)

    has = l > 0
    m_smem[...] = jnp.where(has, m, 0.0)
    l_smem[...] = jnp.where(has, jnp.log(jnp.where(has, l, 1.0)), EMPTY_LOGL)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(m_smem, m_ref.at[b, rows])
    plgpu.copy_smem_to_gmem(l_smem, logl_ref.at[b, rows])
    plgpu.wait_smem_to_gmem(0)


def gpu_row_statistics(
    q, k, seg, *, scale: float, tier: str = "bf16x3", block_q: int = 64, block_k: int = 64, interpret=False
):
    """Row statistics (m, logl), each (B, T) float32, of the strict-past softmax (Mosaic GPU).

    q, k: (B, T, D) float32 or bf16, D a multiple of 64 (contracted whole up to ``MAX_D``,
    streamed in chunks of ``BLOCK_D`` above); seg: (B, T) int segment ids, or None (one
    sequence per row: no segment mask); row t's keys are tau < t with seg[tau] == seg[t]; rows
    without keys get (0, EMPTY_LOGL). ``tier``: "bf16x3" (hi/lo split of float32 inputs, three
    bf16 wgmmas) or "bfloat16" (one pass); bf16 inputs take one pass at either tier. T must be
    a multiple of block_q and block_k (multiples of 64). ``interpret``: False (compile for the
    GPU) or ``plgpu.InterpretGPUParams()`` (Mosaic GPU interpret mode on CPU, jax >= 0.11).
    """
    _check(q, k, seg, tier, block_q, block_k)
    b, t, d = q.shape
    split = tier == "bf16x3" and (q.dtype != BF16 or k.dtype != BF16)  # bf16 x bf16 is exact in one pass
    q_parts, k_parts = _parts(q, split), _parts(k, split)
    parts = len(q_parts)
    chunks = 0 if d <= MAX_D else d // BLOCK_D
    width = d if not chunks else BLOCK_D
    masked = seg is not None
    scratch = [
        plgpu.SMEM((parts, block_q, width), BF16, **SWIZZLE),
        plgpu.SMEM((parts, block_k, width), BF16, **SWIZZLE),
        *([plgpu.SMEM((block_q,), jnp.int32), plgpu.SMEM((block_k,), jnp.int32)] if masked else []),
        plgpu.SMEM((block_q,), F32),
        plgpu.SMEM((block_q,), F32),
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_barriers=1),
    ]
    body = functools.partial(
        _stats_body, parts=parts, masked=masked, chunks=chunks, block_q=block_q, block_k=block_k, scale=scale
    )
    body.__name__ = KERNEL_NAME  # plgpu.kernel names the kernel after its body
    kwargs = dict(interpret=interpret) if interpret else {}
    call = plgpu.kernel(
        body,
        out_type=[jax.ShapeDtypeStruct((b, t), F32)] * 2,
        scratch_types=scratch,
        grid=(t // block_q, b),
        grid_names=("rows", "batch"),
        **kwargs,
    )
    segs = (seg.astype(jnp.int32),) if masked else ()
    m, logl = call(*q_parts, *k_parts, *segs)
    return m, logl
