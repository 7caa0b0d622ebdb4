"""Matrix-product work and loop steps of a JAX program, counted from its jaxpr.

XLA's ``cost_analysis()`` counts a loop body once and cannot know which ``lax.switch`` branch a
step takes, so this walks the jaxpr as an abstract interpreter instead: small integer values
(loop counters, schedule tables, trip counts) are evaluated concretely, loops whose bodies
branch are stepped through iteration by iteration, other loops multiply their body's work by
their trip count. Each ``dot_general`` adds 2 * batch * M * N * K FLOPs, and its
bf16-pass-equivalent work: 1 pass for bf16 operands or an explicit bf16 algorithm, the
preset's pass count for ``DotAlgorithmPreset`` (BF16_BF16_F32_X3: 3, X6: 6), 6 for float32
operands at the default or HIGHEST precision (what an accelerator spends on faithful fp32),
and 1 for anything else (float64 on CPU).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax import lax

try:  # jax >= 0.4.36
    from jax.extend import core as jcore
except ImportError:  # pragma: no cover
    from jax import core as jcore

BIG = 256  # a dot counts as "large" when its M, N and K are all >= BIG
TRANSCENDENTAL = frozenset({"exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "erf", "sin", "cos", "pow"})
_SMALL = 1 << 17  # largest value (elements) evaluated concretely


@dataclasses.dataclass
class Work:
    """FLOPs of all dots, bf16-pass equivalents, FLOPs in large dots, loop steps, and the
    elements produced by transcendental functions (exp, log, tanh, ...: the elementwise work
    that sets the speed of softmax-heavy code on CPU)."""

    flops: float = 0.0
    pass_flops: float = 0.0
    big_flops: float = 0.0
    outer_steps: int = 0
    all_steps: int = 0
    transcendentals: float = 0.0

    def add(self, other: "Work", times: float = 1.0, outer: bool = True) -> None:
        self.flops += times * other.flops
        self.pass_flops += times * other.pass_flops
        self.big_flops += times * other.big_flops
        self.transcendentals += times * other.transcendentals
        self.all_steps += int(times * other.all_steps)
        if outer:
            self.outer_steps += int(times * other.outer_steps)


def _passes(eqn) -> int:
    prec = eqn.params.get("precision")
    presets = prec if isinstance(prec, tuple) else (prec,)
    for p in presets:
        if isinstance(p, lax.DotAlgorithmPreset):
            name = p.name
            if "X6" in name:
                return 6
            if "X3" in name:
                return 3
            if "X9" in name:
                return 9
            if "TF32" in name:
                return 2
            return 1
    dtypes = {str(v.aval.dtype) for v in eqn.invars}
    if dtypes <= {"bfloat16"}:
        return 1
    if "float32" in dtypes:
        return 6
    return 1


def _dot_work(eqn) -> Work:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    batch = math.prod(lhs[i] for i in lb)
    k = math.prod(lhs[i] for i in lc)
    m = math.prod(lhs[i] for i in range(len(lhs)) if i not in lc and i not in lb)
    n = math.prod(rhs[i] for i in range(len(rhs)) if i not in rc and i not in rb)
    flops = 2.0 * batch * m * n * k
    big = flops if min(m, n, k) >= BIG else 0.0
    return Work(flops, flops * _passes(eqn), big)


def _sub_jaxprs(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if j is not None:
            return j
    return None


def _has_control_flow(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("cond", "while"):
            return True
        sub = _sub_jaxprs(eqn)
        if sub is not None and _has_control_flow(getattr(sub, "jaxpr", sub)):
            return True
    return False


def _scan_counts(params) -> tuple[int, int]:
    """(consts, carries) of a scan equation: its params num_consts / num_carry (jax < 0.12) or the
    flat tree of its inputs, (consts, carry, xs) (jax >= 0.12)."""
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()
    return len(list(consts)), len(list(carry))


class _Walker:
    def __init__(self):
        self.unknown_branches = 0

    def _read(self, env, v):
        if isinstance(v, jcore.Literal):
            return np.asarray(v.val)
        return env.get(v)

    def _eval(self, eqn, vals):
        if any(x is None for x in vals):
            return None
        if any(math.prod(v.aval.shape) > _SMALL for v in eqn.outvars if hasattr(v.aval, "shape")):
            return None
        try:
            with jax.ensure_compile_time_eval():
                out = eqn.primitive.bind(*vals, **eqn.params)
        except Exception:  # noqa: BLE001 - anything not evaluable stays unknown
            return None
        outs = out if eqn.primitive.multiple_results else [out]
        return [np.asarray(o) for o in outs]

    def run(self, jaxpr, consts, args, depth: int):
        """Walks ``jaxpr``; returns (Work, output values or None)."""
        env = {}
        for v, x in zip(jaxpr.constvars, consts):
            env[v] = None if x is None else np.asarray(x)
        for v, x in zip(jaxpr.invars, args):
            env[v] = x
        work = Work()
        for eqn in jaxpr.eqns:
            vals = [self._read(env, v) for v in eqn.invars]
            name = eqn.primitive.name
            outs = None
            if name == "dot_general":
                work.add(_dot_work(eqn))
            elif name in TRANSCENDENTAL:
                work.transcendentals += sum(math.prod(v.aval.shape) for v in eqn.outvars)
            elif name == "scan":
                outs = self._scan(eqn, vals, work, depth)
            elif name == "while":
                outs = self._while(eqn, vals, work, depth)
            elif name == "cond":
                outs = self._cond(eqn, vals, work, depth)
            elif _sub_jaxprs(eqn) is not None:
                sub = _sub_jaxprs(eqn)
                inner, consts_ = (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, ())
                w, outs = self.run(inner, consts_, vals, depth)
                work.add(w)
            else:
                outs = self._eval(eqn, vals)
            for i, v in enumerate(eqn.outvars):
                env[v] = None if outs is None else outs[i]
        return work, [self._read(env, v) for v in jaxpr.outvars]

    def _scan(self, eqn, vals, work, depth):
        p = eqn.params
        body, length = p["jaxpr"], p["length"]
        nc, ncarry = _scan_counts(p)
        consts, carry, xs = vals[:nc], vals[nc : nc + ncarry], vals[nc + ncarry :]
        if not _has_control_flow(body.jaxpr):
            w, _ = self.run(body.jaxpr, body.consts, consts + [None] * (len(vals) - nc), depth + 1)
            w.outer_steps, w.all_steps = 1, w.all_steps + 1
            work.add(w, times=length, outer=depth == 0)
            return None
        order = range(length - 1, -1, -1) if p["reverse"] else range(length)
        for it in order:
            x_it = [None if x is None else x[it] for x in xs]
            w, outs = self.run(body.jaxpr, body.consts, consts + carry + x_it, depth + 1)
            w.outer_steps, w.all_steps = 1, w.all_steps + 1
            work.add(w, outer=depth == 0)
            carry = outs[:ncarry]
        return None

    def _while(self, eqn, vals, work, depth):
        p = eqn.params
        cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        c_consts, b_consts, carry = vals[:cn], vals[cn : cn + bn], vals[cn + bn :]
        while True:
            _, (go,) = self.run(cj.jaxpr, cj.consts, c_consts + carry, depth + 1)
            if go is None:
                raise ValueError("a while loop's trip count depends on data; cannot count its work")
            if not bool(go):
                return carry
            w, carry = self.run(bj.jaxpr, bj.consts, b_consts + carry, depth + 1)
            w.outer_steps, w.all_steps = 1, w.all_steps + 1
            work.add(w, outer=depth == 0)

    def _cond(self, eqn, vals, work, depth):
        branches = eqn.params["branches"]
        index, ops = vals[0], vals[1:]
        if index is None:
            self.unknown_branches += 1
            results = [self.run(b.jaxpr, b.consts, ops, depth) for b in branches]
            w, outs = max(results, key=lambda r: r[0].pass_flops)
        else:
            b = branches[int(np.clip(index, 0, len(branches) - 1))]
            w, outs = self.run(b.jaxpr, b.consts, ops, depth)
        work.add(w)
        return outs


def count_work(fn, *args) -> Work:
    """Work of ``fn(*args)`` (args may be ``jax.ShapeDtypeStruct``), counted from its jaxpr."""
    closed = jax.make_jaxpr(fn)(*args)
    walker = _Walker()
    work, _ = walker.run(closed.jaxpr, closed.consts, [None] * len(closed.jaxpr.invars), 0)
    if walker.unknown_branches:
        raise ValueError(f"{walker.unknown_branches} lax.cond/switch index(es) depend on data; counts would be bounds")
    return work
