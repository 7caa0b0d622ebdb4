"""Meshes that cannot fit the devices, the batch, the heads or the width fail before
compiling, with messages that name the values."""

import pytest
from jax.sharding import AbstractMesh

from sessa_jax.config import SessaConfig
from sessa_jax.sharding import MESH_AXES, MeshError, mesh_shape, validate_mesh
from sessa_jax.train.config import ConfigError, load_config

CFG = SessaConfig(d_model=48, n_heads=6, n_kv_heads=3, vocab_size=64)


def mesh(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), MESH_AXES)


def test_mesh_shape_fills_minus_one():
    assert mesh_shape({"data": -1, "tensor": 2}, 8) == (4, 1, 2)
    assert mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 16) == (2, 4, 2)


@pytest.mark.parametrize(
    "axes,n,msg",
    [
        ({"data": 2, "fsdp": 1, "tensor": 2}, 8, r"data=2, fsdp=1, tensor=2 has 4 devices but there are 8 devices"),
        ({"data": -1, "tensor": 3}, 8, r"need a multiple of 3 devices, but there are 8 devices"),
        ({"data": -1, "fsdp": -1}, 8, r"at most one mesh axis may be -1"),
    ],
)
def test_mesh_vs_device_count(axes, n, msg):
    with pytest.raises(MeshError, match=msg):
        mesh_shape(axes, n)


@pytest.mark.parametrize(
    "m,batch,msg",
    [
        (mesh(data=4, fsdp=2), 12, r"global batch 12 is not divisible by grad_accum x data x fsdp = 1 x 4 x 2 = 8"),
        (mesh(tensor=4), 8, r"model n_heads=6 is not divisible by the tensor axis \(tensor=4\)"),
        (mesh(tensor=2), 8, r"model kv_heads=3 is not divisible by the tensor axis \(tensor=2\)"),
        (mesh(fsdp=32), 32, r"model d_model=48 is not divisible by the fsdp axis \(fsdp=32\)"),
    ],
)
def test_validate_mesh_names_values(m, batch, msg):
    with pytest.raises(MeshError, match=msg):
        validate_mesh(m, CFG, batch, process_count=1)


def test_width_and_vocab_vs_tensor():
    # with heads, width follows (d_model = n_heads x K); the Mamba baseline has no heads
    with pytest.raises(MeshError, match=r"model d_model=48 is not divisible by the tensor axis \(tensor=32\)"):
        validate_mesh(mesh(tensor=32), CFG, 32, process_count=1, kind="mamba")
    with pytest.raises(MeshError, match=r"model vocab_size=60 is not divisible by the tensor axis \(tensor=8\)"):
        validate_mesh(
            mesh(tensor=8), CFG.replace(d_model=64, n_heads=8, n_kv_heads=None, vocab_size=60), 8, process_count=1
        )


def test_run_config_checks_mesh_and_batch():
    with pytest.raises(ConfigError, match=r"mesh: mesh data=2, fsdp=1, tensor=2 has 4 devices but there are 8"):
        from sessa_jax.train.config import validate

        validate(load_config("tiny", ["mesh.data=2", "mesh.tensor=2"]), device_count=8)
    with pytest.raises(ConfigError, match=r"batch_size=8 must be divisible by .* = 1 x 16 = 16"):
        load_config("tiny", ["mesh.data=16"])
    load_config("tiny", ["mesh.data=2", "mesh.tensor=4"])  # tensor does not split the batch
