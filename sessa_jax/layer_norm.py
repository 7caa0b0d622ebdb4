"""LayerNorm with a hand-written backward, as a drop-in for ``flax.linen.LayerNorm``.

Same parameters ('scale', 'bias' of shape (D,)), same initialisers and the same forward
value up to float32 rounding (centred variance, as the published PyTorch layer computes it).
The backward is written out because autodiff of the textbook forward costs ~2.5x more on
XLA's CPU backend (its fused column reductions for the parameter gradients are slow:
benchmarks/vs_reference.py); here the (B*T, D) -> (D,) reductions are matrix-vector
products, and so are the row sums of products (``row_dot``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sessa_jax.ops.masks import row_dot


def _stats(x, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    inv_std = jax.lax.rsqrt(row_dot(centred, centred, keepdims=True) / x.shape[-1] + eps)
    return centred * inv_std, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis.

    x (..., D) float32 or wider (the statistics' dtype); scale, bias (D,). Returns x.dtype.
    """
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    x_hat, inv_std = _stats(x, eps)
    return x_hat * scale.astype(x.dtype) + bias.astype(x.dtype), (x_hat, inv_std, scale, bias)


def _layer_norm_bwd(eps, res, dy):
    x_hat, inv_std, scale, bias = res
    width = dy.shape[-1]
    ones = jnp.ones((dy.size // width,), dy.dtype)
    hi = jax.lax.Precision.HIGHEST
    d_scale = jnp.dot(ones, (dy * x_hat).reshape(-1, width), precision=hi)
    d_bias = jnp.dot(ones, dy.reshape(-1, width), precision=hi)
    g = dy * scale.astype(dy.dtype)
    mean_g_xhat = row_dot(g, x_hat, keepdims=True) / width
    dx = inv_std * (g - jnp.mean(g, axis=-1, keepdims=True) - x_hat * mean_g_xhat)
    return dx, d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """Linen LayerNorm over the last axis with ``layer_norm``'s backward.

    Parameters 'scale' and 'bias' (D,) in ``param_dtype``, created by ``scale_init`` and
    ``bias_init`` (flax.linen.LayerNorm's names, so checkpoints are interchangeable); the
    statistics run in ``dtype`` (pass float32 or wider), x is cast to it first.
    """

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scale_init: nn.initializers.Initializer = nn.initializers.ones_init()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        scale = self.param("scale", self.scale_init, (width,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (width,), self.param_dtype)
        return layer_norm(x.astype(self.dtype), scale, bias, self.epsilon)
