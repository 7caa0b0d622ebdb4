"""Pallas TPU (Mosaic) kernel of the row statistics of the strict-past softmax, and the tiling
helpers the TPU block-product kernels share (``block_product_tpu``).

``tpu_row_statistics`` (XLA twin: ``row_stats.row_statistics``): grid (B, T/Bq, T/Bk) with the key
axis "arbitrary"; (max, sum) scratch per row block, online merge, blocks above the diagonal skipped
with ``pl.when`` and a clamped index map (no DMA issued for them). VMEM use is O(Bq D + Bk D + Bq Bk)
whatever T is. Row vectors travel as (B, T, 1) arrays with (Bq, 1) blocks and key segment ids as
(B, 1, T) with (1, Bk) blocks, the layouts Mosaic accepts.

``interpret``: False compiles with Mosaic (on a TPU); True runs Pallas' plain interpret mode; a
``pltpu.InterpretParams`` runs the TPU interpret mode, which simulates VMEM scratch
(``uninitialized_memory="nan"`` shows an accumulator read before it is set), several cores on the
"parallel" grid axes (``num_cores_or_threads``) and a race detector (``detect_races``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sessa_jax.ops.solve.row_stats import EMPTY_LOGL

F32 = jnp.float32
BF16 = jnp.bfloat16
_NEG = -1e30  # finite "minus infinity": exp(-inf - -inf) would be NaN on the VPU
_ROW_BLOCKS = (512, 256, 128, 64, 32, 16, 8)
_KEY_BLOCKS = (512, 256, 128)
VMEM_LIMIT_BYTES = 48 * 1024 * 1024


def row_block(n: int) -> int:
    """Largest supported row block (a multiple of 8 sublanes) dividing ``n``; ``n`` if none does."""
    return next((c for c in _ROW_BLOCKS if n % c == 0), n)


def key_block(n: int) -> int:
    """Largest key block (a multiple of 128 lanes) dividing ``n``; ``n`` (one block) if none does."""
    return next((c for c in _KEY_BLOCKS if n % c == 0), n)


def interpret_arg(interpret):
    """``pallas_call``'s interpret argument: a ``pltpu.InterpretParams`` (TPU interpret mode)
    passes through; anything else is a bool (plain interpret mode, or compile)."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return bool(interpret)


def compiler_params(vmem_limit: int = VMEM_LIMIT_BYTES):
    """Mosaic parameters of the kernels: grid axes (parallel, parallel, arbitrary), VMEM limit."""
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=vmem_limit)


def tile_logits(q, k, scale):
    """(Bq, Bk) fp32 logits q k^T * scale; bf16 operands in one exact MXU pass, fp32 operands faithful."""
    precision = None if q.dtype == BF16 else lax.Precision.HIGHEST
    out = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=F32)
    return out * scale


def _stats_kernel(q_ref, k_ref, qseg_ref, kseg_ref, m_ref, logl_ref, m_scr, l_scr, *, block: int, scale: float):
    i, j = pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, _NEG, F32)
        l_scr[...] = jnp.zeros(l_scr.shape, F32)

    @pl.when(j <= i)
    def _accumulate():
        logits = tile_logits(q_ref[...], k_ref[...], scale)
        rows = i * block + lax.broadcasted_iota(jnp.int32, logits.shape, 0)
        keys = j * block + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        allowed = (keys < rows) & (qseg_ref[...] == kseg_ref[...])
        m_old = m_scr[...]
        m_new = jnp.maximum(m_old, jnp.max(jnp.where(allowed, logits, _NEG), axis=1, keepdims=True))
        p = jnp.where(allowed, jnp.exp(logits - m_new), 0.0)
        l_scr[...] = l_scr[...] * jnp.exp(m_old - m_new) + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_new

    @pl.when(j == i)
    def _finish():
        l = l_scr[...]
        has = l > 0
        m_ref[...] = jnp.where(has, m_scr[...], 0.0)
        logl_ref[...] = jnp.where(has, jnp.log(jnp.where(has, l, 1.0)), EMPTY_LOGL)


def tpu_row_statistics(q, k, seg, *, scale: float, block: int | None = None, interpret=False):
    """Row statistics (m, logl), each (B, T) float32, of the strict-past softmax.

    q, k: (B, T, D) (bf16 or fp32); seg: (B, T) int segment ids; row t's keys are tau < t with
    seg[tau] == seg[t]. Rows without keys get (0, EMPTY_LOGL). ``block``: rows and keys per
    grid step (default: the largest of 512, 256, 128 dividing T, else T). ``interpret``: False
    (compile), True or a ``pltpu.InterpretParams`` (module docstring).
    """
    b, t, d = q.shape
    blk = block or key_block(t)
    if t % blk:
        raise ValueError(f"tpu_row_statistics: block {blk} must divide T={t}")
    n = t // blk
    row = lambda bi, i, j: (bi, i, 0)  # noqa: E731
    key = lambda bi, i, j: (bi, jnp.minimum(i, j), 0)  # noqa: E731  (skipped steps stay on block i)
    out_shape = [jax.ShapeDtypeStruct((b, t, 1), F32)] * 2
    m, logl = pl.pallas_call(
        functools.partial(_stats_kernel, block=blk, scale=scale),
        grid=(b, n, n),
        in_specs=[
            pl.BlockSpec((None, blk, d), row),
            pl.BlockSpec((None, blk, d), key),
            pl.BlockSpec((None, blk, 1), row),
            pl.BlockSpec((None, 1, blk), lambda bi, i, j: (bi, 0, jnp.minimum(i, j))),
        ],
        out_specs=[pl.BlockSpec((None, blk, 1), row)] * 2,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((blk, 1), F32), pltpu.VMEM((blk, 1), F32)],
        compiler_params=compiler_params(),
        interpret=interpret_arg(interpret),
        name="sessa_row_stats_tpu",
    )(q, k, seg[:, :, None], seg[:, None, :])
    return m[:, :, 0], logl[:, :, 0]
