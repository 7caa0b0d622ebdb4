"""Subprocess body of tests/model/test_sharding_mesh.py and tests/train/test_multiprocess.py,
run with XLA_FLAGS set before JAX starts.

    python tests/support/sharding_worker.py meshes OUT.json        # 8 fake devices: parity, shards, restore
    python tests/support/sharding_worker.py train OUT.json WORKDIR [PROCESS_ID PORT]   # the loop, 1 or 2 processes
"""

import json
import os
import sys

import jax
import numpy as np

from sessa_jax import sharding
from sessa_jax.data import TRAIN, global_batch, make_iterator
from sessa_jax.train import checkpoint as ckpt
from sessa_jax.train.config import load_config
from sessa_jax.train.optimizer import make_optimizer
from sessa_jax.train.state import abstract_state, build_model, create_state, state_shardings
from sessa_jax.train.step import make_train_step

MESHES = {
    "1": ({}, 1),
    "data=8": ({"data": 8}, 8),
    "data=4,tensor=2": ({"data": 4, "tensor": 2}, 8),
    "fsdp=8": ({"data": 1, "fsdp": 8}, 8),
    "data=2,fsdp=2,tensor=2": ({"data": 2, "fsdp": 2, "tensor": 2}, 8),
}
WATCH = (
    "params/embed/embedding",
    "params/layers_0/W_in/kernel",
    "params/layers_0/W_out/kernel",
    "params/layers_0/mixer/q_proj/kernel",
    "params/layers_0/mixer/proj_fb/kernel",
    "params/layers_0/mixer/out_proj/kernel",
)
STEPS = 5


def setup(cfg, axes, n_devices):
    mesh = sharding.make_mesh(axes, jax.devices()[:n_devices])
    model, tx = build_model(cfg), make_optimizer(cfg.optim, cfg.train.steps)
    shardings = state_shardings(model, tx, cfg.train.seed, cfg.data.seq_len, mesh)
    return mesh, model, tx, shardings


def run_steps(cfg, mesh, state, shardings, n):
    step_fn = make_train_step(shardings, sharding.batch_sharding(mesh))
    it, losses = make_iterator(cfg.data, TRAIN), []
    with sharding.activate(mesh):
        for _ in range(n):
            state, m = step_fn(state, global_batch(next(it), sharding.batch_sharding(mesh)))
            losses.append(float(m["loss"]))
    return state, losses


def meshes(out_path):
    cfg = load_config("tiny")
    out = {"losses": {}, "shards": {}, "opt_shards": {}}
    saved = None
    for name, (axes, n) in MESHES.items():
        mesh, model, tx, shardings = setup(cfg, axes, n)
        state = create_state(model, tx, cfg.train.seed, cfg.data.seq_len, sharding=shardings)
        state, losses = run_steps(cfg, mesh, state, shardings, STEPS)
        out["losses"][name] = losses
        shapes = sharding.shard_shapes(state.params)
        out["shards"][name] = {k: shapes[k] for k in WATCH}
        mu = sharding.shard_shapes(state.opt_state[1][0].mu)
        out["opt_shards"][name] = mu["params/layers_0/W_in/kernel"]
        if name == "data=2,fsdp=2,tensor=2":  # save under 8 devices, restore under 4 and 1
            workdir = os.path.join(os.path.dirname(out_path), "ckpt")
            manager = ckpt.make_manager(workdir, async_save=False)
            ckpt.save(manager, state, make_iterator(cfg.data, TRAIN), cfg.to_dict(), force=True)
            manager.wait_until_finished()
            saved = jax.tree_util.tree_map(np.asarray, state.params)
    out["restore"] = {}
    for name, axes, n in (("4 devices data=2,tensor=2", {"data": 2, "tensor": 2}, 4), ("1 device", {}, 1)):
        mesh, model, tx, shardings = setup(cfg, axes, n)
        it = make_iterator(cfg.data, TRAIN)
        state = ckpt.restore(manager, abstract_state(model, tx, cfg.train.seed, cfg.data.seq_len, shardings), it)
        same = all(
            np.array_equal(a, np.asarray(b))
            for a, b in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(state.params))
        )
        devices = len(state.params["params"]["embed"]["embedding"].sharding.device_set)
        state, losses = run_steps(cfg, mesh, state, shardings, 2)
        out["restore"][name] = dict(identical=same, devices=devices, step=int(state.step), losses=losses)
    manager.close()
    with open(out_path, "w") as f:
        json.dump(out, f)


def train_run(out_path, workdir, process_id=None, port=None):
    from sessa_jax.train.loop import train

    overrides = ["train.steps=4", "optim.warmup_steps=1", "train.eval_batches=1", "train.progress=False"]
    if process_id is not None:
        overrides += [
            f"distributed.coordinator_address=localhost:{port}",
            "distributed.num_processes=2",
            f"distributed.process_id={process_id}",
        ]
    cfg = load_config("tiny", overrides)
    logs = []
    result = train(cfg, workdir, log=logs.append)
    with open(out_path, "w") as f:
        json.dump(
            dict(
                loss=result.train["loss"],
                step=result.step,
                processes=jax.process_count(),
                devices=jax.device_count(),
                logs=logs,
            ),
            f,
        )


if __name__ == "__main__":
    if sys.argv[1] == "meshes":
        meshes(sys.argv[2])
    else:
        pid = int(sys.argv[4]) if len(sys.argv) > 4 else None
        train_run(sys.argv[2], sys.argv[3], pid, sys.argv[5] if pid is not None else None)
