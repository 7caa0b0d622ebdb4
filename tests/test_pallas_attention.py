"""accelerated_causal_attention: CPU refuses; the TPU splash path matches the dense oracle in
interpret mode (GQA, packed segments, T not a multiple of 128), forward and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.ops import causal_attention
from sessa_jax.ops.attention.backends import accelerated_causal_attention


def _inputs(b=2, t=130, h=4, hkv=2, kd=16):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (b, t, h, kd))
    k = jax.random.normal(ks[1], (b, t, hkv, kd))
    v = jax.random.normal(ks[2], (b, t, hkv, kd))
    seg = jnp.cumsum(jax.random.bernoulli(ks[3], 0.05, (b, t)), axis=1).astype(jnp.int32)
    return q, k, v, seg


def test_cpu_raises_not_implemented():
    q, k, v, seg = _inputs(t=8)
    if jax.default_backend() == "cpu":
        with pytest.raises(NotImplementedError):
            accelerated_causal_attention(q, k, v, seg)
    with pytest.raises(NotImplementedError):
        accelerated_causal_attention(q, k, v, seg, backend="gpu")  # float32 / no cuDNN / traced-free segs


def test_splash_interpret_matches_dense():
    q, k, v, seg = _inputs()
    r = jax.random.normal(jax.random.PRNGKey(1), q.shape)
    fast = lambda q, k, v: accelerated_causal_attention(q, k, v, seg, backend="tpu", interpret=True)
    ref = lambda q, k, v: causal_attention(q, k, v, segment_ids=seg, method="dense")
    with jax.default_matmul_precision("highest"):
        o1, vjp1 = jax.vjp(fast, q, k, v)
        o0, vjp0 = jax.vjp(ref, q, k, v)
        for got, want in zip((o1, *vjp1(r)), (o0, *vjp0(r))):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
