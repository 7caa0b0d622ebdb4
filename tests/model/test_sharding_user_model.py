"""SessaLayer / SessaLM inside a user's own model whose logical axis rules use other names
(MaxText's ``activation_batch``, ...): 8 fake CPU devices in one subprocess, meshes of both
axis types (jax.make_mesh builds Explicit axes by default). The batch split survives the
layer, the compiled program gains no collective, and the numbers match one device.
Plus, in this process: the axis-name settings and the parameters' logical names."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sessa_jax import SessaConfig, SessaLayer, SessaLM, sharding
from tests.support.processes import TIMEOUT_S
from tests.support.shared import built_once
from tests.support.workers import worker_env

WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "user_model_worker.py")
TOL = 64 * float(np.finfo(np.float32).eps)  # float32 sums in another order, relative to the output's scale
REPLICATED = [
    f"{t} {m} {model} axes={axes}"
    for t in ("explicit", "auto")
    for m, models in (("data=8", ("layer", "lm")), ("data=4,fsdp=2", ("layer",)))
    for model in models
    for axes in ("maxtext", "default")
]
BATCH_AXES = {"data=8": {"data"}, "data=4,fsdp=2": {"data", "fsdp"}}


def _run_worker(folder) -> dict:
    out = folder / "out.json"
    proc = subprocess.run(
        [sys.executable, WORKER, str(out)], env=worker_env(8), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
    return json.loads(out.read_text())["cases"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    # Once per session: when xdist hands this module's tests to both workers, a module fixture
    # would run the minute-long worker in each.
    return built_once(tmp_path_factory, "sharding-user-model", _run_worker)[1]


def batch_axes(spec_entry) -> set:
    return set() if spec_entry is None else {spec_entry} if isinstance(spec_entry, str) else set(spec_entry)


def check_output(rec, batch_split: set, rows: int):
    assert "error" not in rec, rec.get("error")
    assert batch_axes(rec["spec"][0]) >= batch_split, rec["spec"]  # the batch stays split ...
    assert rec["shard"][0] == rows  # ... into these per-device rows
    assert rec["max_abs_diff"] <= TOL * rec["ref_scale"], rec


@pytest.mark.parametrize("key", REPLICATED)
def test_batch_split_kept_without_collectives(cases, key):
    """``axes=MAXTEXT_AXES`` follows the user's rules; the default names, which those rules do
    not mention, leave the layout to the user's constraints instead of replicating it."""
    rec = cases[key]
    mesh = key.split()[1]
    check_output(rec, BATCH_AXES[mesh], 1)  # 8 rows over 8 devices
    assert rec["collectives"] == dict.fromkeys(rec["collectives"], 0), rec["collectives"]


@pytest.mark.parametrize("model", ["layer", "lm"])
def test_split_params_compile_like_own_rules(cases, model):
    """data=2 x fsdp=2 x tensor=2 (Auto axes), parameters split by their logical names: the
    user's names give the same collectives as this package's own rules."""
    theirs, ours = cases[f"auto sharded {model} axes=maxtext"], cases[f"auto sharded {model} axes=default rules=ours"]
    for rec in (theirs, ours):
        check_output(rec, {"data", "fsdp"}, 2)
    assert theirs["collectives"] == ours["collectives"]
    if model == "layer":
        assert theirs["w_in_shard"] == [16 // 2, 2 * 16 // 2]  # W_in (embed -> fsdp, mlp -> tensor)
        assert theirs["spec"][1:] in ([], [None, None])  # the residual stream is not split over tensor


def test_explicit_mesh_refuses_split_params(cases):
    err = cases["explicit sharded params"]["error"]
    assert err and "SessaLayer: parameter 'W_in/" in err and "Explicit" in err and "AxisType.Auto" in err


# In this process --------------------------------------------------------------------------
CFG = SessaConfig(d_model=16, n_heads=2, n_kv_heads=1, vocab_size=32, n_layers=2, solver="blocked")


def test_activation_axes_names():
    axes = sharding.ActivationAxes(batch="b", length=None, mlp="w")
    assert axes.btd == ("b", None, "act_embed") and axes.btw == ("b", None, "w")
    assert axes.bthk == ("b", None, "act_heads", None) and axes.btkv == ("b", None, "act_heads", None)
    assert sharding.MAXTEXT_AXES.btd == ("activation_batch", "activation_length", "activation_embed")
    assert sharding.MAXTEXT_AXES.btkv == (
        "activation_batch",
        "activation_length",
        "activation_kv_heads",
        "activation_kv",
    )
    # a module attribute of models passed to jax.jit as static arguments: hashable, compared by value
    assert hash(SessaLayer(CFG, axes=sharding.ActivationAxes())) == hash(SessaLayer(CFG))
    with pytest.raises(TypeError, match=r"ActivationAxes.batch must be a logical axis name \(str\) or None; got 3"):
        sharding.ActivationAxes(batch=3)


def test_param_logical_specs_layer():
    x = jnp.zeros((1, 4, CFG.d_model))
    specs = sharding.param_logical_specs(SessaLayer(CFG), jax.random.PRNGKey(0), x)["params"]
    assert specs["W_in"] == {"kernel": P("embed", "mlp"), "bias": P("mlp")}
    assert specs["W_out"]["kernel"] == P("mlp", "embed")
    assert specs["ln"] == {"scale": P("norm"), "bias": P("norm")}
    m = specs["mixer"]
    assert m["q_proj"]["kernel"] == P("embed", "heads") and m["k_proj"]["kernel"] == P("embed", "kv_heads")
    assert m["out_proj"]["kernel"] == P("heads", "embed") and m["proj_fb"]["kernel"] == P("embed", "mlp")
    assert m["gamma_ctx"]["kernel"] == P("embed", None) and m["gamma_bias"] == P()
    # init itself still returns plain arrays, with the same values
    plain = SessaLayer(CFG).init(jax.random.PRNGKey(0), x)
    assert isinstance(plain["params"]["W_in"]["kernel"], jax.Array)


@pytest.mark.parametrize("scan", [False, True])
def test_param_logical_specs_lm(scan):
    cfg = CFG.replace(scan_layers=scan)
    specs = sharding.param_logical_specs(SessaLM(cfg), jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    specs = specs["params"]
    assert specs["embed"]["embedding"] == P("vocab", "embed") and specs["norm_f"]["scale"] == P("norm")
    block = specs["layers"] if scan else specs["layers_0"]
    assert block["W_in"]["kernel"] == (P("layers", "embed", "mlp") if scan else P("embed", "mlp"))


def test_constrain_is_a_noop_without_rules_or_mesh():
    x = jnp.arange(6.0).reshape(1, 2, 3)
    assert sharding.constrain(x, sharding.BTD) is x
    import flax.linen as nn

    with nn.logical_axis_rules(sharding.RULES):  # rules but no mesh
        assert sharding.constrain(x, sharding.BTD) is x
