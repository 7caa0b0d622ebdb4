"""Worst relative errors against the published fixtures.

    python -m benchmarks.parity
    python -m benchmarks.parity --solvers dense blocked recursive --fixtures tests/fixtures

Each fixture (``reference_layer_*.npz``: the published PyTorch layer's weights, inputs, outputs
and gradients) is run through the layer here for every solver, in float32 and float64: y, the
mixer's s, prefill + token-by-token decode, and the gradients of sum(y * r) with respect to x
and every weight (converted to the reference's names). Prints, per precision, the worst error
over the outputs and over the gradients; an error is max |actual - expected| / max |expected|,
and each weight gradient's scale is at least 1e-3 x the largest weight gradient (some are
exactly zero in exact arithmetic).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from benchmarks import harness

PATTERN = "reference_layer_*.npz"


def find_fixtures(folder: str | None) -> list[pathlib.Path]:
    """The fixture files in ``folder`` (default: wherever they lie under ./tests)."""
    files = sorted(pathlib.Path(folder).glob(PATTERN)) if folder else sorted(pathlib.Path("tests").rglob(PATTERN))
    if not files:
        where = folder or "tests/ (searched recursively)"
        raise SystemExit(f"parity: no {PATTERN} in {where}; run from the repository root or pass --fixtures DIR")
    return files


def load_fixture(path: pathlib.Path) -> tuple[dict, dict]:
    """(arrays, meta): every array of the fixture, and its parsed ``config_json``."""
    z = np.load(path)
    return {k: z[k] for k in z.files}, json.loads(str(z["config_json"]))


def rel_err(actual, expected, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor), in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), floor))


def run_fixture(arrays: dict, meta: dict, solver: str, precision: str) -> dict:
    """numpy {y, s, y_decode, grad_x, grad_w: {reference name: gradient}} of the layer built
    from one fixture's weights, computed with ``solver`` in ``precision``."""
    import jax
    import jax.numpy as jnp

    from sessa_jax import SessaConfig, SessaLayer, SessaMixer
    from sessa_jax.convert import layer_params_from_torch, layer_params_to_torch
    from sessa_jax.decoding import init_layer_cache

    with jax.enable_x64(precision == "float64"):
        dtype = jnp.dtype(precision)
        cfg = SessaConfig(
            d_model=meta["D"],
            n_heads=meta["n_heads"],
            n_kv_heads=meta["n_kv_heads"],
            rope=meta["rope"],
            gamma_max=meta["gamma_max"],
            ln_eps=meta["ln_eps"],
            solver=solver,
            chunk_size=8,
            leaf_size=8,
            dtype=dtype,
            param_dtype=dtype,
        )
        layer = SessaLayer(cfg)
        weights = {k[2:]: v for k, v in arrays.items() if k.startswith("w/")}
        variables = layer_params_from_torch(weights, cfg, dtype=dtype)
        x, r = (jnp.asarray(arrays[k], dtype) for k in ("x", "r"))
        s = jax.jit(SessaMixer(cfg).apply)(
            {"params": variables["params"]["mixer"]}, jnp.asarray(arrays["bar_a"], dtype)
        )

        def loss(v, x):
            y = layer.apply(v, x)
            return jnp.sum(y * r), y

        (_, y), (g_vars, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables, x)
        prefill = meta["prefill"]
        cache = init_layer_cache(cfg, x.shape[0], max_len=x.shape[1])
        y_pre, cache = jax.jit(lambda v, xp, c: layer.apply(v, xp, cache=c))(variables, x[:, :prefill], cache)
        step = jax.jit(lambda v, xt, c: layer.apply(v, xt, cache=c, decode=True))
        outs = [y_pre]
        for t in range(prefill, x.shape[1]):
            y_t, cache = step(variables, x[:, t : t + 1], cache)
            outs.append(y_t)
        grad_w = layer_params_to_torch(g_vars, cfg, include_buffers=False, as_torch=False)
        return jax.tree_util.tree_map(
            np.asarray, dict(y=y, s=s, y_decode=jnp.concatenate(outs, axis=1), grad_x=g_x, grad_w=grad_w)
        )


def errors(arrays: dict, r: dict) -> tuple[float, float]:
    """(worst output error, worst gradient error) of one run against its fixture."""
    out = max(
        rel_err(r["y"], arrays["y"]), rel_err(r["s"], arrays["s"]), rel_err(r["y_decode"], arrays["y_prefill_decode"])
    )
    largest = max(float(np.max(np.abs(arrays[f"grad/w/{k}"]))) for k in r["grad_w"])
    grads = [rel_err(v, arrays[f"grad/w/{k}"], floor=1e-3 * largest) for k, v in r["grad_w"].items()]
    return out, max(rel_err(r["grad_x"], arrays["grad/x"]), *grads)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", default=None, help="folder of reference_layer_*.npz (default: found under tests/)")
    p.add_argument("--solvers", nargs="+", default=["dense", "blocked"], choices=["dense", "blocked", "recursive"])
    p.add_argument("--precisions", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    harness.add_output_args(p)
    args = p.parse_args(argv)
    files = find_fixtures(args.fixtures)
    rows = []
    for precision in args.precisions:
        out_err = grad_err = 0.0
        for path in files:
            arrays, meta = load_fixture(path)
            for solver in args.solvers:
                o, g = errors(arrays, run_fixture(arrays, meta, solver, precision))
                out_err, grad_err = max(out_err, o), max(grad_err, g)
        rows.append({"precision": precision, "outputs": out_err, "gradients": grad_err})
    print(f"# {len(files)} fixtures, solvers {' '.join(args.solvers)}")
    print(
        harness.markdown_table(
            ("precision", "outputs (y, s, prefill+decode)", "gradients (x and every weight)"),
            [(r["precision"], f"{r['outputs']:.2g}", f"{r['gradients']:.2g}") for r in rows],
        )
    )
    harness.write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
