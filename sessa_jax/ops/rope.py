"""Interleaved rotary position embedding (dims 2i and 2i+1 rotate together)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_inv_freq(head_dim: int, base: float = 10000.0):
    """inv_freq_i = base^(-2i/K) for i in [0, K/2): (K/2,) float32.

    The exponent -2i/K is rounded to float32 exactly as the published layer's float32
    buffer does; wider runs upcast these float32 values, which keeps x64 parity at 1e-16.
    """
    exponent = (-2.0 * jnp.arange(head_dim // 2, dtype=jnp.float32)) / jnp.float32(head_dim)
    return jnp.power(jnp.float32(base), exponent)


def apply_rope(x, positions, base: float = 10000.0):
    """Rotates x (B, T, H, K) by angle positions[b, t] * inv_freq_i on interleaved pairs.

    positions: (B, T) or (T,) integer positions. Computed in float32 (or wider when x is
    float64) and returned in x.dtype.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"apply_rope needs an even head width; got {x.shape[-1]}")
    dt = jnp.promote_types(x.dtype, jnp.float32)
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None, :]
    inv = rope_inv_freq(x.shape[-1], base).astype(dt)
    angle = positions.astype(dt)[..., None] * inv  # (B, T, K/2)
    cos = jnp.cos(angle)[:, :, None, :]
    sin = jnp.sin(angle)[:, :, None, :]
    xf = x.astype(dt)
    x_even, x_odd = xf[..., 0::2], xf[..., 1::2]
    out_even = x_even * cos - x_odd * sin
    out_odd = x_even * sin + x_odd * cos
    return jnp.stack([out_even, out_odd], axis=-1).reshape(x.shape).astype(x.dtype)


def segment_positions(segment_ids):
    """Positions that restart at 0 at each segment start: (B, T) int32.

    A segment starts at t = 0 and wherever segment_ids[t] != segment_ids[t - 1].
    """
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


def resolve_positions(segment_ids, positions, batch: int, length: int):
    """RoPE positions (B, T): given ones, else restarting per segment, else 0..T-1."""
    if positions is not None:
        positions = jnp.asarray(positions)
        if positions.ndim == 1:
            positions = jnp.broadcast_to(positions, (batch, length))
        if tuple(positions.shape) != (batch, length):
            raise ValueError(
                f"positions must have shape (batch, time) = {(batch, length)}; got {tuple(positions.shape)}"
            )
        return positions
    if segment_ids is not None:
        return segment_positions(segment_ids)
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
