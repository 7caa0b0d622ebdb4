"""Subprocess body of tests/model/test_sharding_user_model.py (8 fake CPU devices, XLA_FLAGS set first).

    python tests/support/user_model_worker.py OUT.json

A user's own Flax model with MaxText-style logical axis rules wraps two SessaLayer blocks
(and a SessaLM is built with the same names) on meshes of both axis types. For every case
it records the output's sharding, the collectives in the compiled program, the largest
difference from one device, or the error.
"""

import json
import re
import sys

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from sessa_jax import SessaConfig, SessaLayer, SessaLM, sharding

NAMES = ("data", "fsdp", "tensor")
# MaxText's activation names; its parameter names are the ones SessaLayer uses.
USER_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_kv", None),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
)
AXES = {"maxtext": sharding.MAXTEXT_AXES, "default": sharding.DEFAULT_AXES}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
CFG = SessaConfig(d_model=16, n_heads=2, vocab_size=32, n_layers=2, solver="blocked", scan_layers=True)
BTD = ("activation_batch", "activation_length", "activation_embed")


class UserModel(nn.Module):
    """A researcher's model: its own input projection and constraints around two Sessa blocks."""

    axes: sharding.ActivationAxes

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(CFG.d_model, name="user_in")(x)
        x = nn.with_logical_constraint(x, BTD)
        for i in range(2):
            x = SessaLayer(CFG, axes=self.axes, name=f"block_{i}")(x)
        return nn.with_logical_constraint(x, BTD)


def collectives(text: str) -> dict:
    return {name: len(re.findall(re.escape(name) + r"(?:-start)?\(", text)) for name in COLLECTIVES}


def run(model, inputs, axis_type, shape, rules, shard_params):
    mesh = jax.make_mesh(shape, NAMES, axis_types=(axis_type,) * 3)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        inputs = jax.device_put(inputs, NamedSharding(mesh, P(("data", "fsdp"))))
        specs = sharding.param_logical_specs(model, jax.random.PRNGKey(0), inputs)
        out_shardings = nn.logical_to_mesh_sharding(specs, mesh, rules) if shard_params else None
        params = jax.jit(model.init, out_shardings=out_shardings)(jax.random.PRNGKey(0), inputs)
        apply = jax.jit(model.apply)
        out = apply(params, inputs)
        text = apply.lower(params, inputs).compile().as_text()
        w_in = params["params"]["block_0"]["W_in"]["kernel"] if "block_0" in params["params"] else None
        return dict(
            spec=[list(e) if isinstance(e, tuple) else e for e in out.sharding.spec],
            shard=list(out.sharding.shard_shape(out.shape)),
            collectives=collectives(text),
            w_in_shard=None if w_in is None else list(w_in.sharding.shard_shape(w_in.shape)),
        ), np.asarray(out)


def main(out_path):
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 12, CFG.d_model))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (8, 12), 0, CFG.vocab_size)
    refs = {}
    for name, model, inputs in (("layer", UserModel(sharding.DEFAULT_AXES), x), ("lm", SessaLM(CFG), tokens)):
        params = model.init(jax.random.PRNGKey(0), inputs)
        refs[name] = np.asarray(model.apply(params, inputs))
    cases = {}

    def case(key, model_name, axes_name, rules, axis_type, shape, shard_params):
        model = UserModel(AXES[axes_name]) if model_name == "layer" else SessaLM(CFG, axes=AXES[axes_name])
        inputs = x if model_name == "layer" else tokens
        try:
            rec, out = run(model, inputs, axis_type, shape, rules, shard_params)
            rec["max_abs_diff"] = float(np.max(np.abs(out - refs[model_name])))
            rec["ref_scale"] = float(np.max(np.abs(refs[model_name])))
        except Exception as e:  # recorded for the test to show
            rec = dict(error=f"{type(e).__name__}: {e}"[:2000])
        cases[key] = rec

    # Parameters replicated, the batch split: both axis types, MaxText's names or the defaults
    # (which the user's rules do not mention).
    for type_name, axis_type in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
        for mesh_name, shape in (("data=8", (8, 1, 1)), ("data=4,fsdp=2", (4, 2, 1))):
            for model_name in ("layer", "lm") if mesh_name == "data=8" else ("layer",):
                for axes_name in ("maxtext", "default"):
                    case(
                        f"{type_name} {mesh_name} {model_name} axes={axes_name}",
                        model_name,
                        axes_name,
                        USER_RULES,
                        axis_type,
                        shape,
                        False,
                    )
    # Parameters split over fsdp and tensor (Auto axes): the user's names against this package's own.
    shape = (2, 2, 2)
    case("auto sharded layer axes=maxtext", "layer", "maxtext", USER_RULES, AxisType.Auto, shape, True)
    case(
        "auto sharded layer axes=default rules=ours",
        "layer",
        "default",
        sharding.RULES + USER_RULES,
        AxisType.Auto,
        shape,
        True,
    )
    case("auto sharded lm axes=maxtext", "lm", "maxtext", USER_RULES, AxisType.Auto, shape, True)
    case("auto sharded lm axes=default rules=ours", "lm", "default", sharding.RULES, AxisType.Auto, shape, True)
    # An Explicit mesh with split parameters is refused with a message naming the parameter.
    try:
        run(UserModel(sharding.MAXTEXT_AXES), x, AxisType.Explicit, (2, 2, 2), USER_RULES, True)
        cases["explicit sharded params"] = dict(error=None)
    except ValueError as e:
        cases["explicit sharded params"] = dict(error=str(e))
    with open(out_path, "w") as f:
        json.dump(dict(cases=cases, jax=jax.__version__), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
