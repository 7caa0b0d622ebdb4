"""Tiling of the Pallas feedback-solve kernels: a pure function of (T, D, dtype, backend).

Starting points from shared/KERNELS.md section 2.4 (not autotuned: no GPU/TPU was available
when this was written):

* GPU (Triton): C = 64 query rows per program (32 for float32 at D > 512, to bound the
  C x D float32 tiles), key block = C, D padded to a power of two (>= 16 so every dot has
  K, N >= 16), Dv = min(D_pad, 128) output columns per forward/lam program. C must be a
  power of two (Triton tiles). In interpret mode any power of two >= 1 is accepted.
* TPU (Mosaic): C = 256 (multiple of 128, the MXU / lane width), key block = C, D padded
  to a multiple of 128; when T <= C a single chunk of T rounded up to 8 rows is used (a
  block equal to the full array is always legal). The whole padded s (forward) or lam
  (backward) of one batch element is kept in VMEM scratch, so T_pad * D_pad * 4 bytes must
  fit in `TPU_VMEM_STATE_BYTES`; beyond that NotImplementedError (callers fall back).
  In interpret mode C only needs to be a multiple of 8.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

BACKENDS = ("gpu", "tpu")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
TPU_VMEM_STATE_BYTES = 24 * 1024 * 1024
TPU_VMEM_LIMIT_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static kernel configuration; hashable, so it can be a custom_vjp nondiff argument."""

    backend: str
    chunk: int  # C: query rows per step (also the key block)
    key_block: int  # keys per inner step (= chunk in these kernels)
    block_d: int  # Dv: output columns per forward / lam program (GPU); D_pad on TPU
    t_padded: int  # T rounded up to a multiple of C
    d_padded: int  # D rounded up (power of two on GPU, multiple of 128 on TPU)

    @property
    def num_chunks(self) -> int:
        return self.t_padded // self.chunk


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def compute_tiling(t: int, d: int, dtype, backend: str, chunk_size: int | None = None,
                   *, block_d: int | None = None, interpret: bool = False) -> Tiling:
    """Chooses chunk, key block, column block and padding; NotImplementedError if unsupported.

    chunk_size and block_d (GPU: output columns per program, a power of two <= D_pad)
    override the defaults, for tuning; None keeps them.
    """
    if backend not in BACKENDS:
        raise NotImplementedError(f"no Pallas feedback-solve kernel for backend {backend!r}; have {BACKENDS}")
    name = jnp.dtype(dtype).name
    if name not in SUPPORTED_DTYPES:
        raise NotImplementedError(f"Pallas feedback solve supports {SUPPORTED_DTYPES}; got {name}")
    if t < 1 or d < 1:
        raise NotImplementedError(f"empty problem T={t}, D={d}")
    for label, value in (("chunk_size", chunk_size), ("block_d", block_d)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{label} must be a positive integer; got {value!r}")
    if backend == "gpu":
        return _gpu_tiling(t, d, name, chunk_size, block_d, interpret)
    tl = _tpu_tiling(t, d, chunk_size, interpret)
    if block_d is not None and block_d != tl.d_padded:
        raise NotImplementedError(
            f"the TPU kernel holds all {tl.d_padded} padded columns per program; block_d={block_d} is GPU-only"
        )
    return tl


def _gpu_tiling(t, d, name, chunk_size, block_d, interpret):
    min_tile = 1 if interpret else 16
    if chunk_size is None:
        chunk = 32 if (name == "float32" and d > 512) else 64
    else:
        chunk = chunk_size
        if chunk & (chunk - 1):
            raise NotImplementedError(f"GPU kernel needs a power-of-two chunk; got {chunk}")
    chunk = max(min_tile, min(chunk, _next_pow2(t)))
    d_pad = max(min_tile, _next_pow2(d))
    if block_d is None:
        block_d = min(d_pad, 128)
    elif block_d & (block_d - 1) or not min_tile <= block_d <= d_pad:
        raise NotImplementedError(
            f"GPU kernel needs block_d a power of two in [{min_tile}, {d_pad}] (D={d} padded to {d_pad}); got {block_d}"
        )
    return Tiling("gpu", chunk, chunk, block_d, _round_up(t, chunk), d_pad)


def _tpu_tiling(t, d, chunk_size, interpret):
    align = 8 if interpret else 128
    chunk = 256 if chunk_size is None else chunk_size
    if chunk % align:
        raise NotImplementedError(f"TPU kernel needs a chunk that is a multiple of {align}; got {chunk}")
    if t <= chunk:
        chunk = _round_up(t, 8)  # a single block covering the whole (padded) sequence
    t_pad = _round_up(t, chunk)
    d_pad = _round_up(d, 128)
    if t_pad * d_pad * 4 > TPU_VMEM_STATE_BYTES:
        raise NotImplementedError(
            f"TPU kernel keeps T x D float32 state in VMEM: T_pad={t_pad}, D_pad={d_pad} needs "
            f"{t_pad * d_pad * 4 / 2**20:.1f} MiB > {TPU_VMEM_STATE_BYTES / 2**20:.0f} MiB"
        )
    return Tiling("tpu", chunk, chunk, d_pad, t_pad, d_pad)
