"""The pure tiling function of the Pallas feedback-solve kernels."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from sessa_jax.ops import tiling


def test_gpu_defaults():
    tl = tiling.compute_tiling(4096, 1024, jnp.bfloat16, "gpu")
    assert (tl.chunk, tl.key_block, tl.block_d, tl.t_padded, tl.d_padded) == (64, 64, 128, 4096, 1024)
    assert tl.num_chunks == 64
    assert tiling.compute_tiling(4096, 1024, jnp.float32, "gpu").chunk == 32  # fp32 tiles at large D


def test_gpu_padding_and_small_t():
    tl = tiling.compute_tiling(1000, 48, jnp.float32, "gpu", 128)
    assert (tl.chunk, tl.t_padded, tl.d_padded, tl.block_d) == (128, 1024, 64, 64)
    tl = tiling.compute_tiling(5, 8, jnp.float32, "gpu")  # real GPU: tiles >= 16
    assert (tl.chunk, tl.t_padded, tl.d_padded) == (16, 16, 16)
    tl = tiling.compute_tiling(5, 8, jnp.float32, "gpu", 8, interpret=True)
    assert (tl.chunk, tl.t_padded, tl.d_padded) == (8, 8, 8)
    tl = tiling.compute_tiling(1, 8, jnp.float32, "gpu", 8, interpret=True)
    assert (tl.chunk, tl.t_padded) == (1, 1)
    with pytest.raises(NotImplementedError):
        tiling.compute_tiling(64, 8, jnp.float32, "gpu", 24)


def test_tpu_rules():
    tl = tiling.compute_tiling(4096, 1000, jnp.bfloat16, "tpu")
    assert (tl.chunk, tl.t_padded, tl.d_padded, tl.block_d) == (256, 4096, 1024, 1024)
    tl = tiling.compute_tiling(100, 64, jnp.float32, "tpu")  # one full-array block
    assert (tl.chunk, tl.t_padded, tl.d_padded) == (104, 104, 128)
    with pytest.raises(NotImplementedError):
        tiling.compute_tiling(4096, 256, jnp.float32, "tpu", 64)  # not a multiple of 128
    assert tiling.compute_tiling(37, 16, jnp.float32, "tpu", 8, interpret=True).t_padded == 40
    with pytest.raises(NotImplementedError, match="VMEM"):
        tiling.compute_tiling(65536, 1024, jnp.bfloat16, "tpu")


def test_rejections():
    for args in [(64, 8, jnp.float64, "gpu"), (64, 8, jnp.int32, "tpu"), (64, 8, jnp.float32, "cpu")]:
        with pytest.raises(NotImplementedError):
            tiling.compute_tiling(*args)
    with pytest.raises(ValueError):
        tiling.compute_tiling(64, 8, jnp.float32, "gpu", 0)


def test_block_d_override():
    tl = tiling.compute_tiling(4096, 1024, jnp.bfloat16, "gpu", block_d=256)
    assert (tl.chunk, tl.block_d, tl.d_padded) == (64, 256, 1024)
    assert tiling.compute_tiling(100, 40, jnp.float32, "gpu", block_d=64).block_d == 64  # D padded to 64
    for bad in (96, 8, 2048):  # not a power of two; below the 16-wide tile; above D_pad
        with pytest.raises(NotImplementedError, match="block_d"):
            tiling.compute_tiling(4096, 1024, jnp.bfloat16, "gpu", block_d=bad)
    with pytest.raises(ValueError, match="block_d"):
        tiling.compute_tiling(64, 8, jnp.float32, "gpu", block_d=0)
    assert tiling.compute_tiling(512, 256, jnp.float32, "tpu", block_d=256).block_d == 256
    with pytest.raises(NotImplementedError, match="GPU-only"):
        tiling.compute_tiling(512, 256, jnp.float32, "tpu", block_d=128)
