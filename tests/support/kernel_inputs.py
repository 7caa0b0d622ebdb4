"""Inputs shared by the Pallas kernel tests (TPU and GPU kernels against their XLA twins)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def kernel_segments(b: int, t: int):
    """(b, t) segment ids: a long document, a one-token document, then the rest (batch row 1
    splits the rest again at 200): empty rows at 0 and at the one-token document."""
    seg = np.full((b, t), 2, np.int32)
    seg[:, :150] = 0
    seg[:, 150] = 1
    seg[1, 200:] = 3
    return jnp.asarray(seg)


def normal(key: int, shape, dtype=jnp.float32):
    """Standard normal array of ``shape`` from ``PRNGKey(key)``, cast to ``dtype``."""
    return jax.random.normal(jax.random.PRNGKey(key), shape).astype(dtype)
