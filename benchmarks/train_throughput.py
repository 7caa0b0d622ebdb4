"""Training throughput: tokens/s of the jitted train step train.py runs, Sessa vs the Transformer
baseline of the same run config (only the mixer differs), in the same run.

For each sequence length the run config (default: configs/default.py) gets
``data.seq_len=L`` and ``model.max_len>=L``; each kind builds its state with the run's
optimizer and the step ``train.py`` uses (``make_train_step``, state donated), on one batch of
random tokens (every position weighted, one segment per row, as the data pipeline packs
them). Data loading is not timed. After --warmup steps, --steps steps are timed per sample,
kinds interleaved, --repeats samples; the table shows the median and the ratio of tokens/s
Sessa / Transformer (>= 0.9 is the target), and the same ratio from the process's CPU time
per step (steadier on a loaded machine; it counts every compute thread). --match-params widens the baseline to Sessa's
parameter count (model.match_params); by default both have the same width. --work adds a
table of each step's work counted from its jaxpr (``benchmarks.jaxpr_work``): matrix-product
FLOPs and transcendental elements (exp, log, tanh, ...), the two costs of softmax mixers on CPU,
and the best ratio any implementation could reach on this machine: the Transformer's measured
step plus Sessa's extra work at this machine's measured float32 matmul peak (one large jitted
matmul) and exp rate, as if that extra work cost nothing else. Faster attention lowers that bound.

    python -m benchmarks.train_throughput                      # seq_len 512 and 2048
    python -m benchmarks.train_throughput --seq-len 512 --steps 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks import harness, jaxpr_work


def _setup(config: str, kind: str, seq_len: int, args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sessa_jax import sharding
    from sessa_jax.train.config import load_config, resolve
    from sessa_jax.train.optimizer import make_optimizer
    from sessa_jax.train.state import build_model, create_state, state_shardings
    from sessa_jax.train.step import make_train_step

    overrides = [
        f"--config.data.seq_len={seq_len}",
        f"--config.model.kind={kind}",
        f"--config.model.match_params={args.match_params and kind != 'sessa'}",
    ]
    cfg = load_config(config, overrides)
    if cfg.model.max_len < seq_len:
        cfg.model.max_len = seq_len
    if args.batch_size:
        cfg.data.batch_size = args.batch_size
    resolved = resolve(cfg)
    model, tx = build_model(resolved), make_optimizer(cfg.optim, cfg.train.steps)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    data_sharding = sharding.batch_sharding(mesh)
    shardings = state_shardings(model, tx, cfg.train.seed, seq_len, mesh)
    step_fn = make_train_step(shardings, data_sharding, cfg.optim.grad_accum)
    state = create_state(model, tx, cfg.train.seed, seq_len, sharding=shardings)
    b = cfg.data.batch_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, resolved.model.vocab_size, (b, seq_len + 1), dtype=np.int32)
    batch = dict(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        weights=np.ones((b, seq_len), np.float32),
        segment_ids=np.ones((b, seq_len), np.int32),
        positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (b, seq_len)).copy(),
    )
    batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, data_sharding)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    holder = {"state": state}

    def run(steps: int) -> None:
        with sharding.activate(mesh):
            st = holder["state"]
            for _ in range(steps):
                st, metrics = step_fn(st, batch)
            jax.block_until_ready(metrics["loss"])
            holder["state"] = st

    def work():
        with sharding.activate(mesh):
            return jaxpr_work.count_work(step_fn, holder["state"], batch)

    info = dict(d_model=resolved.model.d_model, n_layers=resolved.model.n_layers, batch=b, params=n_params, work=work)
    return run, info


def machine_rates(repeats: int = 5) -> tuple[float, float]:
    """(float32 matmul FLOP/s, exp elements/s), the best of ``repeats``: jitted 1024^3 and 2048^3
    matmuls, and exp over a (64, 16384) array that stays in cache (64 passes in one loop; several
    times the rate of exp over an array streamed from memory, so the bound stays generous)."""
    import jax
    import jax.numpy as jnp

    flops = max(harness.matmul_rate(n, repeats=repeats) for n in (1024, 2048))
    x, passes = jax.random.normal(jax.random.PRNGKey(0), (64, 1 << 14)), 64
    # each pass depends on the last (so none is skipped); the shift is too small to change exp's work
    exps = jax.jit(lambda x: jax.lax.fori_loop(0, passes, lambda i, c: c + jnp.exp(x - 1e-9 * c), jnp.zeros_like(x)))
    return flops, passes * x.size / harness.measure(harness.blocking(exps, x), repeats=repeats, stat="min")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help="run config (name or path), as train.py --config=")
    p.add_argument("--seq-len", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--batch-size", type=int, default=0, help="override data.batch_size (0: the config's)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="train steps per timing sample")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--match-params", action="store_true", help="baseline widened to Sessa's parameter count")
    p.add_argument("--work", action="store_true", help="also count each step's FLOPs and transcendentals")
    args = p.parse_args(argv)
    for name in ("warmup", "steps", "repeats"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}; got {getattr(args, name)}")
    print(f"# {harness.machine_line()}; config {args.config}; match_params={args.match_params}")
    print(harness.load_line("before"), flush=True)
    kinds = ("sessa", "transformer")
    work_rows = []
    print(
        "| seq_len | kind | d_model | layers | batch | params | step ms | tokens/s | sessa / transformer "
        "| step CPU ms | CPU ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for seq_len in args.seq_len:
        runs = {k: _setup(args.config, k, seq_len, args) for k in kinds}
        for run, _ in runs.values():
            run(max(1, args.warmup))  # compiles
        # one call runs --steps train steps and blocks once at the end, as training does
        timed = harness.interleaved(
            {k: (lambda run=runs[k][0]: run(args.steps)) for k in kinds}, args.repeats, warmup=0
        )
        samples = {k: [s / args.steps for s in timed[k]["wall"]] for k in kinds}
        cpu_ms = {k: statistics.median(timed[k]["cpu"]) / args.steps * 1e3 for k in kinds}
        tok = {k: runs[k][1]["batch"] * seq_len / statistics.median(samples[k]) for k in kinds}
        for k in kinds:
            info = runs[k][1]
            ratio = f"{tok['sessa'] / tok['transformer']:.2f}" if k == "sessa" else ""
            cpu_ratio = f"{cpu_ms['transformer'] / cpu_ms['sessa']:.2f}" if k == "sessa" else ""
            print(
                f"| {seq_len} | {k} | {info['d_model']} | {info['n_layers']} | {info['batch']} | {info['params']} | "
                f"{statistics.median(samples[k]) * 1e3:.1f} | {tok[k]:.0f} | {ratio} | {cpu_ms[k]:.1f} | {cpu_ratio} |",
                flush=True,
            )
        if args.work:
            counted = {k: runs[k][1]["work"]() for k in kinds}
            step_s = statistics.median(samples["transformer"])
            work_rows += [(seq_len, k, counted[k], counted["transformer"], step_s) for k in kinds]
    if work_rows:
        flops_rate, exp_rate = machine_rates()
        print(f"\n# this machine: float32 matmul {flops_rate / 1e9:.0f} GFLOP/s, exp {exp_rate / 1e9:.2f} G elements/s")
        print(
            "| seq_len | kind | matmul GFLOP / step | transcendentals M / step | FLOPs vs transformer "
            "| transcendentals vs transformer | best possible sessa / transformer |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for seq_len, k, w, base, step_s in work_rows:
            extra_s = (
                max(0.0, w.flops - base.flops) / flops_rate
                + max(0.0, w.transcendentals - base.transcendentals) / exp_rate
            )
            bound = f"{step_s / (step_s + extra_s):.2f}" if k == "sessa" else ""
            print(
                f"| {seq_len} | {k} | {w.flops / 1e9:.2f} | {w.transcendentals / 1e6:.1f} | "
                f"{w.flops / base.flops:.2f} | {w.transcendentals / base.transcendentals:.2f} | {bound} |"
            )
    print(harness.load_line("after"))


if __name__ == "__main__":
    main()
