"""Entry point of the fused Pallas feedback solve: s = (I - diag(gamma) A)^-1 f.

One `jax.custom_vjp` whose forward and backward are Pallas kernels for the chosen backend
(`pallas_gpu`: Triton, `pallas_tpu`: Mosaic). Residuals: the padded inputs, s (float32) and
the row log-sum-exp (float32, T). Padding: T to a multiple of the chunk with q = k = f =
gamma = 0 (padded rows come last, so causality keeps them out of real rows; their s is 0),
D with zeros (logits unchanged). Unsupported backends/shapes/dtypes raise
NotImplementedError so that `feedback_solve(method="auto")` can fall back.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from sessa_jax.ops import tiling as tiling_lib

F32 = jnp.float32


def resolve_backend(backend: str | None, interpret) -> str:
    """"gpu" / "tpu"; None means jax.default_backend() (CPU only with interpret -> "gpu")."""
    if backend is None:
        platform = jax.default_backend()
        if platform in ("gpu", "cuda", "rocm"):
            return "gpu"
        if platform == "tpu":
            return "tpu"
        if interpret:
            return "gpu"
        raise NotImplementedError(
            f"no Pallas feedback-solve kernel for platform {platform!r} (pass interpret=True to emulate)"
        )
    if backend not in tiling_lib.BACKENDS:
        raise NotImplementedError(f"unknown Pallas backend {backend!r}; have {tiling_lib.BACKENDS}")
    return backend


def _interpret_arg(backend: str, interpret):
    """Maps interpret=True to the backend's interpret mode (TPU: pltpu.InterpretParams())."""
    if not interpret:
        return False
    if backend == "tpu" and interpret is True:
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return interpret


def _kernels(backend: str):
    if backend == "gpu":
        from sessa_jax.ops import pallas_gpu as mod
    else:
        from sessa_jax.ops import pallas_tpu as mod
    return mod


@dataclasses.dataclass(frozen=True)
class _Static:
    tiling: tiling_lib.Tiling
    scale: float
    interpret: object  # False, True or a (hashable, frozen) pltpu.InterpretParams


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _solve(cfg: _Static, q, k, gamma, f, seg):
    s, _ = _kernels(cfg.tiling.backend).forward(q, k, gamma, f, seg, tiling=cfg.tiling, scale=cfg.scale,
                                               interpret=cfg.interpret)
    return s


def _solve_fwd(cfg, q, k, gamma, f, seg):
    s, lse = _kernels(cfg.tiling.backend).forward(q, k, gamma, f, seg, tiling=cfg.tiling, scale=cfg.scale,
                                                 interpret=cfg.interpret)
    return s, (q, k, gamma, f, seg, s, lse)


def _solve_bwd(cfg, res, ds):
    q, k, gamma, f, seg, s, lse = res
    dq, dk, dgamma, df = _kernels(cfg.tiling.backend).backward(
        q, k, gamma, f, seg, s, lse, ds.astype(F32), tiling=cfg.tiling, scale=cfg.scale, interpret=cfg.interpret
    )
    return dq.astype(q.dtype), dk.astype(k.dtype), dgamma, df, None


_solve.defvjp(_solve_fwd, _solve_bwd)


def _pad(x, t_pad, d_pad=None):
    widths = [(0, 0), (0, t_pad - x.shape[1])]
    if x.ndim == 3:
        widths.append((0, d_pad - x.shape[2]))
    return jnp.pad(x, widths)


def pallas_feedback_solve(q_b, k_b, gamma, f, segment_ids=None, *, chunk_size=None, block_d=None, backend=None,
                          interpret=False):
    """Fused feedback solve. q_b, k_b, f: (B, T, D); gamma: (B, T); segment_ids: (B, T) ints.

    backend: "gpu" (Pallas Triton), "tpu" (Pallas Mosaic) or None (from jax.default_backend();
    on CPU only with interpret set, then the GPU kernel in interpret mode). interpret: False,
    True, or a pltpu.InterpretParams for the TPU kernel. chunk_size / block_d override the
    tiling's chunk and (GPU) output columns per program (`sessa_jax.ops.tiling.compute_tiling`);
    None keeps its per-backend defaults. Returns s (B, T, D) in f.dtype; differentiable in
    q_b, k_b, gamma, f. Raises NotImplementedError where unsupported.
    """
    backend = resolve_backend(backend, interpret)
    if f.ndim != 3 or q_b.shape != f.shape or k_b.shape != f.shape or gamma.shape != f.shape[:2]:
        raise NotImplementedError(
            f"pallas_feedback_solve: need q_b, k_b, f (B,T,D) and gamma (B,T); got "
            f"{q_b.shape}, {k_b.shape}, {f.shape}, {gamma.shape}"
        )
    if segment_ids is not None and (segment_ids.shape != gamma.shape or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise NotImplementedError(f"segment_ids must be (B,T) integers; got {segment_ids.shape} {segment_ids.dtype}")
    for x in (q_b, k_b, gamma, f):
        if jnp.dtype(x.dtype).name not in tiling_lib.SUPPORTED_DTYPES:
            raise NotImplementedError(f"Pallas feedback solve supports {tiling_lib.SUPPORTED_DTYPES}; got {x.dtype}")
    b, t, d = f.shape
    tl = tiling_lib.compute_tiling(t, d, q_b.dtype, backend, chunk_size, block_d=block_d,
                                    interpret=bool(interpret))
    cfg = _Static(tl, 1.0 / math.sqrt(d), _interpret_arg(backend, interpret))
    kdtype = jnp.promote_types(q_b.dtype, k_b.dtype)
    q = _pad(q_b.astype(kdtype), tl.t_padded, tl.d_padded)
    k = _pad(k_b.astype(kdtype), tl.t_padded, tl.d_padded)
    fp = _pad(f.astype(F32), tl.t_padded, tl.d_padded)
    gp = _pad(gamma.astype(F32), tl.t_padded)
    seg = None if segment_ids is None else _pad(segment_ids.astype(jnp.int32), tl.t_padded)
    s = _solve(cfg, q, k, gp, fp, seg)
    return s[:, :t, :d].astype(f.dtype)
