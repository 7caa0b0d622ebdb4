"""Ahead-of-time compile report: per-device memory of a config's train step on a mesh.

Nothing runs and nothing is allocated: the state and batch are ``jax.ShapeDtypeStruct``s
carrying their shardings, the step is lowered and compiled, and XLA's
``memory_analysis()`` gives the per-device bytes. Without the target hardware it uses
fake CPU devices (``--devices``; XLA_FLAGS is set here, before JAX starts) or, with
``--topology`` (e.g. ``v5e:4x4``, needs libtpu), a TPU topology description.

    python scripts/aot_memory.py --config=paper_350m --mesh data=1,fsdp=-1,tensor=1 \\
        --devices 16 --seq_len 2048 --tensor 1,2,4,8

One row per ``--tensor`` value (the -1 axis absorbs the rest of the devices) and
``--loss_chunk`` value (0 = dense loss with full (B, T, V) logits; N = N positions at a time):

    python scripts/aot_memory.py --config=paper_125m --mesh data=-1,fsdp=1,tensor=1 \\
        --devices 4 --seq_len 512 --batch 16 --layers 2 --loss_chunk 0,512,128
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="paper_350m")
    p.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1", help="data=..,fsdp=..,tensor=.. (-1 fills)")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices when no --topology")
    p.add_argument("--topology", default="", help="TPU topology to target, e.g. v5e:4x4 (needs libtpu)")
    p.add_argument("--seq_len", type=int, default=0, help="override data.seq_len")
    p.add_argument("--batch", type=int, default=0, help="override data.batch_size (global)")
    p.add_argument("--layers", type=int, default=0, help="override model.n_layers")
    p.add_argument("--tensor", default="", help="comma list of tensor sizes to sweep, e.g. 1,2,4,8")
    p.add_argument("--loss_chunk", default="", help="comma list of train.loss_chunk values to sweep, e.g. 0,256")
    p.add_argument("overrides", nargs="*", help="extra KEY=VALUE config overrides")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.topology:  # must precede the first JAX import
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    from sessa_jax import sharding
    from sessa_jax.train.config import load_config, model_config, resolve
    from sessa_jax.train.optimizer import make_optimizer
    from sessa_jax.train.state import abstract_state, build_model, state_shardings
    from sessa_jax.train.step import make_train_step

    overrides = list(args.overrides)
    if args.seq_len:
        overrides.append(f"data.seq_len={args.seq_len}")
    if args.batch:
        overrides.append(f"data.batch_size={args.batch}")
    if args.layers:
        overrides.append(f"model.n_layers={args.layers}")
    cfg = load_config(args.config, overrides)
    resolved = resolve(cfg)
    devices = _target_devices(jax, args)
    axes = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
    sweep = [int(t) for t in args.tensor.split(",")] if args.tensor else [axes.get("tensor", 1)]
    model, tx = build_model(resolved), make_optimizer(cfg.optim, cfg.train.steps)
    mc = model_config(resolved)
    n_params = sum(
        x.size
        for x in jax.tree_util.tree_leaves(
            jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
        )
    )
    print(
        f"config={args.config} kind={cfg.model.kind} params={n_params / 1e6:.1f}M d_model={mc.d_model} "
        f"layers={mc.n_layers} dtype={mc.dtype.name} remat={mc.remat} scan={mc.scan_layers} "
        f"seq_len={cfg.data.seq_len} global_batch={cfg.data.batch_size} devices={len(devices)} "
        f"({devices[0].platform}{' ' + args.topology if args.topology else ''})"
    )
    chunks = [int(c) for c in args.loss_chunk.split(",")] if args.loss_chunk else [cfg.train.loss_chunk]
    header = (
        f"{'mesh (data,fsdp,tensor)':>24} | {'loss chunk':>10} | {'args GiB':>8} | {'temp GiB':>8} | {'out GiB':>8} | "
        f"{'alias GiB':>9} | {'peak GiB':>8} | compile s"
    )
    print(header)
    print("-" * len(header))
    for tp, loss_chunk in [(tp, c) for tp in sweep for c in chunks]:
        mesh_axes = dict(axes, tensor=tp)
        try:
            mesh = sharding.make_mesh(mesh_axes, devices)
            sharding.validate_mesh(
                mesh, mc, cfg.data.batch_size, cfg.optim.grad_accum, process_count=1, kind=cfg.model.kind
            )
        except ValueError as e:
            print(f"{str(mesh_axes):>24} | skipped: {e}")
            continue
        t0 = time.perf_counter()
        shardings = state_shardings(model, tx, cfg.train.seed, cfg.data.seq_len, mesh)
        state = abstract_state(model, tx, cfg.train.seed, cfg.data.seq_len, shardings)
        bs = sharding.batch_sharding(mesh)
        tok = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), jnp.int32, sharding=bs)
        batch = dict(
            inputs=tok,
            targets=tok,
            segment_ids=tok,
            positions=tok,
            weights=jax.ShapeDtypeStruct(tok.shape, jnp.float32, sharding=bs),
        )
        step = make_train_step(shardings, bs, cfg.optim.grad_accum, loss_chunk)  # the loop's step and shardings
        with sharding.activate(mesh):
            compiled = step.lower(state, batch).compile()
        m = compiled.memory_analysis()
        gib = 1024**3
        peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        shape = tuple(mesh.shape[a] for a in sharding.MESH_AXES)
        print(
            f"{str(shape):>24} | {loss_chunk or 'dense':>10} | {m.argument_size_in_bytes / gib:8.2f} | "
            f"{m.temp_size_in_bytes / gib:8.2f} | "
            f"{m.output_size_in_bytes / gib:8.2f} | {m.alias_size_in_bytes / gib:9.2f} | {peak / gib:8.2f} | "
            f"{time.perf_counter() - t0:.0f}",
            flush=True,
        )


def _target_devices(jax, args):
    if not args.topology:
        return jax.devices()
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(args.topology, "tpu").devices
    except Exception as e:  # no libtpu / unknown topology: say so rather than guess
        raise SystemExit(
            f"cannot target TPU topology {args.topology!r} here ({type(e).__name__}: {e}); "
            f"drop --topology to compile for {args.devices} fake CPU devices"
        ) from e


if __name__ == "__main__":
    main()
