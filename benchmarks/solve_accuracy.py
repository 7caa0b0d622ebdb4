"""Accuracy of the recursive solve's precision tiers for bf16 training, against a float64 oracle.

    python -m benchmarks.solve_accuracy                    # T = 512 and 2048, every regime and tier
    python -m benchmarks.solve_accuracy --T 512 --tiers bfloat16 --json out.json
    python -m benchmarks.solve_accuracy --T 8192 --regimes hub --tiers bfloat16 bfloat16-push1 --leaf 512

A bf16 model feeds the solve bf16 q_b, k_b and f, float32 gamma, and a bf16 cotangent ds; it
gets s back in bf16 (``feedback_solve`` casts s to f's dtype) and dq, dk, df in bf16. For each
regime, length and tier this prints the relative Frobenius error ||x - x64|| / ||x64|| of

  * ``s`` (the solve's output before the cast: float32, or with ``--kernels gpu_gemm`` where the
    Mosaic GPU leaf kernels run, s already rounded to bf16, as they return it and the cast would
    round it) and ``s floor``: what rounding f to bf16
    alone does to s, ||S(bf16(f)) - S(f)|| / ||S(f)|| in float64 (the tier rule asks s <= 2x this);
  * ``dq``, ``dk``, ``dgamma``, ``df`` (as the solve returns them: dq, dk, df in bf16);
  * bf16 causal attention's own errors on the same inputs (q_b, k_b, v = f, cotangent ds, one head
    of width D, diagonal included), computed as flash kernels do: P rounded to bf16 for P v and
    P^T dO, dS = P * (dO v^T - rowsum(dO * O)) rounded to bf16 for dS k and dS^T q, outputs in bf16.

The gradients are held to 2x attention's: dq to its dq, dk to its dk, df to its dv, and dgamma
(no counterpart in attention) to the largest of attention's three.

Regimes (gamma 0.999 unless said): ``sharp_pm`` logits ~ N(0, 16^2) with gamma +-0.999 of random
signs; ``sharp`` logits ~ N(0, 16^2); ``diffuse`` logits ~ N(0, 1); ``prev`` every row attends
(almost) only to the previous token, a pure recurrence; ``hub`` one key (position 0) takes about a
third of every row's weight; ``sink`` (not in the default list) the same key about 0.9 of it, as
an attention sink does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from sessa_jax.ops.dispatch import recursive_tile
from sessa_jax.ops.reference import dense_feedback_solve
from sessa_jax.ops.solve import block_product, recursive
from sessa_jax.ops.solve.precision import chained_dot
from sessa_jax.ops.solve.recursive import recursive_feedback_solve

REGIMES = ("sharp_pm", "sharp", "diffuse", "prev", "hub")
# Not among the regimes the tests hold every tier to at T = 512 and 2048: a stronger hub
# (``--regimes sink``), for the long-sequence measurements.
SINK = "sink"
TIERS = ("float32", "bf16x3", "bfloat16")
# Not a tier: the bfloat16 tier with its forward's leaf products (leaf solves, r's diagonal
# blocks) in one bf16 pass too, to show why the tier keeps them at bf16x3 (``--tiers
# bfloat16-fwd1``; the backward's X_i^T products, traced after the patch ends, keep bf16x3).
ONE_PASS_FORWARD = "bfloat16-fwd1"
# Not a tier: the bfloat16 tier with its forward pushes in one bf16 pass of bf16(P) bf16(s) instead
# of P split hi + lo (``precision.push_dot``), to show why the pushes take two passes
# (``--tiers bfloat16-push1``; the XLA path's pushes).
ONE_PASS_PUSHES = "bfloat16-push1"
# Not a tier: the bfloat16 tier with its backward's transposed pushes A^T g in one bf16 pass of
# bf16(P) bf16(g) instead of g split hi + lo (``precision.transposed_push_dot``), to show why they
# take two (``--tiers bfloat16-pull1``; the XLA path's).
ONE_PASS_PULLS = "bfloat16-pull1"
DIAGNOSTICS = (ONE_PASS_FORWARD, ONE_PASS_PUSHES, ONE_PASS_PULLS)
GRADS = ("dq", "dk", "dgamma", "df")
BF16 = jnp.bfloat16


def regime_inputs(regime: str, t: int, d: int = 64, b: int = 1, seed: int = 0):
    """float32 (q, k, gamma, f, ds) of ``regime`` (see the module notes); q (B, T, D), gamma (B, T)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    scale = 4.0 if regime.startswith("sharp") else 1.0
    f32 = jnp.float32  # explicit: under global x64 the defaults would be float64 (and so the whole solve)
    q = scale * jax.random.normal(ks[0], (b, t, d), f32)
    k = scale * jax.random.normal(ks[1], (b, t, d), f32)
    if regime == "prev":
        e = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
        k, q = 40.0 * e, jnp.roll(e, 1, axis=1)
    elif regime in ("hub", SINK):
        # Key 0 points along u, every other key is orthogonal to u, and row t's query has a
        # component along u sized so that key 0's logit is log(w / (1 - w) (t - 1)) above the
        # others', w = 1/3 ("hub") or 0.9 ("sink", an attention sink): about that share of the
        # row's weight whatever t is.
        odds = 0.5 if regime == "hub" else 9.0  # w / (1 - w)
        u = jnp.zeros((d,), f32).at[0].set(1.0)
        k = k.at[:, :, 0].set(0.0).at[:, 0].set(float(d) ** 0.5 * u)
        pos = jnp.arange(t, dtype=jnp.float32)
        lift = jnp.log(jnp.maximum(pos - 1.0, 1.0) * odds) + 0.5  # + mean log-weight of N(0, 1) logits
        q = q.at[:, :, 0].set(lift[None, :])
    if regime == "sharp_pm":
        gamma = jnp.where(jax.random.bernoulli(ks[2], f32(0.5), (b, t)), f32(0.999), f32(-0.999))
    else:
        gamma = jnp.full((b, t), 0.999, f32)
    f = jax.random.normal(ks[4], (b, t, d), f32)
    ds = jax.random.normal(ks[5], (b, t, d), f32)
    return q, k, gamma, f, ds


def rel(a, b) -> float:
    """Relative Frobenius error ||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _bf16(x):
    return np.asarray(x, np.float32).astype(jnp.bfloat16).astype(np.float32)


def attention_errors(q, k, v, do) -> dict:
    """Errors of bf16 flash-style causal attention's (dq, dk, dv) against float64, on bf16-valued
    float32 (B, T, D) inputs (one head of width D, diagonal included)."""
    out = {"dq": [], "dk": [], "dv": []}
    for qb, kb, vb, dob in zip(*(np.asarray(x, np.float32) for x in (q, k, v, do))):
        t, d = qb.shape
        scale = float(d) ** -0.5
        causal = np.tril(np.ones((t, t), bool))

        def grads(dt, rnd):
            qd, kd, vd, dod = (x.astype(dt) for x in (qb, kb, vb, dob))
            logits = np.where(causal, qd @ kd.T * dt(scale), -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p = p / p.sum(-1, keepdims=True)
            pb = rnd(p)
            o = rnd(pb @ vd)
            dp = dod @ vd.T
            ds = p * (dp - np.sum(dod * o, -1, keepdims=True))
            dsb = rnd(ds)
            return rnd(dsb @ kd * dt(scale)), rnd(dsb.T @ qd * dt(scale)), rnd(pb.T @ dod)

        want = grads(np.float64, lambda x: x)
        got = grads(np.float32, _bf16)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            out[name].append((a, b))
    return {name: rel(np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])) for name, pairs in out.items()}


@functools.lru_cache(maxsize=None)
def _oracle_fn():
    def loss(q, k, g, f, ds):
        s = dense_feedback_solve(q, k, g, f, jnp.ones(g.shape, jnp.int32))
        return jnp.sum(s * ds), s

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


@functools.lru_cache(maxsize=None)
def _oracle_forward():
    return jax.jit(lambda q, k, g, f: dense_feedback_solve(q, k, g, f, jnp.ones(g.shape, jnp.int32)))


def oracle(q, k, gamma, f, ds, f_full):
    """float64 (s, (dq, dk, dgamma, df), s of the unrounded f_full) of the solve on these inputs."""
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, gamma, f, ds)]
        (_, s), grads = _oracle_fn()(*args)
        s_full = _oracle_forward()(*args[:3], jnp.asarray(np.asarray(f_full, np.float64)))
        return np.asarray(s), tuple(np.asarray(x) for x in grads), np.asarray(s_full)


@contextlib.contextmanager
def _patched(module, name: str, value, active: bool):
    """While tracing (``active``): ``module.name`` replaced by ``value``."""
    if not active:
        yield
        return
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _one_pass_forward(active: bool):
    """While tracing the forward: the recursive solve's leaf products at its own tier (no bf16x3 for
    "bfloat16"); the backward (a custom VJP) is traced after ``loss`` returns, outside the patch."""
    return _patched(recursive, "leaf_tier", lambda tier: tier, active)


def _one_pass_pushes(active: bool):
    """While tracing: the XLA path's forward pushes as ``chained_dot`` (one bf16 pass of bf16(P)
    bf16(s) in the "bfloat16" tier) instead of ``push_dot``."""
    return _patched(block_product, "push_dot", chained_dot, active)


def _one_pass_pulls(active: bool):
    """While tracing: the XLA path's transposed pushes as ``chained_dot`` (one bf16 pass of bf16(P)
    bf16(g) in the "bfloat16" tier) instead of ``transposed_push_dot``."""
    return _patched(recursive, "transposed_push_dot", chained_dot, active)


@functools.lru_cache(maxsize=None)
def solve_fn(tier: str, leaf: int, t: int, kernels: str = "xla"):
    """Jitted (s float32 (bf16 from the Mosaic GPU leaf kernels), (dq, dk, dgamma, df)) of the
    recursive solve at ``tier`` on bf16 inputs, run as on a GPU or TPU (tier rules of the products;
    platform "cpu" only picks the split form; ``kernels="pallas"`` runs the TPU kernels,
    ``"gpu_gemm"`` the Mosaic GPU GEMM-with-epilogue kernels, in interpret mode)."""
    tile = recursive_tile(t, leaf)

    def loss(q, k, g, f, ds):
        with _one_pass_forward(tier == ONE_PASS_FORWARD), _one_pass_pushes(tier == ONE_PASS_PUSHES):
            s = recursive_feedback_solve(
                q,
                k,
                g,
                f,
                jnp.ones(g.shape, jnp.int32),
                leaf_size=leaf,
                tile=tile,
                tier="bfloat16" if tier in DIAGNOSTICS else tier,
                platform="cpu",
                dtype=jnp.float32,
                kernels=kernels,
            )
        return jnp.sum(s.astype(f.dtype).astype(jnp.float32) * ds.astype(jnp.float32)), s

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    if tier != ONE_PASS_PULLS:
        return fn

    def with_pulls_patched(*args):
        # the backward is traced after loss returns (custom_vjp), so the patch spans the whole trace
        with _one_pass_pulls(True):
            return fn(*args)

    return with_pulls_patched


def leaf_for(t: int) -> int:
    """A leaf giving 8-16 leaves: T/16 rounded down to a power of two, at least 8."""
    return max(8, 1 << max(0, (t // 16).bit_length() - 1))


def measure(
    regime: str, t: int, tiers=TIERS, d: int = 64, seed: int = 0, leaf: int | None = None, kernels: str = "xla"
) -> dict:
    """{"attention": {dq, dk, dv}, "s_floor": float, tier: {s, dq, dk, dgamma, df}} for one case."""
    leaf = leaf_for(t) if leaf is None else leaf
    q, k, gamma, f, ds = regime_inputs(regime, t, d=d, seed=seed)
    qb, kb, fb, dsb = (x.astype(BF16) for x in (q, k, f, ds))
    s64, g64, s64_full = oracle(qb, kb, gamma, fb, dsb, f)
    row = {
        "regime": regime,
        "T": t,
        "D": d,
        "leaf": leaf,
        "attention": attention_errors(qb, kb, fb, dsb),
        "s_floor": rel(s64, s64_full),
    }
    for tier in tiers:
        (_, s), grads = solve_fn(tier, leaf, t, kernels)(qb, kb, gamma, fb, dsb)
        row[tier] = {"s": rel(s, s64), **{name: rel(a, b) for name, a, b in zip(GRADS, grads, g64)}}
    return row


def bounds(row: dict) -> dict:
    """The accuracy targets of one measured case: s <= 2x its floor; dq, dk, df <= 2x attention's
    dq, dk, dv; dgamma <= 2x the largest of attention's three."""
    att = row["attention"]
    return {
        "s": 2 * row["s_floor"],
        "dq": 2 * att["dq"],
        "dk": 2 * att["dk"],
        "df": 2 * att["dv"],
        "dgamma": 2 * max(att.values()),
    }


def print_table(rows: list[dict], tiers) -> None:
    print("| regime | T | leaf | tier | s | dq | dk | dgamma | df | meets |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        att, lim = r["attention"], bounds(r)
        print(
            f"| {r['regime']} | {r['T']} | {r['leaf']} | bf16 attention / s floor | {r['s_floor']:.1e} | "
            f"{att['dq']:.1e} | {att['dk']:.1e} | - | {att['dv']:.1e} (dv) | |"
        )
        for tier in tiers:
            e = r[tier]
            ok = all(e[name] <= lim[name] for name in lim)
            print(
                f"| | | | {tier} | {e['s']:.1e} | {e['dq']:.1e} | {e['dk']:.1e} | {e['dgamma']:.1e} | "
                f"{e['df']:.1e} | {'yes' if ok else 'no'} |"
            )


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_shape_args(ap, T=[512, 2048], D=64)
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES + (SINK,))
    harness.add_tier_args(ap, default=TIERS, extra=DIAGNOSTICS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--leaf",
        type=int,
        default=None,
        help="the solve's leaf at every T (default: T/16 rounded down to a power of two, 8-16 leaves: leaf_for)",
    )
    harness.add_output_args(ap)
    ap.add_argument(
        "--kernels",
        default="xla",
        choices=["xla", "pallas", "gpu_gemm"],
        help="the solve's kernels (off their device in interpret mode); gpu_gemm needs T/16 >= 128",
    )
    args = ap.parse_args(argv)
    print(
        f"# solve_accuracy: {harness.machine_line()}; B=1, D={args.D}, kernels {args.kernels}, "
        "relative Frobenius errors vs float64"
    )
    rows = []
    for t in args.T:
        for regime in args.regimes:
            rows.append(measure(regime, t, args.tiers, d=args.D, seed=args.seed, leaf=args.leaf, kernels=args.kernels))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print_table(rows, args.tiers)
    harness.write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
