"""8 fake CPU devices (one subprocess, compiled once per mesh): the loss of `tiny` matches
one device on every mesh, the large weights really are split, and a checkpoint saved on
8 devices restores bit-identically on 4 and on 1 and trains on."""

import numpy as np
import pytest

from tests.support.shared import built_once
from tests.support.workers import finish, start

MESHES = ("data=8", "data=4,tensor=2", "fsdp=8", "data=2,fsdp=2,tensor=2")
D, V, HK = 32, 32, 32  # tiny: d_model, vocab, n_heads * head_dim


def _run_worker(folder) -> dict:
    out = folder / "out.json"  # the worker's checkpoints go beside it
    return finish(start(["meshes", out], devices=8), out)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    # Once per session: when xdist hands this module's tests to both workers, a module fixture
    # would run the minute-long worker in each.
    return built_once(tmp_path_factory, "sharding-mesh", _run_worker)[1]


@pytest.mark.parametrize("mesh", MESHES)
def test_loss_matches_one_device(result, mesh):
    ref, got = result["losses"]["1"], result["losses"][mesh]
    assert len(got) == 5
    # float32 reductions in another order: relative 1e-5
    np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize(
    "mesh,fsdp,tp",
    [("1", 1, 1), ("data=8", 1, 1), ("data=4,tensor=2", 1, 2), ("fsdp=8", 8, 1), ("data=2,fsdp=2,tensor=2", 2, 2)],
)
def test_weights_are_sharded(result, mesh, fsdp, tp):
    s = {k.split("/", 1)[1]: tuple(v) for k, v in result["shards"][mesh].items()}
    assert s["embed/embedding"] == (V // tp, D // fsdp)  # (vocab, embed)
    assert s["layers_0/W_in/kernel"] == (D // fsdp, 2 * D // tp)  # column-parallel
    assert s["layers_0/mixer/proj_fb/kernel"] == (D // fsdp, 2 * D // tp)  # feedback width
    assert s["layers_0/mixer/q_proj/kernel"] == (D // fsdp, HK // tp)  # heads
    assert s["layers_0/mixer/out_proj/kernel"] == (HK // tp, D // fsdp)  # row-parallel
    assert s["layers_0/W_out/kernel"] == (D // tp, D // fsdp)  # row-parallel
    assert tuple(result["opt_shards"][mesh]) == (D // fsdp, 2 * D // tp)  # Adam moments follow


@pytest.mark.parametrize("target,devices", [("4 devices data=2,tensor=2", 4), ("1 device", 1)])
def test_checkpoint_restores_on_smaller_mesh(result, target, devices):
    r = result["restore"][target]
    assert r["identical"] and r["devices"] == devices
    assert r["step"] == 5 + 2 and all(np.isfinite(r["losses"]))
    # training continues identically whichever mesh it resumed on
    np.testing.assert_allclose(r["losses"], result["restore"]["1 device"]["losses"], rtol=1e-5)
