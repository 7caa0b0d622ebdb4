"""What XLA's GPU compiler makes of the feedback solve, without a GPU: kernels, bytes, FLOPs.

    pip install "jax[cuda13]"          # the CUDA plugin and libraries; no GPU or driver needed
    python -m benchmarks.gpu_compile                       # B=8, T=8192, D=1024, bf16
    python -m benchmarks.gpu_compile --programs solve-fwd --dump /tmp/hlo   # + the optimized HLO

Programs: the recursive solve (forward; forward + backward), cuDNN causal attention (H heads),
and whole bf16 layers' forward + backward (Sessa with the recursive solve; the Transformer
layer: the same block with causal attention). Compiles each program ahead of time for an H100 (a deviceless
CUDA topology built from
``H100_TARGET``, the device description XLA publishes for the H100 SXM), then walks the
optimized HLO: every kernel launch (fusions, library calls) times its loop trip count, and for
``lax.switch`` branches inside a loop the histogram of the branch-index table the loop reads.
Per program it prints
  * ``launches``: kernels per call; ``in loops``: of those, inside while loops;
  * ``GEMM TF``: matrix-product FLOPs of the GEMM kernels (10^12), in bf16 passes (a dot with
    XLA's bf16x3 / bf16x6 algorithm counts 3 / 6 times; a float32 dot at HIGHEST, which runs
    on the CUDA cores, counts PEAK_FLOPS / FP32_FLOPS = 14.8 times: ``dot_passes``; so does a
    cuBLAS batched triangular solve's M^2 N per matrix, also float32 on the CUDA cores);
  * ``GEMM GB`` / ``other GB``: bytes the GEMM kernels and all other kernels read and write
    (operands read in full unless the fusion only slices them, directly or after element-for-element
    operations; in-place updates count the update);
  * ``exp in GEMM``: launches of GEMM kernels that compute an exponential in their epilogue
    (the known-statistics P tile made inside the logits product instead of a separate pass);
    with ``--kernels gpu_gemm`` the Mosaic GPU GEMM-with-epilogue kernels count as GEMM kernels
    with their exp: XLA sees them as opaque custom calls, so their FLOPs are computed from the
    kernel name and shapes (``MOSAIC_GEMM_PASSES``, ``MOSAIC_PRODUCT_PASSES``) and their bytes are their operands and
    results, each read once (a lower bound: the kernels reload q and k chunks per tile), of a
    full-length operand only the window a P-tile kernel reads (``MOSAIC_GEMM_ROLES``); a kernel
    that declares its cost (``pl.CostEstimate``, as the windowed fused push does) counts what it
    declares (``DECLARED_COST``);
  * ``HBM temp``: the compiled program's temporary buffers (``memory_analysis()``);
  * ``x - x``: subtractions of a value from itself, i.e. bf16x3 low parts the compiler zeroed
    (``precision.bf16_round_bits`` keeps this at 0; a split through float32(bfloat16(x)) did not);
  * ``roofline ms``: the sum over kernels of max(FLOPs / 989 TFLOP/s, bytes / 3.35 TB/s), the
    H100 SXM's dense bf16 and HBM peaks, plus ``--launch-us`` per launch. It is a lower bound
    that ranks variants; only a device measures time.
``--top N`` lists the N kernels moving the most bytes; ``--overhead N`` the N JAX ops (inside
loops or not) whose kernels spend the most roofline time above their FLOPs (``Walk.overhead``).
Nothing here runs on a GPU. Without the CUDA plugin the script says so and exits.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import pathlib
import re
import sys
import time
import unittest.mock

from benchmarks.harness import dims, nbytes

# XLA's H100 SXM device description (xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb), with the
# CUDA runtime this plugin ships.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 13 minor: 0 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
# bf16 passes of the solve's Mosaic GPU GEMM-with-epilogue kernels (ops/block_product_gpu.py), by
# kernel name: the forward's q k^T; the backward's q k^T, g s_hi^T and g s_lo^T.
MOSAIC_GEMM_PASSES = {"sessa_block_probs_gpu": 1, "sessa_block_probs_grad_gpu": 3}
# Their operands by role: the panel's starts (int32 (2,), or (4,) with two fillers), then each a
# row ("r": q, g, m, logl, delta, the rows' segment ids) or key ("k": k, s_hi, s_lo, the keys'
# segment ids) operand. Where
# the kernel reads a window of full-length operands it reads the panel's P rows or K keys of them.
MOSAIC_GEMM_ROLES = {"sessa_block_probs_gpu": "srkrrrk", "sessa_block_probs_grad_gpu": "srkrkkrrrrk"}
# The statistics kernel (ops/row_stats_gpu.py; q, k parts, [seg] -> m, logl (B, T)): row blocks of
# MOSAIC_STATS_BLOCK rows each read the key blocks up to the diagonal one, T (T + block) / 2 logits
# per batch row, contracted over D once per bf16 pass (one, or three with q and k split hi + lo).
MOSAIC_STATS = "sessa_row_stats_gpu"
MOSAIC_STATS_BLOCK = 64  # row_stats_gpu's default block_q = block_k
# A kernel's own cost declaration (``pl.CostEstimate``; the fused push declares its block's matrix
# FLOPs and bytes, which its windowed operands' shapes do not tell), as the optimized HLO prints it.
DECLARED_COST = r'cost_estimate_json = "\{\\22flops\\22: ([0-9.e+]+), .*?\\22bytes_accessed\\22: ([0-9]+)'

# The fused forward push (q, k, s parts -> P s, (B, P, Dv) float32), by kernel name the bf16
# passes of its product: per program (row block, Dv tile of at most MOSAIC_PRODUCT_BLOCK_V
# columns) one logits pass over D, then P_hi s_hi, P_hi s_lo, P_lo s_hi (bf16x3) or P_hi s, P_lo s
# (bfloat16: s rounded once) over its Dv tile; a Dv over the tile recomputes the logits.
MOSAIC_PRODUCT_PASSES = {"sessa_block_product_gpu": 3, "sessa_block_product_bf16_gpu": 2}
MOSAIC_PRODUCT_BLOCK_V = 256  # block_product_gpu.BLOCK_V
# The in-place accumulating product (ops/accumulate_gpu.py; starts, a, b, acc -> acc aliased):
# acc[window of M rows] += op(a) b[window of C rows], one bf16 pass, by kernel name whether op(a)
# is a^T (a (B, C, M)) or a (a (B, M, C)). It reads a, C rows of b and M rows of acc, and writes
# those M rows back. Where the kernel declares its cost (operands in parts, the add-and-cast
# variant) the walk takes the declaration; this reading serves checkouts whose kernel declared none.
MOSAIC_ACCUMULATE = {"sessa_accumulate_product_gpu": False, "sessa_accumulate_product_t_gpu": True}
PEAK_FLOPS = 989e12
PEAK_BYTES = 3.35e12
FP32_FLOPS = 67e12  # H100 SXM without tensor cores: where a float32 dot at HIGHEST runs

_HEAD = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{\s*$")


def _allocates_only(inst) -> bool:
    """An uninitialized buffer (``lax.empty``: XLA's "AllocateBuffer" custom call, which buffer
    assignment serves without a kernel, as XLA's own pass that replaces zero-filled loop inputs
    with it relies on): no launch, no bytes."""
    return inst.op == "custom-call" and inst.attr("custom_call_target") == '"AllocateBuffer"'


_FREE = {
    "fusion-done",
    "parameter",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "constant",
    "while",
    "conditional",
    "call",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
}


def dot_passes(attrs: str, lhs_type: str) -> float:
    """bf16 tensor-core passes one FLOP of this dot costs: 3 / 6 for XLA's bf16x3 / bf16x6
    algorithms, PEAK_FLOPS / FP32_FLOPS for a float32 dot at HIGHEST (CUDA cores), else 1."""
    passes = re.search(r"algorithm=dot_bf16_bf16_f32_x(\d)", attrs)
    if passes:
        return float(passes.group(1))
    if lhs_type.startswith("f32") and "operand_precision={highest,highest}" in attrs:
        return PEAK_FLOPS / FP32_FLOPS
    return 1.0


# Ops that make each element from the same element of their operands (with bitcast, which only
# renames the shape): a fusion that slices their result reads only the sliced part of the operand.
_ELEMENTWISE = frozenset(
    "bitcast convert copy multiply add subtract divide maximum minimum negate abs exponential log "
    "select compare and or not tanh sqrt rsqrt power".split()
)


def _tuple_elements(type_text: str) -> list[str]:
    """Top-level elements of an HLO tuple type "(a, (b, c), d)"."""
    out, depth, start = [], 0, 1
    for i, ch in enumerate(type_text):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if (ch == "," and depth == 1) or (ch == ")" and depth == 0):
            out.append(re.sub(r"/\*.*?\*/", "", type_text[start:i]).strip())
            start = i + 1
    return out


class Inst:
    """One HLO instruction: name, result type, opcode, operand names and the attribute text."""

    def __init__(self, line: str):
        body = line.strip()
        if body.startswith("ROOT "):
            body = body[5:]
        self.name, rest = body[1:].split(" = ", 1)
        if rest.startswith("("):  # a tuple type: up to its matching parenthesis
            depth = 0
            for i, ch in enumerate(rest):
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0:
                    break
            self.type, rest = rest[: i + 1], rest[i + 2 :]
        else:
            self.type, rest = rest.split(" ", 1)
        self.op, rest = rest.split("(", 1)
        depth, i = 1, 0
        while depth:
            depth += {"(": 1, ")": -1}.get(rest[i], 0)
            i += 1
        if self.op == "fusion-start":  # an async fusion: the kernel; its type is (operands, output, token)
            self.op, self.type = "fusion", _tuple_elements(self.type)[1]
        self.args = rest[: i - 1]  # the text inside the parentheses: operands, or a literal
        self.operands = re.findall(r"%([^\s,()]+)", self.args)
        self.attrs = rest[i:]

    def attr(self, key: str):
        m = re.search(key + r"=%?([^\s,]+)", self.attrs)
        return m.group(1) if m else None


def parse(text: str) -> tuple[dict[str, list[Inst]], str]:
    """{computation: instructions} and the entry computation's name."""
    comps, cur, entry = {}, None, None
    for line in text.splitlines():
        m = _HEAD.match(line)
        if m:
            cur = comps.setdefault(m.group(1), [])
            entry = m.group(1) if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            cur = None
        elif cur is not None and line.strip().startswith(("%", "ROOT %")):
            cur.append(Inst(line))
    return comps, entry


class Walk:
    """Kernel launches of a compiled module, with loop trip counts and switch-branch histograms."""

    def __init__(self, text: str, dynamic_trips=(1.0, 1.0)):
        """``dynamic_trips``: trips charged to a loop without a known trip count, (outer, nested):
        the tile loops of the solve's wide blocks (rows, then keys), whose counts depend on j;
        or a function of the while instruction's result type giving that pair per loop."""
        self.dynamic_trips = dynamic_trips
        self.comps, self.entry = parse(text)
        self.by_name = {c: {i.name: i for i in insts} for c, insts in self.comps.items()}
        self.kernels = collections.Counter()  # (comp, inst name) -> launches
        self.loop_launches = 0
        self.looped = set()  # (comp, inst name) of the kernels launched inside a while loop
        self.unresolved = 0  # switches whose branch-index table was not found (branches then equally likely)
        self.dynamic_loops = 0  # while loops without a known trip count (charged ``dynamic_trips``)

    def run(self):
        self._visit(self.entry, 1.0, None, in_loop=False)
        return self

    def _constant_values(self, comp: str, name: str, loop):
        """Values of an s32 constant array reaching ``name`` (directly or through a loop tuple)."""
        inst = self.by_name[comp].get(name)
        while inst is not None and inst.op in ("copy", "bitcast"):
            inst = self.by_name[comp].get(inst.operands[0])
        if inst is None:
            return None
        if inst.op == "constant":
            vals = re.fullmatch(r"\{([-0-9, ]*)\}", inst.args.strip())
            return [int(v) for v in vals.group(1).split(",") if v.strip()] if vals else None
        if inst.op == "get-tuple-element" and loop is not None:
            parent_comp, while_inst = loop
            init = self.by_name[parent_comp][while_inst.operands[0]]
            index = int(inst.attr("index"))
            if init.op == "tuple" and index < len(init.operands):
                return self._constant_values(parent_comp, init.operands[index], None)
        return None

    def _branch_counts(self, comp: str, inst: Inst, n_branches: int, trips: float, loop):
        """How often each branch runs per visit of ``comp``: the histogram of the index table."""
        index = self.by_name[comp][inst.operands[0]]
        while index.op == "bitcast":
            index = self.by_name[comp][index.operands[0]]
        for operand in index.operands:
            vals = self._constant_values(comp, operand, loop)
            if vals is not None and len(vals) >= trips - 1:
                hist = collections.Counter(min(max(v, 0), n_branches - 1) for v in vals[: int(trips)])
                return [hist.get(b, 0) / trips for b in range(n_branches)]
        self.unresolved += 1
        return [1.0 / n_branches] * n_branches

    def _visit(self, comp: str, times: float, loop, in_loop: bool, trips: float = 1.0, dynamic: int = 0):
        for inst in self.comps[comp]:
            if inst.op == "while":
                n = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
                trips_of = self.dynamic_trips(inst.type) if callable(self.dynamic_trips) else self.dynamic_trips
                t = float(n.group(1)) if n else trips_of[min(dynamic, 1)]
                self.dynamic_loops += n is None
                self._visit(inst.attr("body"), times * t, (comp, inst), True, t, dynamic + (n is None))
                self._visit(inst.attr("condition"), times * (t + 1), None, True)
            elif inst.op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", inst.attrs).group(1)
                names = [b.strip().lstrip("%") for b in branches.split(",")]
                for name, share in zip(names, self._branch_counts(comp, inst, len(names), trips, loop)):
                    if share:
                        self._visit(name, times * share, None, in_loop, dynamic=dynamic)
            elif inst.op == "call":
                self._visit(inst.attr("to_apply"), times, loop, in_loop, trips, dynamic)
            elif inst.op not in _FREE and not _allocates_only(inst):
                self.kernels[(comp, inst.name)] += times
                self.loop_launches += times if in_loop else 0
                if in_loop:
                    self.looped.add((comp, inst.name))

    # --- costs of one kernel ---------------------------------------------------------------
    def _fused(self, inst: Inst):
        callee = inst.attr("calls")
        return self.comps.get(callee, []) if callee else []

    def _window_share(self, inst: Inst, pos: int, operand: Inst) -> float:
        """Share of operand ``pos`` a P-tile kernel reads: its panel's rows or keys of a full-length
        operand (``MOSAIC_GEMM_ROLES``; the panel is the first output's (B, P, K)); 1 elsewhere."""
        roles = next((r for name, r in MOSAIC_GEMM_ROLES.items() if f"/{name}/" in inst.attrs), None)
        if inst.op != "custom-call" or roles is None or pos >= len(roles) or roles[pos] == "s":
            return 1.0
        starts = self._type_of(inst.operands[0], inst)
        if len(dims(starts)) != 1 or not starts.startswith("s32"):  # a kernel without windows
            return 1.0
        out, shape = dims(_tuple_elements(inst.type)[0] if inst.type.startswith("(") else inst.type), dims(operand.type)
        if len(out) != 3 or len(shape) < 2 or not shape[1]:
            return 1.0
        return min(1.0, out[1 if roles[pos] == "r" else 2] / shape[1])

    def _accumulation(self, inst: Inst):
        """(B, M, C, N, element bytes of acc) of an in-place accumulating product kernel
        (``MOSAIC_ACCUMULATE``), else None."""
        transposed = next((t for name, t in MOSAIC_ACCUMULATE.items() if f"/{name}/" in inst.attrs), None)
        if inst.op != "custom-call" or transposed is None or len(inst.operands) != 4:
            return None
        a = dims(self._type_of(inst.operands[1], inst))
        if len(a) != 3 or len(dims(inst.type)) != 3:
            return None
        b, m, c = (a[0], a[2], a[1]) if transposed else a
        return b, m, c, dims(inst.type)[2], nbytes(inst.type) // max(1, math.prod(dims(inst.type)))

    def _read_bytes(self, comp: str, inst: Inst) -> int:
        """Bytes read: each operand in full, or only what the fusion slices out of it, or the
        window of it that a P-tile kernel reads (``_window_share``); an accumulating product
        reads its tile, the b window and the acc window (``_accumulation``)."""
        acc = self._accumulation(inst)
        if acc is not None:
            b, m, c, n, width = acc
            return nbytes(self._type_of(inst.operands[1], inst)) + b * c * n * 2 + b * m * n * width
        fused = self._fused(inst)
        total = 0
        for pos, name in enumerate(inst.operands):
            operand = self.by_name[comp].get(name)
            size = nbytes(operand.type) * self._window_share(inst, pos, operand) if operand is not None else 0
            param = next((i for i in fused if i.op == "parameter" and i.args.strip() == str(pos)), None)
            sliced = self._sliced_elements(fused, param) if param is not None else None
            if sliced is not None:
                # slices read only what they take; an in-place update reads nothing of its buffer
                size = min(size, sliced * nbytes(param.type) // max(1, math.prod(dims(param.type))))
            total += size
        return total

    @staticmethod
    def _sliced_elements(fused: list[Inst], param: Inst) -> int | None:
        """Elements of ``param`` a fusion reads where it reaches its every use only through slices
        (of it, or of arrays made from it element for element: bitcasts, conversions, elementwise
        arithmetic of its shape) and in-place updates of it (which read none); None otherwise."""
        count = math.prod(dims(param.type))
        chain, frontier, sliced = {param.name}, [param.name], 0
        while frontier:
            name = frontier.pop()
            users = [i for i in fused if name in i.operands]
            if not users:
                return None  # the fusion's result itself
            for u in users:
                if u.op in ("dynamic-slice", "slice") and u.operands[0] == name:
                    sliced += math.prod(dims(u.type))
                elif u.op == "dynamic-update-slice" and u.operands[0] == name and name == param.name:
                    continue
                elif u.op in _ELEMENTWISE and math.prod(dims(u.type)) == count and u.name not in chain:
                    chain.add(u.name)
                    frontier.append(u.name)
                elif u.name not in chain:
                    return None
        return sliced

    def _written_bytes(self, inst: Inst) -> int:
        """Bytes written: the result, or only the update where the fusion (or an accumulating
        product's kernel) updates a buffer in place."""
        acc = self._accumulation(inst)
        if acc is not None:
            b, m, _, n, width = acc
            return b * m * n * width
        fused = {i.name: i for i in self._fused(inst)}
        root = self._fused(inst)[-1] if fused else None
        roots = (
            [root]
            if root is not None and root.op != "tuple"
            else [fused.get(n) for n in (root.operands if root else [])]
        )
        if roots and all(r is not None and r.op == "dynamic-update-slice" for r in roots):
            return sum(nbytes(fused[r.operands[1]].type) if r.operands[1] in fused else 0 for r in roots)
        return nbytes(inst.type)

    def _type_of(self, name: str, kernel: Inst) -> str:
        """Type of ``name``: inside ``kernel``'s fused computation, else wherever it is defined."""
        for scope in [{i.name: i for i in self._fused(kernel)}, *self.by_name.values()]:
            if name in scope:
                return scope[name].type
        return ""

    def _gemm_flops(self, inst: Inst) -> float:
        """2 M N K summed over the dots of a GEMM kernel (0 for other kernels)."""
        dots = [i for i in self._fused(inst) if i.op == "dot"]
        target = inst.attr("custom_call_target") or ""
        if inst.op == "custom-call" and "fmha" in target:
            return self._attention_flops(inst, target)
        if inst.op == "custom-call" and target.strip('"').startswith("mosaic_gpu"):
            return self._mosaic_flops(inst, inst)
        mosaic = self._mosaic_calls(inst)  # e.g. in XLA's dynamic-slice fusion around a custom call
        if mosaic:
            return sum(self._mosaic_flops(call, inst) for call in mosaic)
        if inst.op == "custom-call" and "triangularSolve" in target:  # cuBLAS's batched trsm, float32
            return self._trsm_flops(inst)
        if inst.op == "custom-call" and ("gemm" in target or "matmul" in target):  # cuBLAS, cuBLASLt
            dots = [inst]
        flops = 0.0
        for d in dots:
            lhs = self._type_of(d.operands[0], inst)
            contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", d.attrs)
            if contracting:
                axes = contracting.group(1).split(",")
            else:  # a cuBLAS call's backend config: "lhs_contracting_dimensions":["2"]
                contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', d.attrs)
                axes = contracting.group(1).replace('"', "").split(",") if contracting else []
            k = 1
            for axis in (int(a) for a in axes if a):
                k *= dims(lhs)[axis]
            out = 1
            # a cuBLAS call returns (result, workspace)
            for x in dims(_tuple_elements(d.type)[0] if d.type.startswith("(") else d.type):
                out *= x
            flops += 2.0 * out * k * dot_passes(d.attrs, lhs)
        return flops

    def _trsm_flops(self, inst: Inst) -> float:
        """A batched triangular solve's M^2 N FLOPs per matrix (left side: (M, M) triangle, (M, N)
        right-hand side), in bf16-pass units: float32 on the CUDA cores, PEAK_FLOPS / FP32_FLOPS."""
        rhs = dims(self._type_of(inst.operands[1], inst))
        batch = math.prod(rhs[:-2])
        return float(batch * rhs[-2] ** 2 * rhs[-1]) * PEAK_FLOPS / FP32_FLOPS

    def _mosaic_calls(self, inst: Inst) -> list[Inst]:
        """The Mosaic GPU custom calls inside a fusion (XLA fuses the dynamic slices of a custom
        call's operands into it where it can)."""
        return [
            i
            for i in self._fused(inst)
            if i.op == "custom-call" and (i.attr("custom_call_target") or "").strip('"').startswith("mosaic_gpu")
        ]

    def _mosaic_flops(self, inst: Inst, kernel: Inst) -> float:
        """The GEMM FLOPs of the solve's Mosaic GPU GEMM-with-epilogue kernels, which XLA sees as
        opaque custom calls: 2 B P K D per bf16 pass, read off the kernel name in the op metadata,
        the first output (B, P, K) and q's (B, P, D); for the fused push (``MOSAIC_PRODUCT_PASSES``,
        output (B, P, Dv), k (B, K, D) its second operand) 2 B P K (ceil(Dv / 256) D + n Dv) with
        n = 3 (bf16x3) or 1 (bfloat16); for the statistics kernel (``MOSAIC_STATS``, q (B, T, D)
        its first operand, q and k one or two bf16 parts each) B T (T + 64) D per bf16 pass; 0
        for other Mosaic kernels."""
        out = dims(_tuple_elements(inst.type)[0] if inst.type.startswith("(") else inst.type)
        d = dims(self._type_of(inst.operands[0], kernel))
        if f"/{MOSAIC_STATS}/" in inst.attrs:
            if len(d) != 3:
                return 0.0
            parts = sum(dims(self._type_of(op, kernel)) == d for op in inst.operands) // 2
            b, t, width = d
            return float(b * t * (t + MOSAIC_STATS_BLOCK) * width * (3 if parts == 2 else 1))
        accumulation = self._accumulation(inst)
        if accumulation is not None:
            b, m, c, n, _ = accumulation
            return 2.0 * b * m * c * n
        product_passes = next((n for name, n in MOSAIC_PRODUCT_PASSES.items() if f"/{name}/" in inst.attrs), 0)
        if product_passes:  # (a kernel that declares its cost does not get here: ``_declared``)
            first = 1 if len(d) == 1 and len(inst.operands) > 2 else 0  # the window's starts come first
            d, keys = (dims(self._type_of(inst.operands[first + i], kernel)) for i in (0, 1))
            if len(out) != 3 or len(d) != 3 or len(keys) != 3:
                return 0.0
            b, p, dv = out
            logits_passes = -(-dv // MOSAIC_PRODUCT_BLOCK_V)
            return 2.0 * b * p * keys[1] * (logits_passes * d[2] + product_passes * dv)
        passes = next((n for name, n in MOSAIC_GEMM_PASSES.items() if f"/{name}/" in inst.attrs), 0)
        if len(d) == 1 and len(inst.operands) > 1:  # the panel's starts come first: q is next
            d = dims(self._type_of(inst.operands[1], kernel))
        if not passes or len(out) != 3 or len(d) != 3:
            return 0.0
        return 2.0 * passes * out[0] * out[1] * out[2] * d[2]

    def _attention_flops(self, inst: Inst, target: str) -> float:
        """cuDNN fused attention: 4 B H T^2 d forward (two products), 10 B H T^2 d backward (five),
        halved for a causal mask; q's (B, T, H, d) is the first operand."""
        b, t, h, d = dims(self._type_of(inst.operands[0], inst)) or (0, 0, 0, 0)
        causal = 0.5 if "CAUSAL" in inst.attrs else 1.0
        return (10.0 if "Backward" in target else 4.0) * b * h * t * t * d * causal

    def _declared(self, inst: Inst):
        """(FLOPs, bytes) a Mosaic GPU kernel declares in its ``pl.CostEstimate`` (the custom call's
        ``cost_estimate_json``), summed over the calls of a fusion around such calls; None where
        a kernel declares none."""
        calls = [inst] if inst.op == "custom-call" else self._mosaic_calls(inst)
        found = [re.search(DECLARED_COST, call.attrs) for call in calls]
        if not calls or not all(found):
            return None
        return sum(float(m.group(1)) for m in found), sum(int(m.group(2)) for m in found)

    def _cost(self, comp: str, name: str) -> tuple[Inst, float, int]:
        """(instruction, GEMM FLOPs, bytes moved) of one launch of kernel ``name``: what a kernel
        declares (``_declared``), else what the walk counts."""
        inst = self.by_name[comp][name]
        declared = self._declared(inst)
        if declared is not None:
            return inst, *declared
        return inst, self._gemm_flops(inst), self._read_bytes(comp, inst) + self._written_bytes(inst)

    @staticmethod
    def _source_op(inst: Inst) -> str | None:
        """The JAX op a kernel comes from: the last part of its ``op_name``, or None without one."""
        source = re.search(r'op_name="([^"]*)"', inst.attrs)
        return source.group(1).rsplit("/", 1)[-1] if source else None

    def top(self, count: int):
        """The ``count`` kernels moving the most bytes per call: (GB, TF, launches, shape, source op)."""
        rows = []
        for (comp, name), times in self.kernels.items():
            inst, flops, moved = self._cost(comp, name)
            source = self._source_op(inst) or ""
            rows.append((times * moved / 1e9, times * flops / 1e12, times, inst.type[:40], f"{name} <- {source}"))
        return sorted(rows, reverse=True)[:count]

    def overhead(self, launch_us: float):
        """Where the roofline spends time above its FLOP floor: per (JAX op, in a loop) that the
        kernels come from (the last part of their ``op_name``), the launches and the seconds of
        max(FLOPs / PEAK_FLOPS, bytes / PEAK_BYTES) + launch beyond FLOPs / PEAK_FLOPS; largest first."""
        groups = collections.defaultdict(lambda: [0.0, 0.0])
        for (comp, name), times in self.kernels.items():
            inst, flops, moved = self._cost(comp, name)
            op = self._source_op(inst) or f"({inst.op})"
            seconds = max(flops / PEAK_FLOPS, moved / PEAK_BYTES) + launch_us * 1e-6 - flops / PEAK_FLOPS
            group = groups[(op, (comp, name) in self.looped)]
            group[0] += times
            group[1] += times * seconds
        return sorted(((op, loop, n, s) for (op, loop), (n, s) in groups.items()), key=lambda r: -r[3])

    def table(self, launch_us: float):
        """Totals over all launches: see the module docstring."""
        out = dict(launches=0.0, gemm_flops=0.0, gemm_bytes=0.0, other_bytes=0.0, roofline_s=0.0, gemm_exp=0.0)
        for (comp, name), times in self.kernels.items():
            inst, flops, moved = self._cost(comp, name)
            out["launches"] += times
            solve = "triangularSolve" in (inst.attr("custom_call_target") or "")  # no exponential in it
            mosaic_gemm = flops > 0 and not solve and (inst.op == "custom-call" or bool(self._mosaic_calls(inst)))
            if flops and (mosaic_gemm or any(i.op == "exponential" for i in self._fused(inst))):
                out["gemm_exp"] += times
            out["gemm_flops"] += times * flops
            out["gemm_bytes" if flops else "other_bytes"] += times * moved
            out["roofline_s"] += times * (max(flops / PEAK_FLOPS, moved / PEAK_BYTES) + launch_us * 1e-6)
        out["loop_launches"] = self.loop_launches
        return out


def _wide_trips(sched) -> tuple[float, float]:
    """(row tiles, key tiles) per wide block the loops of ``sched`` push, averaged over them."""
    wide = [(j, r0) for j, r0, *_ in sched.tiles() if sched.has_wide and sched.branch[j] == 1 + len(sched.shapes)]
    if not wide:
        return 1.0, 1.0
    blocks, row_tiles = len({j for j, _ in wide}), len(set(wide))
    return row_tiles / blocks, len(wide) / row_tiles


def static_span_rule(static_span: int | None):
    """Context in which the solve's default static span (``recursive.default_static_span``, as the
    solve and the layers resolve it) is ``static_span`` (0: none, every push in the loop);
    None: the library's own rule."""
    import contextlib

    from sessa_jax.ops.solve import recursive

    if static_span is None:
        return contextlib.nullcontext()
    if hasattr(recursive, "default_static_span"):
        rule = lambda n, tile_leaves, tier, kernels, platform: static_span or None  # noqa: E731
        return unittest.mock.patch.object(recursive, "default_static_span", rule)
    return unittest.mock.patch.object(recursive, "auto_static_span", lambda n, tile_leaves: static_span or None)


def wide_tile_trips(
    t: int,
    leaf: int,
    tile: int | None,
    static_span=None,
    b: int = 0,
    d: int = 0,
    tier: str = "bf16x3",
    kernels: str = "xla",
):
    """Trips charged to the solve's dynamic tile loops (rows, then keys; key tiles as total
    tiles / row tiles), averaged over the wide blocks the loops push. The statistics pass's loop
    pushes every wide block, the forward's and backward's only those ``static_span`` leaves
    there; with ``b`` and ``d`` given and the two differing, a function of a loop's type that
    tells them apart (the pushes carry a float32 (B, Tp, D) buffer, the statistics pass not)."""
    from sessa_jax.ops.dispatch import recursive_tile
    from sessa_jax.ops.solve.recursive import RecursivePlan

    with static_span_rule(static_span):
        # older checkouts: no static span, no kernels argument
        extra = {"static_span": "auto", "kernels": kernels} if hasattr(RecursivePlan, "stats_schedule") else {}
        plan = RecursivePlan.make(t, leaf, tile or recursive_tile(t, leaf), tier, "gpu", 1.0, **extra)
    pushes = _wide_trips(plan.schedule)
    stats = _wide_trips(getattr(plan, "stats_schedule", plan.schedule))
    if stats == pushes or not (b and d):
        return pushes
    marker = f"f32[{b},{plan.padded_len},{d}]"
    return lambda loop_type: pushes if marker in loop_type else stats


def self_subtractions(text: str) -> int:
    """Subtractions of a value from itself in compiled HLO: what a bf16 hi/lo split becomes when
    the compiler drops its float32(bfloat16(x)) round trip (the low part is then always 0)."""
    return len(re.findall(r"subtract\(%([^,\s]+), %\1\)", text))


def compile_only_cuda() -> None:
    """Keeps the CUDA plugin (where installed) off any local GPU and driver: read when JAX
    starts its backends, so call it before the first JAX computation."""
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")  # never touch a local GPU: compile only
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver to check against


def optimized_hlo(compiled) -> str:
    """The compiled module's text with large constants printed (the switch-index tables)."""
    try:
        import jaxlib._hlo as hlo

        options = hlo.HloPrintOptions()
        options.print_large_constants = True
        return compiled.runtime_executable().hlo_modules()[0].to_string(options)
    except Exception:  # noqa: BLE001 - older jaxlib: constants elided, branches then guessed
        return compiled.as_text()


def solve_tier(precision: str, platform: str = "gpu") -> str:
    """The tier a bf16 solve runs on ``platform`` at ``precision`` ("auto": the library's rule)."""
    if precision != "auto":
        return precision
    import jax.numpy as jnp

    from sessa_jax.ops.solve.precision import resolve_precision

    try:
        return resolve_precision("auto", platform, jnp.bfloat16)
    except TypeError:  # older checkouts: a rule by platform alone
        return resolve_precision("auto", platform)


def add_solve_options(p: argparse.ArgumentParser, static_span_scope: str) -> None:
    """The solve's --precision, --packed and --static-span, shared by the GPU and TPU compile reports."""
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "bf16x3", "bfloat16"],
        help="the solve's tier (feedback_precision of the layers); auto: the library's rule for bf16",
    )
    p.add_argument(
        "--packed",
        action="store_true",
        help="give the solve segment ids (one segment: the masked path) instead of None",
    )
    p.add_argument(
        "--static-span",
        type=int,
        default=None,
        help=f"the static span of {static_span_scope} (schedule.PushSchedule; 0: every push in the loop); "
        "default: the library's rule (recursive.default_static_span)",
    )


def programs(
    b: int,
    t: int,
    d: int,
    h: int,
    leaf: int,
    tile: int | None,
    kernels: str = "xla",
    packed: bool = False,
    precision: str = "auto",
):
    """name -> (function, argument shapes) of the programs this report compiles. ``packed``:
    the solve gets segment ids (all one segment: the masked path); otherwise None, as an
    unpacked layer passes it. ``precision``: the solve's tier (the layers' feedback_precision;
    "auto" there is the library's rule, in the solve alone ``precision.resolve_precision``)."""
    import jax
    import jax.numpy as jnp

    from sessa_jax.ops.dispatch import recursive_tile
    from sessa_jax.ops.solve.recursive import recursive_feedback_solve

    tile = tile or recursive_tile(t, leaf)
    tier = solve_tier(precision)

    def solve(q, k, g, f):
        seg = jnp.zeros(g.shape, jnp.int32) if packed else None
        extra = {} if kernels == "xla" else {"kernels": kernels}  # older checkouts have no kernels argument
        return recursive_feedback_solve(
            q, k, g, f, seg, leaf_size=leaf, tile=tile, tier=tier, platform="gpu", dtype=jnp.float32, **extra
        )

    def attention(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def loss(fn):
        return jax.grad(
            lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=tuple(range(3 if fn is attention else 4))
        )

    sds = jax.ShapeDtypeStruct
    x, heads = sds((b, t, d), jnp.bfloat16), sds((b, t, h, d // h), jnp.bfloat16)
    solve_args = (x, x, sds((b, t), jnp.float32), x)
    table = {
        "solve-fwd": (solve, solve_args),
        "solve-f+b": (loss(solve), solve_args),
        "attention-fwd": (attention, (heads,) * 3),
        "attention-f+b": (loss(attention), (heads,) * 3),
    }
    for kind in ("sessa", "transformer"):
        table[f"{kind}-layer-f+b"] = _layer_program(kind, b, t, d, h, leaf, precision, kernels)
    return table


def _layer_program(kind: str, b: int, t: int, d: int, h: int, leaf: int, precision: str = "auto", kernels: str = "xla"):
    """Forward + backward of a whole bf16 ``SessaLayer`` (kind "sessa": the recursive solve at
    ``precision`` and feedback ``kernels``; "transformer": the same block with causal attention),
    as ``benchmarks.layer`` times it on a device."""
    import jax
    import jax.numpy as jnp

    from sessa_jax import SessaConfig, SessaLayer

    cfg = SessaConfig(
        d_model=d,
        n_heads=h,
        solver="recursive",
        leaf_size=leaf,
        feedback_precision=precision,
        dtype=jnp.bfloat16,
        max_len=t,
    )
    # init traces on the CPU at 16 tokens, which the opt-in kernels refuse; the parameters are the same
    params = jax.eval_shape(
        SessaLayer(cfg, kind=kind).init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((b, 16, d), jnp.bfloat16)
    )
    if kernels != "xla":  # older checkouts have no feedback_kernels
        cfg = dataclasses.replace(cfg, feedback_kernels=kernels)
    layer = SessaLayer(cfg, kind=kind)

    def loss(p, x):
        return jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2)

    return jax.value_and_grad(loss, argnums=(0, 1)), (params, jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--D", type=int, default=1024)
    p.add_argument("--H", type=int, default=8, help="heads of the attention compared with")
    p.add_argument(
        "--leaf",
        type=int,
        default=None,
        help="leaf of the solve and the layers (default: the library's rule for leaf_size='auto' on a GPU, "
        "ops.dispatch.recursive_leaf)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="tile of the wide blocks, in the solve and the layers (default: ops.dispatch.recursive_tile)",
    )
    p.add_argument(
        "--programs",
        nargs="+",
        default=[
            "solve-fwd",
            "solve-f+b",
            "attention-fwd",
            "attention-f+b",
            "sessa-layer-f+b",
            "transformer-layer-f+b",
        ],
    )
    add_solve_options(p, "the solve and the layers")
    p.add_argument(
        "--kernels",
        choices=["xla", "pallas", "gpu_gemm"],
        default="xla",
        help="pallas: the Mosaic GPU statistics kernel (D a multiple of 64 up to 256); gpu_gemm: the "
        "Mosaic GPU GEMM-with-epilogue kernels of the pushes' P and dL tiles (solve and Sessa layer)",
    )
    p.add_argument("--launch-us", type=float, default=4.0)
    p.add_argument("--top", type=int, default=0, help="also list the kernels moving the most bytes")
    p.add_argument(
        "--overhead",
        type=int,
        default=0,
        help="also list the JAX ops whose kernels spend the most roofline time above their FLOPs (launches, bytes)",
    )
    p.add_argument("--dump", type=pathlib.Path, default=None, help="write each optimized HLO here")
    args = p.parse_args(argv)

    compile_only_cuda()
    import jax

    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET, topology="1x1x1")
    except Exception as err:  # noqa: BLE001 - say why, do not pretend
        sys.exit(
            f"gpu_compile: no deviceless CUDA compiler here ({type(err).__name__}: {str(err)[:300]}); "
            f"install the CUDA plugin: pip install 'jax[cuda13]'"
        )
    from jax.sharding import NamedSharding, PartitionSpec

    from sessa_jax.ops import dispatch

    tile_rule = dispatch.recursive_tile if args.tile is None else (lambda length, leaf: args.tile)
    if args.leaf is None:  # older checkouts: leaf 512, their default
        rule = getattr(dispatch, "recursive_leaf", lambda length, platform, kernels: 512)
        args.leaf = rule(args.T, "gpu", args.kernels)
    sharding = NamedSharding(topologies.make_mesh(topo, (1,), ("x",)), PartitionSpec())
    table = programs(args.B, args.T, args.D, args.H, args.leaf, args.tile, args.kernels, args.packed, args.precision)
    print(
        f"# XLA GPU compile for an H100 (deviceless), jax {jax.__version__}, B={args.B} T={args.T} D={args.D} "
        f"H={args.H} bf16, leaf {args.leaf}, precision {args.precision} ({solve_tier(args.precision)}), "
        f"kernels {args.kernels}, "
        f"static span {'default' if args.static_span is None else args.static_span}, "
        f"solve segment ids: {'one segment (masked)' if args.packed else 'None'}"
    )
    print(
        "| program | launches | in loops | GEMM TF | GEMM GB | other GB | exp in GEMM | roofline ms | HBM temp | x - x "
        "| compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.programs:
        fn, shapes = table[name]
        specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)
        t0 = time.perf_counter()
        try:
            # The layer's dispatch picks its paths by jax.default_backend(), which is the CPU here:
            # trace as on a GPU (recursive solve, bf16x3 split, cuDNN attention).
            # --tile reaches the layers too, which take their tile from ops.dispatch.
            with (
                unittest.mock.patch.object(jax, "default_backend", lambda: "gpu"),
                unittest.mock.patch.object(dispatch, "recursive_tile", tile_rule),
                static_span_rule(args.static_span),
            ):
                lowered = jax.jit(fn).lower(*specs)
            compiled = lowered.compile()
            text = optimized_hlo(compiled)
        except Exception as err:  # noqa: BLE001 - one program failing does not hide the others
            print(f"| {name} | failed: {type(err).__name__}: {str(err)[:200]} |")
            continue
        seconds = time.perf_counter() - t0
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{name}.hlo.txt").write_text(text)
        trips = wide_tile_trips(
            args.T, args.leaf, args.tile, args.static_span, args.B, args.D, solve_tier(args.precision), args.kernels
        )
        walk = Walk(text, trips).run()
        r = walk.table(args.launch_us)
        note = f" ({walk.unresolved} switches guessed)" if walk.unresolved else ""
        print(
            f"| {name}{note} | {r['launches']:.0f} | {r['loop_launches']:.0f} | {r['gemm_flops'] / 1e12:.2f} | "
            f"{r['gemm_bytes'] / 1e9:.2f} | {r['other_bytes'] / 1e9:.2f} | {r['gemm_exp']:.0f} | "
            f"{r['roofline_s'] * 1e3:.2f} | "
            f"{compiled.memory_analysis().temp_size_in_bytes / 2**30:.2f} GiB | {self_subtractions(text)} | "
            f"{seconds:.1f} |",
            flush=True,
        )
        for gb, tf, times, shape, what in walk.top(args.top):
            print(f"    {gb:7.2f} GB {tf:6.2f} TF x{times:6.1f}  {shape:40s} {what}")
        for op, looped, launches, seconds in walk.overhead(args.launch_us)[: args.overhead]:
            where = " (in loops)" if looped else ""
            print(f"    {seconds * 1e3:7.3f} ms over FLOPs  {launches:6.0f} launches  {op}{where}")


if __name__ == "__main__":
    main()
