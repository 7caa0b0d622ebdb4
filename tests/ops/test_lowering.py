"""Cross-platform lowering on a CPU-only machine: the recursive solve and the vendor attention.

* The recursive feedback solve (pure XLA) lowers for "cuda" and "tpu" (forward + backward of
  jax.grad), with the GPU's bf16x3 split rounded on the bits (``precision.bf16_round_bits``) and
  the TPU's HIGH precision in the module,
  and no array with two dimensions >= T/2 in it. This runs JAX's lowering, not the device
  compiler, which needs the device; skipped with the reason if the installed JAX cannot.
* splash attention lowers for "tpu" and cuDNN attention for "cuda".
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from sessa_jax.ops.attention.backends import accelerated_causal_attention
from sessa_jax.ops.solve.recursive import recursive_feedback_solve

SD = jax.ShapeDtypeStruct
T = 1024
_SHAPE = re.compile(r"tensor<([0-9x]+)x[a-z]")


def lower_or_skip(fn, args, platform):
    try:
        return fn.trace(*args).lower(lowering_platforms=(platform,))
    except Exception as err:  # noqa: BLE001 - report why the installed JAX cannot
        pytest.skip(f"lowering for {platform} not supported here: {type(err).__name__}: {err}"[:500])


def _long_shapes(text: str, length: int):
    out = set()
    for m in _SHAPE.finditer(text):
        dims = [int(x) for x in m.group(1).split("x")]
        if sum(d >= length for d in dims) >= 2:
            out.add(m.group(0))
    return out


@pytest.mark.parametrize(
    "platform,kind,marker",
    [
        ("cuda", "gpu", "stablehlo.shift_right_logical"),  # the bit-rounded hi/lo split
        ("tpu", "tpu", "HIGH"),
    ],
)
def test_recursive_solve_lowers(platform, kind, marker):
    b, d = 2, 128
    seg = jnp.ones((b, T), jnp.int32)

    def loss(q, k, g, f):
        s = recursive_feedback_solve(
            q, k, g, f, seg, leaf_size=128, tile=256, tier="bf16x3", platform=kind, dtype=jnp.float32
        )
        return jnp.sum(s)

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    x = SD((b, T, d), jnp.bfloat16)
    text = lower_or_skip(fn, (x, x, SD((b, T), jnp.float32), x), platform).as_text()
    assert marker in text
    if kind == "gpu":  # the leaf products in XLA's BF16_BF16_F32_X3 preset (precision.leaf_dot)
        assert "num_primitive_operations = 3" in text
    assert _long_shapes(text, T // 2) == set()


def test_splash_attention_lowers_for_tpu():
    b, t, h, hkv, kd = 2, 256, 4, 2, 128
    fn = jax.jit(
        jax.grad(
            lambda q, k, v, s: jnp.sum(accelerated_causal_attention(q, k, v, s, backend="tpu").astype(jnp.float32)),
            argnums=(0, 1, 2),
        )
    )
    args = (
        SD((b, t, h, kd), jnp.bfloat16),
        SD((b, t, hkv, kd), jnp.bfloat16),
        SD((b, t, hkv, kd), jnp.bfloat16),
        SD((b, t), jnp.int32),
    )
    assert "tpu_custom_call" in lower_or_skip(fn, args, "tpu").as_text()


def test_cudnn_attention_lowers_for_cuda():
    b, t, h, hkv, kd = 2, 256, 4, 2, 64
    fn = jax.jit(lambda q, k, v: accelerated_causal_attention(q, k, v, None, backend="gpu"))
    args = (SD((b, t, h, kd), jnp.bfloat16), SD((b, t, hkv, kd), jnp.bfloat16), SD((b, t, hkv, kd), jnp.bfloat16))
    try:
        fn.trace(*args).lower(lowering_platforms=("cuda",))
    except NotImplementedError as err:  # jax checks the local cuDNN at trace time
        pytest.skip(f"cuDNN attention cannot be lowered without a local cuDNN: {err}")
