"""Writes docs/influence.png (constructed-weight memory tails) and, with --compare, the comparison results.

    .venv/bin/python scripts/make_figures.py                      # docs/influence.png + fitted slopes
    .venv/bin/python scripts/make_figures.py --skip-influence --compare results/compare_cpu.jsonl
        # results/compare_cpu.md (table with 95% CIs and reference lines), docs/compare_cpu.png,
        # memory tails of the saved trained models: results/compare_cpu_tails.jsonl, docs/compare_cpu_tails.png
    .venv/bin/python scripts/make_figures.py --long-context       # + sessa/transformer/mamba on MQAR

Both call the library functions the notebooks use (sessa_jax.analysis).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import matplotlib

matplotlib.use("Agg")

from sessa_jax import analysis  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "influence.png"))
    p.add_argument("--max-lag", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=8)
    p.add_argument("--num-lags", type=int, default=20)
    p.add_argument("--skip-influence", action="store_true")
    p.add_argument("--long-context", action="store_true", help="also train the small MQAR comparison")
    p.add_argument("--seq-lens", default="32,64")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--compare", help="results JSONL of scripts/compare_models.py: table, figure and trained tails")
    p.add_argument("--scale", default="cpu", help="the compare_models scale of --compare")
    p.add_argument(
        "--tail-examples",
        type=int,
        default=16,
        help="test examples per trained-tail measurement (0: keep the tails already written)",
    )
    args = p.parse_args(argv)

    if args.compare:
        compare_report(args.compare, args.scale, args.tail_examples)

    if not args.skip_influence:
        t0 = time.perf_counter()
        tails = analysis.memory_tails(args.max_lag, args.d_model, args.num_lags)
        analysis.plot_memory_tails(tails, args.out)
        print(f"wrote {args.out} ({time.perf_counter() - t0:.0f}s)")
        print("| construction | fit | slope | R^2 | influence at lag 16 | at lag", args.max_lag, "|")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, c in tails.items():
            kind = "log-linear (per step)" if name == "mamba" else "log-log"
            at = dict(zip(c["lags"].tolist(), c["influence"].tolist()))
            l16 = min(at, key=lambda l: abs(l - 16))
            print(
                f"| {name} | {kind} | {c['fit'].slope:.4f} | {c['fit'].r2:.5f} | {at[l16]:.4g} (lag {l16}) "
                f"| {at[max(at)]:.4g} |"
            )

    if args.long_context:
        seq_lens = [int(s) for s in args.seq_lens.split(",")]
        with tempfile.TemporaryDirectory() as workdir:
            rows = analysis.compare_on_lengths(("sessa", "transformer", "mamba"), seq_lens, args.steps, workdir)
        print(analysis.comparison_table(rows))
    return 0


def _compare_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_models", os.path.join(ROOT, "scripts", "compare_models.py"))
    cm = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cm
    spec.loader.exec_module(cm)
    return cm


def compare_report(path: str, scale_name: str, tail_examples: int) -> None:
    """Table (markdown), figure and trained-model memory tails of one compare_models JSONL."""
    import json

    import matplotlib.pyplot as plt

    cm = _compare_module()
    stem = os.path.splitext(path)[0]
    lines = cm.scale_lines(path, scale_name)
    summary = cm.summarize(cm.scale_rows(path, scale_name), lines)
    text = cm.table(summary, lines)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"wrote {stem}.md")

    cells = sorted({(s["task"], s["length"]) for s in summary})
    fig, axes = plt.subplots(1, max(1, len(cells)), figsize=(4.5 * max(1, len(cells)), 4), squeeze=False)
    for ax, (task, length) in zip(axes[0], cells):
        rows = [s for s in summary if (s["task"], s["length"]) == (task, length)]
        for i, s in enumerate(rows):
            seeds = [
                r["test_accuracy"]
                for r in cm.scale_rows(path, scale_name)
                if (r["task"], r["length"], r["kind"], r["lr"]) == (task, length, s["kind"], s["best_lr"])
            ]
            ax.plot([i] * len(seeds), seeds, "k.", alpha=0.5)
            lo, hi = s["ci95"]
            ax.errorbar([i], [s["test_mean"]], yerr=[[s["test_mean"] - lo], [hi - s["test_mean"]]], fmt="o", capsize=4)
        for j, (name, value) in enumerate(
            (k, v) for k, v in lines.get((task, length), {}).items() if k not in ("test_n", "no_association_measured")
        ):
            ax.axhline(value, ls=("--", ":", "-.", "-")[j % 4], color=f"C{j + 3}", label=f"{name} {value:.3f}")
        ax.set_xticks(range(len(rows)), [s["kind"] for s in rows])
        ax.set_title(f"{task} {length}")
        ax.set_ylabel("test accuracy (mean, 95% CI, seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs", f"compare_{scale_name}.png"), dpi=110)
    print(f"wrote docs/compare_{scale_name}.png")

    if tail_examples <= 0:
        return
    tails = trained_tails(cm, path, scale_name, summary, tail_examples)
    with open(stem + "_tails.jsonl", "w") as f:
        for t in tails:
            f.write(json.dumps({k: v for k, v in t.items() if k not in ("median", "profiles")}) + "\n")
    if tails:
        print("| task | length | kind | log-log slope of median influence | bootstrap SE | 95% CI | R^2 |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for t in tails:
            print(
                f"| {t['task']} | {t['length']} | {t['kind']} | {t['slope']:+.3f} | {t['slope_se']:.3f} | "
                f"{t['slope_ci95'][0]:+.3f}..{t['slope_ci95'][1]:+.3f} | {t['r2']:.2f} |"
            )
        cells = sorted({(t["task"], t["length"]) for t in tails})
        fig, axes = plt.subplots(1, len(cells), figsize=(4.5 * len(cells), 4), squeeze=False)
        for ax, cell in zip(axes[0], cells):
            for t in (t for t in tails if (t["task"], t["length"]) == cell):
                ax.loglog(
                    t["lags"],
                    t["median"],
                    "o-",
                    ms=3,
                    label=f"{t['kind']}: slope {t['slope']:+.2f} ± {t['slope_se']:.2f}",
                )
            ax.set_title(f"trained, {cell[0]} {cell[1]}: source = target - lag")
            ax.set_xlabel("lag")
            ax.set_ylabel("median ||d logits[target] / d emb[source]||")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(ROOT, "docs", f"compare_{scale_name}_tails.png"), dpi=110)
        print(f"wrote {stem}_tails.jsonl and docs/compare_{scale_name}_tails.png")


def trained_tails(cm, path: str, scale_name: str, summary: list, num_examples: int) -> list[dict]:
    """``analysis.trained_memory_tail`` of every saved model (first saved seed, chosen lr) of ``path``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sessa_jax.model import SessaLM

    scale = cm.SCALES[scale_name]
    out = []
    for s in summary:
        task, name, kind, lr = s["task"], s["length"], s["kind"], s["best_lr"]
        seed = next(
            (sd for sd in scale.save_params_seeds if os.path.exists(cm.params_path(path, task, name, kind, lr, sd))),
            None,
        )
        if seed is None:
            continue
        length = next(
            ln
            for ln in (scale.soup_lengths if task == "symbol_soup" else scale.mqar_lengths)
            if cm.length_name(task, ln) == name
        )
        tscale = cm.task_scale(scale, task)
        config = cm.model_configs(tscale, task, length)[kind]
        model = SessaLM(config, kind=kind)
        like = model.init(jax.random.PRNGKey(0), jnp.zeros((1, config.max_len), jnp.int32))
        params = cm.load_params(cm.params_path(path, task, name, kind, lr, seed), like)
        test = (
            cm.soup_split(tscale, length, cm.SPLIT_TEST)
            if task == "symbol_soup"
            else cm.mqar_split(tscale, length, cm.SPLIT_TEST)
        )
        tokens = test["inputs"][:num_examples]
        # the scored position: the <label> (SymbolSoup) or the last query (MQAR) of each example
        target = np.array([np.nonzero(w)[0][-1] for w in test["weights"][:num_examples]])
        lags = analysis.log_lags(int(target.min()) - 1, 16)
        t0 = time.perf_counter()
        tail = analysis.trained_memory_tail(model, params, tokens, target, lags)
        out.append(
            dict(
                task=task,
                length=name,
                kind=kind,
                lr=lr,
                seed=seed,
                examples=len(tokens),
                lags=tail["lags"].tolist(),
                median=tail["median"].tolist(),
                slope=tail["slope"],
                slope_se=tail["slope_se"],
                slope_ci95=tail["slope_ci95"],
                r2=tail["r2"],
                seconds=time.perf_counter() - t0,
            )
        )
        print(
            f"tail {task} {name} {kind}: slope {tail['slope']:+.3f} ± {tail['slope_se']:.3f} "
            f"({out[-1]['seconds']:.0f}s)"
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
