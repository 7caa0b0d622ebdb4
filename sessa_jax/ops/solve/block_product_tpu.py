"""Pallas TPU (Mosaic) kernels of the recursive solve's block product and its backward.

``tpu_block_product`` (XLA twin: ``block_product.block_product``): the update A[R, K] s[K] of one
off-diagonal block whose keys all precede its rows, with A = exp((q k^T * scale - m) - logl) on
allowed pairs; grid (B, |R|/Bq, |K|/Bk), an fp32 (Bq, D) accumulator in VMEM, the product in
the solve's push tier (bf16x3 as an explicit hi/lo split: three bf16 MXU passes, fp32 accumulation;
bfloat16 as P split, s rounded once: two passes, ``precision.push_dot``).
``tpu_block_product_bwd``: (A^T g, dq, dk) of one block. ``interpret`` as in ``row_stats_tpu``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sessa_jax.ops.solve.row_stats_tpu import compiler_params, interpret_arg, key_block, row_block, tile_logits

F32 = jnp.float32
BF16 = jnp.bfloat16
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b^T


def _chained(p, s, tier: str, dims=_NN):
    """dot_general(p, s, dims) in the solve's tier; fp32 out. bf16x3 = hi.hi + hi.lo + lo.hi;
    a bf16 operand has no lo part, so its pass is skipped."""
    if tier == "float32":
        return lax.dot_general(
            p.astype(F32), s.astype(F32), dims, precision=lax.Precision.HIGHEST, preferred_element_type=F32
        )
    p_hi, s_hi = p.astype(BF16), s.astype(BF16)
    out = lax.dot_general(p_hi, s_hi, dims, preferred_element_type=F32)
    if tier == "bfloat16":
        return out
    if s.dtype != BF16:
        out += lax.dot_general(p_hi, (s - s_hi.astype(s.dtype)).astype(BF16), dims, preferred_element_type=F32)
    if p.dtype != BF16:
        out += lax.dot_general((p - p_hi.astype(p.dtype)).astype(BF16), s_hi, dims, preferred_element_type=F32)
    return out


def _two_pass(a, b, *, split_a: bool):
    """The bfloat16 tier's pushes a @ b (``precision.push_dot``, ``transposed_push_dot``): one fp32
    operand split into bf16 hi + lo (a with ``split_a``, else b), the other rounded to bf16 once,
    two bf16 MXU passes; fp32 out."""
    whole = a if split_a else b
    hi = whole.astype(BF16)
    lo = (whole - hi.astype(F32)).astype(BF16)
    rounded = (b if split_a else a).astype(BF16)

    def dot(part):
        pair = (part, rounded) if split_a else (rounded, part)
        return lax.dot_general(*pair, _NN, preferred_element_type=F32)

    return dot(hi) + dot(lo)


def _product_kernel(
    q_ref, k_ref, qseg_ref, kseg_ref, m_ref, logl_ref, s_ref, out_ref, acc_scr, *, scale: float, tier: str
):
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        acc_scr[...] = jnp.zeros(acc_scr.shape, F32)

    z = (tile_logits(q_ref[...], k_ref[...], scale) - m_ref[...]) - logl_ref[...]
    probs = jnp.where(qseg_ref[...] == kseg_ref[...], jnp.exp(z), 0.0)
    s = s_ref[...].astype(F32)
    acc_scr[...] += _two_pass(probs, s, split_a=True) if tier == "bfloat16" else _chained(probs, s, tier)

    @pl.when(j == pl.num_programs(2) - 1)
    def _store():
        out_ref[...] = acc_scr[...]


def tpu_block_product(
    q_rows, seg_rows, m_rows, logl_rows, k_keys, seg_keys, s_keys, *, scale: float, tier: str, interpret=False
):
    """A[R, K] @ s[K] for one block whose keys all precede its rows; (B, |R|, D) float32.

    q_rows (B, R, D), seg/m/logl_rows (B, R); k_keys (B, K, D), seg_keys (B, K), s_keys (B, K, D)
    float32. A = exp((q k^T * scale - m) - logl) where the segments match, else 0.
    ``tier``: "float32", "bf16x3" or "bfloat16" (the chained product's precision).
    """
    b, r, d = q_rows.shape
    kk = k_keys.shape[1]
    bq, bk = row_block(r), key_block(kk)
    row = lambda bi, i, j: (bi, i, 0)  # noqa: E731
    key = lambda bi, i, j: (bi, j, 0)  # noqa: E731
    col = lambda x: x.astype(F32)[:, :, None]  # noqa: E731
    return pl.pallas_call(
        functools.partial(_product_kernel, scale=scale, tier=tier),
        grid=(b, r // bq, kk // bk),
        in_specs=[
            pl.BlockSpec((None, bq, d), row),
            pl.BlockSpec((None, bk, d), key),
            pl.BlockSpec((None, bq, 1), row),
            pl.BlockSpec((None, 1, bk), lambda bi, i, j: (bi, 0, j)),
            pl.BlockSpec((None, bq, 1), row),
            pl.BlockSpec((None, bq, 1), row),
            pl.BlockSpec((None, bk, d), key),
        ],
        out_specs=pl.BlockSpec((None, bq, d), row),
        out_shape=jax.ShapeDtypeStruct((b, r, d), F32),
        scratch_shapes=[pltpu.VMEM((bq, d), F32)],
        compiler_params=compiler_params(),
        interpret=interpret_arg(interpret),
        name="sessa_block_product_tpu",
    )(
        q_rows,
        k_keys,
        seg_rows.astype(jnp.int32)[:, :, None],
        seg_keys.astype(jnp.int32)[:, None, :],
        col(m_rows),
        col(logl_rows),
        s_keys.astype(F32),
    )


# --------------------------------------------------------------------------- block product, backward
def _probs_and_dlogits(
    q_ref, k_ref, qseg_ref, kseg_ref, m_ref, logl_ref, delta_ref, g_ref, s_ref, scale, plain, round_g
):
    """P (Bq, Bk) and dL = P * (g s^T - delta) of one tile, with g rounded to bf16 first where
    ``round_g``; everything fp32."""
    z = (tile_logits(q_ref[...], k_ref[...], scale) - m_ref[...]) - logl_ref[...]
    probs = jnp.where(qseg_ref[...] == kseg_ref[...], jnp.exp(z), 0.0)
    g = g_ref[...]
    g_dot_s = _chained(g.astype(BF16).astype(F32) if round_g else g, s_ref[...], plain, _NT)
    return probs, probs * (g_dot_s - delta_ref[...])


def _bwd_keys_kernel(
    q_ref,
    k_ref,
    qseg_ref,
    kseg_ref,
    m_ref,
    logl_ref,
    delta_ref,
    g_ref,
    s_ref,
    bacc_ref,
    dk_ref,
    bacc_scr,
    dk_scr,
    *,
    scale: float,
    tier: str,
    plain: str,
    round_g: bool,
):
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _init():
        bacc_scr[...] = jnp.zeros(bacc_scr.shape, F32)
        dk_scr[...] = jnp.zeros(dk_scr.shape, F32)

    probs, dlogits = _probs_and_dlogits(
        q_ref, k_ref, qseg_ref, kseg_ref, m_ref, logl_ref, delta_ref, g_ref, s_ref, scale, plain, round_g
    )
    g = g_ref[...].astype(F32)
    bacc_scr[...] += _two_pass(probs.T, g, split_a=False) if tier == "bfloat16" else _chained(probs.T, g, tier)
    dk_scr[...] += _chained(dlogits.T, q_ref[...], plain) * scale

    @pl.when(i == pl.num_programs(2) - 1)
    def _store():
        bacc_ref[...] = bacc_scr[...]
        dk_ref[...] = dk_scr[...]


def _bwd_rows_kernel(
    q_ref,
    k_ref,
    qseg_ref,
    kseg_ref,
    m_ref,
    logl_ref,
    delta_ref,
    g_ref,
    s_ref,
    dq_ref,
    dq_scr,
    *,
    scale: float,
    plain: str,
    round_g: bool,
):
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, F32)

    _, dlogits = _probs_and_dlogits(
        q_ref, k_ref, qseg_ref, kseg_ref, m_ref, logl_ref, delta_ref, g_ref, s_ref, scale, plain, round_g
    )
    dq_scr[...] += _chained(dlogits, k_ref[...], plain) * scale

    @pl.when(j == pl.num_programs(2) - 1)
    def _store():
        dq_ref[...] = dq_scr[...]


def tpu_block_product_bwd(
    q_rows,
    seg_rows,
    m_rows,
    logl_rows,
    g_rows,
    delta_rows,
    k_keys,
    seg_keys,
    s_keys,
    *,
    scale: float,
    tier: str,
    plain_tier: str,
    round_g: bool = False,
    interpret=False,
):
    """Backward of one pushed block: (A^T g (B,K,D), dq (B,R,D), dk (B,K,D)), all float32.

    Rows R carry q, seg, (m, logl), g = gamma * lam and delta = rowsum(g * r) (B, R), with r = A s
    (``block_product.row_delta``); keys K carry k, seg and s. dL = A * (g s^T - delta);
    dq = dL k * scale, dk = dL^T q * scale.
    ``tier`` for the chained A^T g (the "bfloat16" tier's: P rounded once, g split hi + lo),
    ``plain_tier`` for g s^T, dq and dk (``precision.nonchained_tier``); ``round_g``: g rounded
    to bf16 for g s^T (``precision.difference_g``), A^T g taking it whole.
    Two grids, each recomputing A once: keys outer for A^T g and dk, rows outer for dq.
    """
    b, r, d = q_rows.shape
    kk = k_keys.shape[1]
    bq, bk = row_block(r), key_block(kk)
    col = lambda x: x.astype(F32)[:, :, None]  # noqa: E731
    args = (
        q_rows,
        k_keys,
        seg_rows.astype(jnp.int32)[:, :, None],
        seg_keys.astype(jnp.int32)[:, None, :],
        col(m_rows),
        col(logl_rows),
        col(delta_rows),
        g_rows.astype(F32),
        s_keys.astype(F32),
    )

    def specs(row, key, kseg):
        return (
            [
                pl.BlockSpec((None, bq, d), row),
                pl.BlockSpec((None, bk, d), key),
                pl.BlockSpec((None, bq, 1), row),
                pl.BlockSpec((None, 1, bk), kseg),
            ]
            + [pl.BlockSpec((None, bq, 1), row)] * 3
            + [pl.BlockSpec((None, bq, d), row), pl.BlockSpec((None, bk, d), key)]
        )

    # keys outer: grid (B, K/Bk, R/Bq)
    key_spec = pl.BlockSpec((None, bk, d), lambda bi, j, i: (bi, j, 0))
    bacc, dk = pl.pallas_call(
        functools.partial(_bwd_keys_kernel, scale=scale, tier=tier, plain=plain_tier, round_g=round_g),
        grid=(b, kk // bk, r // bq),
        in_specs=specs(lambda bi, j, i: (bi, i, 0), lambda bi, j, i: (bi, j, 0), lambda bi, j, i: (bi, 0, j)),
        out_specs=[key_spec, key_spec],
        out_shape=[jax.ShapeDtypeStruct((b, kk, d), F32)] * 2,
        scratch_shapes=[pltpu.VMEM((bk, d), F32), pltpu.VMEM((bk, d), F32)],
        compiler_params=compiler_params(),
        interpret=interpret_arg(interpret),
        name="sessa_block_product_bwd_keys_tpu",
    )(*args)
    # rows outer: grid (B, R/Bq, K/Bk)
    dq = pl.pallas_call(
        functools.partial(_bwd_rows_kernel, scale=scale, plain=plain_tier, round_g=round_g),
        grid=(b, r // bq, kk // bk),
        in_specs=specs(lambda bi, i, j: (bi, i, 0), lambda bi, i, j: (bi, j, 0), lambda bi, i, j: (bi, 0, j)),
        out_specs=pl.BlockSpec((None, bq, d), lambda bi, i, j: (bi, i, 0)),
        out_shape=jax.ShapeDtypeStruct((b, r, d), F32),
        scratch_shapes=[pltpu.VMEM((bq, d), F32)],
        compiler_params=compiler_params(),
        interpret=interpret_arg(interpret),
        name="sessa_block_product_bwd_rows_tpu",
    )(*args)
    return bacc, dq, dk
