"""A dense layer whose output is used in equal column groups, each group its own product."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class SplitDense(nn.Module):
    """``nn.Dense(features)`` whose output columns come back as ``groups`` equal parts.

    ``x (..., d_in)`` -> a tuple of ``groups`` arrays ``(..., features // groups)`` in ``dtype``:
    part i is ``x @ kernel[:, i w:(i+1) w] + bias[i w:(i+1) w]`` with ``w = features // groups``,
    the values ``jnp.split(nn.Dense(features)(x), groups, -1)`` gives. The parameters (``kernel``
    (d_in, features), ``bias`` (features,)) and their initialisers are ``nn.Dense``'s, so
    checkpoints and converted weights load unchanged.

    Each part is its own product, so no (..., features) result is split into copies in the
    forward pass and no gradient is concatenated back into one in the backward pass; the
    parts' products with ``x`` are what a fused product would compute.

    ``unbiased_parts``: indices of parts returned without their bias slice (for a caller in
    whose result that slice cancels); the parameter keeps its full shape, so checkpoints still
    load, and the unused slice gets a zero gradient.
    """

    features: int
    groups: int
    unbiased_parts: tuple[int, ...] = ()
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        if self.features % self.groups:
            raise ValueError(f"SplitDense: features={self.features} is not a multiple of groups={self.groups}")
        if any(not 0 <= i < self.groups for i in self.unbiased_parts):
            raise ValueError(f"SplitDense: unbiased_parts={self.unbiased_parts} must index the {self.groups} parts")
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        width = self.features // self.groups
        parts = []
        for i in range(self.groups):
            columns = slice(i * width, (i + 1) * width)
            y = jax.lax.dot_general(x, kernel[:, columns], (((x.ndim - 1,), (0,)), ((), ())))
            parts.append(y if i in self.unbiased_parts else y + bias[columns])
        return tuple(parts)
