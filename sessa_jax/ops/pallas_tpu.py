"""Pallas TPU (Mosaic) kernels for the Sessa feedback solve; run on CPU with
interpret=pltpu.InterpretParams().

Same math as `pallas_gpu` (shared tile functions in `pallas_common`), laid out the TPU way:
grids of (batch "parallel", chunk "arbitrary", chunk "arbitrary"), blocks of C rows x D_pad
moved by the Pallas pipeline, accumulators in VMEM scratch initialised under `pl.when`, and
steps outside the causal triangle skipped with `pl.when` while their index_map is clamped
to the block of the previous step (no DMA is issued for them).

  forward  grid (B, i, j<=i): online softmax + acc += p s_j; s_j read from a (T_pad, D_pad)
           float32 VMEM scratch (outputs are never read back: prefetch precedes writeback);
           at j == i the diagonal is folded in and solved; s_i goes to the scratch and out.
  lam      grid (B, p, u): j = n-1-p, i = n-1-u (i > j accumulate A_ij^T (gamma_i lam_i),
           i == j transposed diagonal solve); lam kept in a VMEM scratch as well.
  dq       grid (B, i, j<=i): dq_i, r_i accumulate; dgamma_i = lam_i . r_i at j == i.
  dk       grid (B, j, u): i = j + u <= n-1; dk_j accumulates dL_ij^T q_i.
Row vectors (gamma, lse, Delta, segment ids of queries) are (B, T, 1) arrays with (C, 1)
blocks; key segment ids are (B, 1, T) with (1, C) blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sessa_jax.ops import pallas_common as pc
from sessa_jax.ops import tiling as tiling_lib

F32 = jnp.float32
# fp32 dots inside Mosaic: set on every dot (an ambient "highest" config breaks Mosaic).
_PREC = lax.Precision.HIGHEST


def _params(n_sequential_axes: int):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) + ("arbitrary",) * n_sequential_axes,
        vmem_limit_bytes=tiling_lib.TPU_VMEM_LIMIT_BYTES,
    )


def _mask(qs, ks, c, qseg_ref, kseg_ref):
    if qseg_ref is None:
        return pc.tile_mask(qs, ks, c, c)
    return pc.tile_mask(qs, ks, c, c, qseg_ref[...], kseg_ref[...])


def _start(idx, c):
    return pl.multiple_of(idx * c, c)


# --------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, c, scale, has_seg):
    if has_seg:
        q_ref, k_ref, g_ref, f_ref, qseg_ref, kseg_ref, s_ref, lse_ref, m_scr, l_scr, acc_scr, s_all = refs
    else:
        q_ref, k_ref, g_ref, f_ref, s_ref, lse_ref, m_scr, l_scr, acc_scr, s_all = refs
        qseg_ref = kseg_ref = None
    i, j = pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, pc.MASK_VALUE, F32)
        l_scr[...] = jnp.zeros(l_scr.shape, F32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, F32)

    def logits_and_mask():
        logits = pc.tile_logits(q_ref[...], k_ref[...], scale, _PREC)
        return logits, _mask(i * c, j * c, c, qseg_ref, kseg_ref)

    @pl.when(j < i)
    def _offdiag():
        logits, mask = logits_and_mask()
        s_j = s_all[pl.ds(_start(j, c), c), :]
        m, l, acc = pc.fwd_offdiag_step(m_scr[...], l_scr[...], acc_scr[...], logits, mask, s_j, _PREC)
        m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

    @pl.when(j == i)
    def _diag():
        logits, mask = logits_and_mask()
        s, lse = pc.fwd_diag_step(m_scr[...], l_scr[...], acc_scr[...], logits, mask, g_ref[...], f_ref[...], _PREC)
        s_all[pl.ds(_start(i, c), c), :] = s
        s_ref[...] = s
        lse_ref[...] = lse


def _row_spec(c, d, index):
    """(C, D) block of a (B, T, D) array; index(b, x, y) -> chunk index."""
    return pl.BlockSpec((None, c, d), lambda b, x, y: (b, index(x, y), 0))


def _col_spec(c, index):
    """(C, 1) block of a (B, T, 1) array."""
    return pl.BlockSpec((None, c, 1), lambda b, x, y: (b, index(x, y), 0))


def _kseg_spec(c, index):
    """(1, C) block of a (B, 1, T) array."""
    return pl.BlockSpec((None, 1, c), lambda b, x, y: (b, 0, index(x, y)))


def _seg_inputs(seg):
    return [] if seg is None else [seg[:, :, None], seg[:, None, :]]


def forward(q, k, gamma, f, seg, *, tiling, scale, interpret):
    """Padded inputs -> (s float32 (B,T,D), lse float32 (B,T))."""
    b, t, d = q.shape
    c, n = tiling.chunk, tiling.num_chunks
    has_seg = seg is not None
    row_i = lambda x, y: x
    key_j = lambda x, y: jnp.minimum(x, y)  # steps j > i are skipped: stay on block i
    in_specs = [_row_spec(c, d, row_i), _row_spec(c, d, key_j), _col_spec(c, row_i), _row_spec(c, d, row_i)]
    if has_seg:
        in_specs += [_col_spec(c, row_i), _kseg_spec(c, key_j)]
    s, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, c=c, scale=scale, has_seg=has_seg),
        grid=(b, n, n),
        in_specs=in_specs,
        out_specs=[_row_spec(c, d, row_i), _col_spec(c, row_i)],
        out_shape=[jax.ShapeDtypeStruct((b, t, d), F32), jax.ShapeDtypeStruct((b, t, 1), F32)],
        scratch_shapes=[pltpu.VMEM((c, 1), F32), pltpu.VMEM((c, 1), F32), pltpu.VMEM((c, d), F32),
                        pltpu.VMEM((t, d), F32)],
        compiler_params=_params(2),
        interpret=interpret,
        name="sessa_feedback_fwd_tpu",
    )(q, k, gamma[:, :, None], f, *_seg_inputs(seg))
    return s, lse[:, :, 0]


# --------------------------------------------------------------------------- backward
def _lam_kernel(*refs, c, n, scale, has_seg):
    if has_seg:
        q_ref, k_ref, g_ref, lse_ref, ds_ref, qseg_ref, kseg_ref, lam_ref, acc_scr, lam_all = refs
    else:
        q_ref, k_ref, g_ref, lse_ref, ds_ref, lam_ref, acc_scr, lam_all = refs
        qseg_ref = kseg_ref = None
    j, i = n - 1 - pl.program_id(1), n - 1 - pl.program_id(2)

    @pl.when(i == n - 1)
    def _init():
        acc_scr[...] = jnp.zeros(acc_scr.shape, F32)

    def probs():
        logits = pc.tile_logits(q_ref[...], k_ref[...], scale, _PREC)
        return pc.tile_probs(logits, _mask(i * c, j * c, c, qseg_ref, kseg_ref), lse_ref[...])

    @pl.when(i > j)
    def _offdiag():
        g_i = g_ref[...] * lam_all[pl.ds(_start(i, c), c), :]
        acc_scr[...] = pc.lam_offdiag_step(acc_scr[...], probs(), g_i, _PREC)

    @pl.when(i == j)
    def _diag():
        lam = pc.lam_diag_step(acc_scr[...], probs(), g_ref[...], ds_ref[...], _PREC)
        lam_all[pl.ds(_start(j, c), c), :] = lam
        lam_ref[...] = lam


def _grad_kernel(*refs, c, n, scale, has_seg, want_dq):
    """dq/dgamma (want_dq: grid (B, i, j)) or dk (grid (B, j, u), i = j + u)."""
    if has_seg:
        q_ref, k_ref, s_ref, g_ref, lam_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, *rest = refs
    else:
        q_ref, k_ref, s_ref, g_ref, lam_ref, lse_ref, delta_ref, *rest = refs
        qseg_ref = kseg_ref = None
    x, y = pl.program_id(1), pl.program_id(2)
    if want_dq:
        dq_ref, dgamma_ref, dq_scr, r_scr = rest
        i, j, first, active, last = x, y, y == 0, y <= x, y == x
    else:
        dk_ref, dk_scr = rest
        i, j, first, active, last = x + y, x, y == 0, x + y < n, y == n - 1

    @pl.when(first)
    def _init():
        for scr in rest[len(rest) // 2:]:
            scr[...] = jnp.zeros(scr.shape, F32)

    @pl.when(active)
    def _accumulate():
        logits = pc.tile_logits(q_ref[...], k_ref[...], scale, _PREC)
        probs = pc.tile_probs(logits, _mask(i * c, j * c, c, qseg_ref, kseg_ref), lse_ref[...])
        dl = pc.dlogits(probs, g_ref[...] * lam_ref[...], s_ref[...], delta_ref[...], _PREC)
        if want_dq:
            dq_scr[...] += pc.dot(dl, k_ref[...].astype(F32), _PREC)
            r_scr[...] += pc.dot(probs, s_ref[...], _PREC)
        else:
            dk_scr[...] += pc.dot(dl, q_ref[...].astype(F32), _PREC, trans_a=True)

    @pl.when(last)
    def _finish():
        if want_dq:
            dq_ref[...] = dq_scr[...] * scale
            dgamma_ref[...] = jnp.sum(lam_ref[...] * r_scr[...], axis=1, keepdims=True)
        else:
            dk_ref[...] = dk_scr[...] * scale


def backward(q, k, gamma, f, seg, s, lse, ds, *, tiling, scale, interpret):
    """Residuals + ds (float32) -> (dq, dk, dgamma, df), all float32 and padded."""
    b, t, d = q.shape
    c, n = tiling.chunk, tiling.num_chunks
    has_seg = seg is not None
    g3, lse3 = gamma[:, :, None], lse[:, :, None]
    call = functools.partial(pl.pallas_call, grid=(b, n, n), compiler_params=_params(2), interpret=interpret)

    # lam: j = n-1-x, i = max(n-1-y, j) (steps i < j are skipped and stay on block j).
    qi = lambda x, y: jnp.maximum(n - 1 - y, n - 1 - x)
    kj = lambda x, y: n - 1 - x
    in_specs = [_row_spec(c, d, qi), _row_spec(c, d, kj), _col_spec(c, qi), _col_spec(c, qi), _row_spec(c, d, kj)]
    if has_seg:
        in_specs += [_col_spec(c, qi), _kseg_spec(c, kj)]
    lam = call(
        functools.partial(_lam_kernel, c=c, n=n, scale=scale, has_seg=has_seg),
        in_specs=in_specs,
        out_specs=_row_spec(c, d, kj),
        out_shape=jax.ShapeDtypeStruct((b, t, d), F32),
        scratch_shapes=[pltpu.VMEM((c, d), F32), pltpu.VMEM((t, d), F32)],
        name="sessa_feedback_bwd_lam_tpu",
    )(q, k, g3, lse3, ds, *_seg_inputs(seg))
    delta3 = jnp.sum(lam * (s - f), axis=-1, keepdims=True)  # Delta_t = lam_t . (s_t - f_t)
    args = (q, k, s, g3, lam, lse3, delta3, *_seg_inputs(seg))

    def specs(qi, kj):
        out = [_row_spec(c, d, qi), _row_spec(c, d, kj), _row_spec(c, d, kj), _col_spec(c, qi),
               _row_spec(c, d, qi), _col_spec(c, qi), _col_spec(c, qi)]
        return out + ([_col_spec(c, qi), _kseg_spec(c, kj)] if has_seg else [])

    # dq: grid (B, i, j); j > i skipped, clamped to block i.
    dq_i, dq_j = (lambda x, y: x), (lambda x, y: jnp.minimum(x, y))
    dq, dgamma = call(
        functools.partial(_grad_kernel, c=c, n=n, scale=scale, has_seg=has_seg, want_dq=True),
        in_specs=specs(dq_i, dq_j),
        out_specs=[_row_spec(c, d, dq_i), _col_spec(c, dq_i)],
        out_shape=[jax.ShapeDtypeStruct((b, t, d), F32), jax.ShapeDtypeStruct((b, t, 1), F32)],
        scratch_shapes=[pltpu.VMEM((c, d), F32), pltpu.VMEM((c, d), F32)],
        name="sessa_feedback_bwd_dq_tpu",
    )(*args)
    # dk: grid (B, j, u), i = j + u; i > n-1 skipped, clamped to block n-1.
    dk_i, dk_j = (lambda x, y: jnp.minimum(x + y, n - 1)), (lambda x, y: x)
    dk = call(
        functools.partial(_grad_kernel, c=c, n=n, scale=scale, has_seg=has_seg, want_dq=False),
        in_specs=specs(dk_i, dk_j),
        out_specs=_row_spec(c, d, dk_j),
        out_shape=jax.ShapeDtypeStruct((b, t, d), F32),
        scratch_shapes=[pltpu.VMEM((c, d), F32)],
        name="sessa_feedback_bwd_dk_tpu",
    )(*args)
    return dq, dk, dgamma[:, :, 0], lam
