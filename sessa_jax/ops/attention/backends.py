"""The fastest causal attention each backend offers, for Sessa's forward branch.

`accelerated_causal_attention(q (B,T,H,K), k (B,T,Hkv,K), v, segment_ids=None)` -> (B,T,H,K):
causal (diagonal included), scale K^-1/2, grouped-query heads (H % Hkv == 0), inputs already
RoPE'd. Raises NotImplementedError wherever no accelerated kernel applies, so callers fall
back to the portable blocked attention:

* GPU: `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)` (cuDNN flash
  attention; GQA native). Needs bfloat16/float16 and K <= 128 (multiple of 8). Packed
  `segment_ids` are not expressible through that API: they are accepted only when they are
  concrete and constant (then ignored); traced segment ids raise NotImplementedError, so
  pass segment_ids=None when sequences are not packed.
* TPU: Pallas splash attention (MQA kernel vmapped over batch and kv heads, one per GQA
  group), with `SegmentIds` for packing; T is padded to a multiple of 128 (padding keys
  come after every real query, so causality hides them).
* CPU: NotImplementedError (unless backend="tpu", interpret=True: the splash kernel in
  interpret mode, used by the tests).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _platform(backend):
    if backend is not None:
        return backend
    p = jax.default_backend()
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[-1] != k.shape[-1] or q.shape[:2] != k.shape[:2]:
        raise NotImplementedError(f"accelerated attention: bad shapes q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise NotImplementedError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")


def _constant_segments(segment_ids) -> bool:
    if segment_ids is None:
        return True
    if isinstance(segment_ids, jax.core.Tracer):
        return False
    seg = np.asarray(segment_ids)
    return bool((seg == seg[:, :1]).all())


def _cudnn_attention(q, k, v, segment_ids):
    if jnp.dtype(q.dtype).name not in ("bfloat16", "float16") or not (q.dtype == k.dtype == v.dtype):
        raise NotImplementedError(
            f"cuDNN attention needs bfloat16/float16 q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[-1] > 128 or q.shape[-1] % 8:
        raise NotImplementedError(f"cuDNN attention needs head_dim <= 128, multiple of 8; got {q.shape[-1]}")
    if not _constant_segments(segment_ids):
        raise NotImplementedError("cuDNN path has no packed segment_ids; pass None when not packing")
    try:
        return jax.nn.dot_product_attention(
            q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), is_causal=True, implementation="cudnn"
        )
    except RuntimeError as err:  # e.g. "cuDNN is not detected"
        raise NotImplementedError(f"cuDNN attention unavailable: {err}") from err


def _block(t_pad: int, cap: int = 512) -> int:
    for blk in (cap, 256, 128):
        if blk <= t_pad and t_pad % blk == 0:
            return blk
    return t_pad


def _splash_attention(q, k, v, segment_ids, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, kd = q.shape
    hkv = k.shape[2]
    grp = h // hkv
    t_pad = -(-t // 128) * 128
    pad = lambda x: jnp.pad(x, [(0, 0), (0, t_pad - t)] + [(0, 0)] * (x.ndim - 2))
    blk = _block(t_pad)
    sizes = sk.BlockSizes(
        block_q=blk,
        block_kv=blk,
        block_kv_compute=blk,
        block_q_dkv=blk,
        block_kv_dkv=blk,
        block_kv_dkv_compute=blk,
        block_q_dq=blk,
        block_kv_dq=blk,
    )
    mask = sm.MultiHeadMask([sm.CausalMask((t_pad, t_pad)) for _ in range(grp)])
    kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    # (B, T, Hkv, G, K) -> (B, Hkv, G, T, K); k, v -> (B, Hkv, T, K)
    qg = pad(q * (1.0 / math.sqrt(kd))).astype(q.dtype).reshape(b, t_pad, hkv, grp, kd).transpose(0, 2, 3, 1, 4)
    kk, vv = (pad(x).transpose(0, 2, 1, 3) for x in (k, v))
    if segment_ids is None:
        per_kv = jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh))
        out = jax.vmap(per_kv)(qg, kk, vv)
    else:
        seg = pad(segment_ids.astype(jnp.int32))
        per_kv = jax.vmap(
            lambda qh, kh, vh, s: kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=s, kv=s)), in_axes=(0, 0, 0, None)
        )
        out = jax.vmap(per_kv)(qg, kk, vv, seg)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t_pad, h, kd)[:, :t].astype(v.dtype)


def accelerated_causal_attention(q, k, v, segment_ids=None, *, backend=None, interpret=False):
    """Causal GQA attention with the backend's fused kernel; NotImplementedError where none."""
    _check_shapes(q, k, v)
    platform = _platform(backend)
    if platform == "gpu" and not interpret:
        return _cudnn_attention(q, k, v, segment_ids)
    if platform == "tpu":
        return _splash_attention(q, k, v, segment_ids, interpret)
    raise NotImplementedError(f"no accelerated causal attention for platform {platform!r}")
