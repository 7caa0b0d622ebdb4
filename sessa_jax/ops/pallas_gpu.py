"""Pallas GPU (Triton) kernels for the Sessa feedback solve; also run with interpret=True on CPU.

Inputs are already padded (T to a multiple of the chunk C, D to a power of two) by
`sessa_jax.ops.pallas`; q, k keep their storage dtype, gamma / f / s / lam are float32.
Kernels (per batch element b; one program walks its chunks in-kernel):

  forward   grid (B, D/Dv): for i = 0..n-1: online softmax over key chunks j < i with
            acc += p s_j (s read back from the output), fold the diagonal chunk, solve it
            by the log-depth product, write s_i (columns of s are independent given A,
            so each program owns Dv output columns and recomputes the logits).
  lam       grid (B, D/Dv): for j = n-1..0: b_j = ds_j + sum_{i>j} A_ij^T (gamma_i lam_i),
            lam_j = (I - Gamma_j A_jj)^-T b_j.
  dq        grid (B, n, D/Dv): query chunk i: r_i = sum_{j<=i} A_ij s_j, dL = A (g s^T - Delta),
            dq_i = scale dL k, dgamma_i = lam_i . r_i.
  dk        grid (B, n, D/Dv): key chunk j: dk_j = scale sum_{i>=j} dL_ij^T q_i (Dv columns each).
All D contractions (logits, g s^T) loop over static Dv-column blocks: on a GPU no C x D
operand is held whole; every dq / dk / s / lam program owns Dv output columns.
No array with two T-sized dimensions exists anywhere; every tile is C x C or C x D.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sessa_jax.ops import pallas_common as pc

F32 = jnp.float32


def _precision(interpret: bool):
    # Triton maps fp32 DEFAULT to plain TF32 (~1e-3 error); TF32x3 is fp32-accurate on
    # tensor cores. XLA:CPU (interpret mode) has no TF32 algorithms, so use HIGHEST there.
    return lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _compiler_params(interpret: bool, dv: int):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4 if dv <= 64 else 8, num_stages=2)


def _barrier(interpret: bool):
    """Makes this program's global stores visible to its own later loads (real GPU only)."""
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        plgpu.debug_barrier()


def _rows(ref, start, size):
    return ref[pl.ds(start, size), :]


def _col(ref, start, size):
    """(size, 1) column from a 1-D (T,) ref."""
    return ref[pl.ds(start, size)][:, None]


def _row(ref, start, size):
    """(1, size) row from a 1-D (T,) ref."""
    return ref[pl.ds(start, size)][None, :]


def _gram(x_ref, y_ref, xs, ys, c, dc, prec, x_scale=None):
    """x[xs:xs+c] @ y[ys:ys+c]^T (float32), contracting D in static blocks of dc columns
    so that no C x D operand tile is ever held whole (registers) on a real GPU."""
    out = jnp.zeros((c, c), F32)
    for d0 in range(0, x_ref.shape[-1], dc):
        x = x_ref[pl.ds(xs, c), pl.ds(d0, dc)]
        y = y_ref[pl.ds(ys, c), pl.ds(d0, dc)]
        if x_scale is not None:
            x = x_scale * x
        out = out + pc.dot(x, y, pc.logits_precision(x.dtype, prec), trans_b=True)
    return out


def _logits(q_ref, k_ref, qs, ks, c, dc, scale, prec):
    return _gram(q_ref, k_ref, qs, ks, c, dc, prec) * scale


def _seg(seg_ref, qs, ks, c):
    if seg_ref is None:
        return None, None
    return _col(seg_ref, qs, c), _row(seg_ref, ks, c)


# --------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, c, n, dc, scale, prec, has_seg, interpret):
    q_ref, k_ref, g_ref, f_ref = refs[:4]
    seg_ref = refs[4] if has_seg else None
    s_ref, lse_ref = refs[-2:]
    dv = f_ref.shape[-1]

    def chunk(i, carry):
        qs = i * c

        def key_block(j, state):
            m, l, acc = state
            ks = j * c
            qseg, kseg = _seg(seg_ref, qs, ks, c)
            mask = pc.tile_mask(qs, ks, c, c, qseg, kseg)
            logits = _logits(q_ref, k_ref, qs, ks, c, dc, scale, prec)
            return pc.fwd_offdiag_step(m, l, acc, logits, mask, _rows(s_ref, ks, c), prec)

        init = (jnp.full((c, 1), pc.MASK_VALUE, F32), jnp.zeros((c, 1), F32), jnp.zeros((c, dv), F32))
        m, l, acc = lax.fori_loop(0, i, key_block, init)
        qseg, kseg = _seg(seg_ref, qs, qs, c)
        mask = pc.tile_mask(qs, qs, c, c, qseg, kseg)
        logits = _logits(q_ref, k_ref, qs, qs, c, dc, scale, prec)
        s, lse = pc.fwd_diag_step(m, l, acc, logits, mask, _col(g_ref, qs, c), _rows(f_ref, qs, c), prec)
        s_ref[pl.ds(qs, c), :] = s
        lse_ref[pl.ds(qs, c)] = lse[:, 0]
        _barrier(interpret)
        return carry

    lax.fori_loop(0, n, chunk, 0)


# --------------------------------------------------------------------------- backward
def _lam_kernel(*refs, c, n, dc, scale, prec, has_seg, interpret):
    q_ref, k_ref, g_ref, lse_ref, ds_ref = refs[:5]
    seg_ref = refs[5] if has_seg else None
    lam_ref = refs[-1]
    dv = ds_ref.shape[-1]

    def chunk(p, carry):
        j = n - 1 - p
        ks = j * c

        def query_block(u, acc):
            qs = (j + 1 + u) * c
            qseg, kseg = _seg(seg_ref, qs, ks, c)
            mask = pc.tile_mask(qs, ks, c, c, qseg, kseg)
            probs = pc.tile_probs(_logits(q_ref, k_ref, qs, ks, c, dc, scale, prec), mask, _col(lse_ref, qs, c))
            return pc.lam_offdiag_step(acc, probs, _col(g_ref, qs, c) * _rows(lam_ref, qs, c), prec)

        acc = lax.fori_loop(0, n - 1 - j, query_block, jnp.zeros((c, dv), F32))
        qseg, kseg = _seg(seg_ref, ks, ks, c)
        mask = pc.tile_mask(ks, ks, c, c, qseg, kseg)
        probs = pc.tile_probs(_logits(q_ref, k_ref, ks, ks, c, dc, scale, prec), mask, _col(lse_ref, ks, c))
        lam_ref[pl.ds(ks, c), :] = pc.lam_diag_step(acc, probs, _col(g_ref, ks, c), _rows(ds_ref, ks, c), prec)
        _barrier(interpret)
        return carry

    lax.fori_loop(0, n, chunk, 0)


def _tile_dlogits(q_ref, k_ref, s_ref, g_ref, lam_ref, lse_ref, delta_ref, seg_ref, qs, ks, c, dc, scale, prec):
    """(A_ij, dL_ij) for the query chunk at qs and the key chunk at ks (full-D contractions)."""
    qseg, kseg = _seg(seg_ref, qs, ks, c)
    mask = pc.tile_mask(qs, ks, c, c, qseg, kseg)
    probs = pc.tile_probs(_logits(q_ref, k_ref, qs, ks, c, dc, scale, prec), mask, _col(lse_ref, qs, c))
    g_s = _gram(lam_ref, s_ref, qs, ks, c, dc, prec, x_scale=_col(g_ref, qs, c))  # (gamma_i lam_i) s_j^T
    return probs, probs * (g_s - _col(delta_ref, qs, c))


def _dq_kernel(*refs, c, n, dc, scale, prec, has_seg, interpret):
    """Program (b, i, x): dq_i and r_i on output columns x*dc:(x+1)*dc; dgamma_i partial."""
    del n, interpret
    q_ref, k_ref, s_ref, g_ref, lam_ref, lse_ref, delta_ref = refs[:7]
    seg_ref = refs[7] if has_seg else None
    dq_ref, dgamma_ref = refs[-2:]
    i, cols = pl.program_id(1), pl.ds(pl.program_id(2) * dc, dc)
    qs = i * c

    def key_block(j, state):
        dq, r = state
        ks = j * c
        probs, dl = _tile_dlogits(q_ref, k_ref, s_ref, g_ref, lam_ref, lse_ref, delta_ref, seg_ref, qs, ks, c, dc,
                                  scale, prec)
        dq = dq + pc.dot(dl, k_ref[pl.ds(ks, c), cols].astype(F32), prec)
        return dq, r + pc.dot(probs, s_ref[pl.ds(ks, c), cols], prec)

    zeros = jnp.zeros((c, dc), F32)
    dq, r = lax.fori_loop(0, i + 1, key_block, (zeros, zeros))
    dq_ref[pl.ds(qs, c), :] = dq * scale
    dgamma_ref[pl.ds(qs, c)] = jnp.sum(lam_ref[pl.ds(qs, c), cols] * r, axis=1)


def _dk_kernel(*refs, c, n, dc, scale, prec, has_seg, interpret):
    """Program (b, j, x): dk_j on output columns x*dc:(x+1)*dc."""
    del interpret
    q_ref, k_ref, s_ref, g_ref, lam_ref, lse_ref, delta_ref = refs[:7]
    seg_ref = refs[7] if has_seg else None
    dk_ref = refs[-1]
    j, cols = pl.program_id(1), pl.ds(pl.program_id(2) * dc, dc)
    ks = j * c

    def query_block(i, dk):
        qs = i * c
        _, dl = _tile_dlogits(q_ref, k_ref, s_ref, g_ref, lam_ref, lse_ref, delta_ref, seg_ref, qs, ks, c, dc,
                              scale, prec)
        return dk + pc.dot(dl, q_ref[pl.ds(qs, c), cols].astype(F32), prec, trans_a=True)

    dk = lax.fori_loop(j, n, query_block, jnp.zeros((c, dc), F32))
    dk_ref[pl.ds(ks, c), :] = dk * scale


# --------------------------------------------------------------------------- wrappers
def _full(shape_tail):
    """BlockSpec for a whole (B, *tail) array per batch element (batch axis squeezed)."""
    nd = len(shape_tail)
    return pl.BlockSpec((None, *shape_tail), lambda b, *_: (b,) + (0,) * nd)


def _cols(t, dv):
    """BlockSpec for Dv columns of a (B, T, D) array; the last grid axis picks the block."""
    return pl.BlockSpec((None, t, dv), lambda b, *g: (b, 0, g[-1]))


def _common(tiling, interpret, has_seg):
    return dict(c=tiling.chunk, n=tiling.num_chunks, dc=tiling.block_d, prec=_precision(interpret),
                has_seg=has_seg, interpret=interpret)


def forward(q, k, gamma, f, seg, *, tiling, scale, interpret):
    """Padded inputs -> (s float32 (B,T,D), lse float32 (B,T))."""
    b, t, d = q.shape
    dv = tiling.block_d
    has_seg = seg is not None
    kern = functools.partial(_fwd_kernel, scale=scale, **_common(tiling, interpret, has_seg))
    in_specs = [_full((t, d)), _full((t, d)), _full((t,)), _cols(t, dv)] + ([_full((t,))] if has_seg else [])
    return pl.pallas_call(
        kern,
        grid=(b, d // dv),
        in_specs=in_specs,
        out_specs=[_cols(t, dv), _full((t,))],
        out_shape=[jax.ShapeDtypeStruct((b, t, d), F32), jax.ShapeDtypeStruct((b, t), F32)],
        interpret=interpret,
        compiler_params=_compiler_params(interpret, dv),
        name="sessa_feedback_fwd",
    )(q, k, gamma, f, *([seg] if has_seg else []))


def backward(q, k, gamma, f, seg, s, lse, ds, *, tiling, scale, interpret):
    """Residuals + ds (float32) -> (dq, dk, dgamma, df), all float32 and padded."""
    b, t, d = q.shape
    dv = tiling.block_d
    has_seg = seg is not None
    common = _common(tiling, interpret, has_seg)
    segs = [seg] if has_seg else []
    seg_spec = [_full((t,))] if has_seg else []
    lam = pl.pallas_call(
        functools.partial(_lam_kernel, scale=scale, **common),
        grid=(b, d // dv),
        in_specs=[_full((t, d)), _full((t, d)), _full((t,)), _full((t,)), _cols(t, dv)] + seg_spec,
        out_specs=_cols(t, dv),
        out_shape=jax.ShapeDtypeStruct((b, t, d), F32),
        interpret=interpret,
        compiler_params=_compiler_params(interpret, dv),
        name="sessa_feedback_bwd_lam",
    )(q, k, gamma, lse, ds, *segs)
    delta = jnp.sum(lam * (s - f), axis=-1)  # Delta_t = g_t . r_t = lam_t . (s_t - f_t)
    args = (q, k, s, gamma, lam, lse, delta, *segs)
    in_specs = [_full((t, d))] * 3 + [_full((t,)), _full((t, d)), _full((t,)), _full((t,))] + seg_spec
    grid = (b, tiling.num_chunks, d // dv)
    dq, dgamma_parts = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, **common),
        grid=grid,
        in_specs=in_specs,
        out_specs=[_cols(t, dv), pl.BlockSpec((None, None, t), lambda b, i, x: (b, x, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, t, d), F32), jax.ShapeDtypeStruct((b, d // dv, t), F32)],
        interpret=interpret,
        compiler_params=_compiler_params(interpret, dv),
        name="sessa_feedback_bwd_dq",
    )(*args)
    dk = pl.pallas_call(
        functools.partial(_dk_kernel, scale=scale, **common),
        grid=grid,
        in_specs=in_specs,
        out_specs=_cols(t, dv),
        out_shape=jax.ShapeDtypeStruct((b, t, d), F32),
        interpret=interpret,
        compiler_params=_compiler_params(interpret, dv),
        name="sessa_feedback_bwd_dk",
    )(*args)
    return dq, dk, jnp.sum(dgamma_parts, axis=1), lam
