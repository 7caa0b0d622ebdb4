"""Recursive known-statistics feedback solve: the accelerator path.

Forward, on q, k, f (B, Tp, D) and gamma (B, Tp) with Tp = n * Cs:
  1. (m, logl) = row statistics of the strict-past softmax (one parallel logits pass).
  2. Every diagonal leaf at once: A_ii = exp((L_ii - m) - logl) masked, and
     Y_i = A_ii X_i with X_i = (I - G_i A_ii)^-1 = I + G_i Y_i (``trsolve.lower_resolvent``).
  3. One ``lax.scan`` over leaves i = 0 .. n-1 (the sequential spine):
         r_i = racc_i + Y_i (f_i + gamma_i racc_i),  s_i = f_i + gamma_i r_i
     (s_i = X_i (f_i + gamma_i racc_i), and r_i = racc_i + A_ii s_i without a product by A_ii)
         push block j = i + 1 (``schedule.PushSchedule``): racc[R_j] += A[R_j, K_j] s[K_j],
     where the block's shape picks a ``lax.switch`` branch and A's entries are rebuilt from
     the known statistics in tiles: two large matrix products per tile.
Residuals: q, k, gamma, seg, s, r = A s (float32), (m, logl) and the diagonal leaves A_ii, Y_i
((B, n, Cs, Cs) each: in a jitted forward + backward XLA kept them from the forward anyway, so
rebuilding them only added work); never the off-diagonal blocks of A.

Backward: lam = (I - Gamma A)^-T ds by the mirror scan i = n-1 .. 0, with w_i = ds_i + bacc_i,
         lam_i = X_i^T w_i = w_i + Y_i^T (gamma_i w_i),  g_i = gamma_i lam_i,  delta_i = rowsum(g_i * r_i),
         dgamma_i = rowsum(lam_i * r_i)  (r is read once, per leaf),
         push block j = i:  bacc[K_j] += A^T g[R_j],  and, since everything the logits
         gradient dL = A * (g s^T - rowsum(g * r)) needs is known there, dq[R_j] += dL k,
         dk[K_j] += dL^T q, on exact extents, with dL = A * (g s^T - delta).
Then the diagonal leaves' dL at once; df = lam (dgamma from r, never (s - f) / gamma).
No buffer has two T-sized axes: the largest logits buffer is one tile, (B, tile, tile). Each
loop writes its result over its input (s over f; lam over bacc, which starts as ds).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sessa_jax.ops.masks import PAD_SEGMENT, default_segment_ids, merge_chunks, pad_time, take_chunk
from sessa_jax.ops.platforms import platform_kind, platform_paths
from sessa_jax.ops.solve.accumulate_gpu import (
    accumulate_covers,
    gpu_accumulate_product,
    gpu_add_product,
    in_place_supported,
)
from sessa_jax.ops.solve.block_product import block_probs_and_grad, block_product, probs_grad, row_delta, split_dot
from sessa_jax.ops.solve.block_product_gpu import (
    check_solve_support,
    gpu_block_probs,
    gpu_block_probs_and_grad,
    gpu_block_product,
    interpret_params,
    product_fused,
)
from sessa_jax.ops.solve.block_product_tpu import tpu_block_product, tpu_block_product_bwd
from sessa_jax.ops.solve.leaf_gpu import (
    gpu_leaf_solve,
    gpu_leaf_solve_transposed,
    leaf_column_block,
    leaf_solve_covers,
)
from sessa_jax.ops.solve.precision import (
    bf16_round_bits,
    chained_dot,
    leaf_dot,
    leaf_tier,
    logits_dot,
    nonchained_tier,
    split_bf16,
    transposed_push_dot,
)
from sessa_jax.ops.solve.row_stats import leaf_logits, leaf_mask, row_statistics
from sessa_jax.ops.solve.row_stats_gpu import TIERS as GPU_TIERS
from sessa_jax.ops.solve.row_stats_gpu import gpu_row_statistics
from sessa_jax.ops.solve.row_stats_tpu import tpu_row_statistics
from sessa_jax.ops.solve.schedule import PushSchedule, auto_static_span, padded_leaves
from sessa_jax.ops.solve.trsolve import LEAF, SOLVE_LEAF, lower_resolvent


@dataclasses.dataclass(frozen=True)
class RecursivePlan:
    """Static parameters: leaf Cs, leaf count n (padded), tile of wide blocks in leaves,
    precision tier, platform and logits scale."""

    leaf: int
    num_leaves: int
    tile_leaves: int
    tier: str
    platform: str
    scale: float
    plain_tier: str = "float32"  # tier of g s^T, dq, dk (``precision.nonchained_tier``, ``difference_dot``)
    kernels: str = "xla"  # "pallas": TPU kernels (stats, pushes); on GPU the Mosaic GPU stats kernel only;
    # "gpu_gemm": the pushes' P tiles in the Mosaic GPU GEMM-with-epilogue kernels (``block_product_gpu``)
    static_span: int | None = None  # the pushes' ``PushSchedule.static_span``; None: all in the loop

    @classmethod
    def make(
        cls,
        length: int,
        leaf_size: int,
        tile: int,
        tier: str,
        platform: str,
        scale: float,
        input_dtype=None,
        kernels: str = "xla",
        static_span: int | None = None,
    ):
        """Plan for T = ``length``: leaf min(leaf_size, T); wide blocks in tiles of the largest power
        of two of leaves within ``tile`` rows (at least one leaf);
        ``static_span``: see ``schedule.PushSchedule`` (None: every push in the leaf loop;
        "auto": ``default_static_span``)."""
        leaf = max(1, min(leaf_size, length))
        # a power of two: the wide blocks (lowbit(j) >= tile_leaves, powers of two) are whole tiles
        tile_leaves = 1 << (max(1, tile // leaf).bit_length() - 1)
        n = padded_leaves(-(-length // leaf), tile_leaves)
        plain = tier if input_dtype is None else nonchained_tier(tier, input_dtype)
        if static_span == "auto":
            static_span = default_static_span(n, tile_leaves, tier, kernels, platform)
        return cls(leaf, n, tile_leaves, tier, platform, scale, plain, kernels, static_span)

    @property
    def interpret(self) -> bool:
        """Whether the Pallas kernels run in interpret mode here (``PLATFORM_PATHS``)."""
        return platform_paths(self.platform).interpret

    @property
    def tpu_kernels(self) -> bool:
        """The TPU kernels (``row_stats_tpu``, ``block_product_tpu``) for stats and pushes."""
        return self.kernels == "pallas" and platform_paths(self.platform).pallas == "tpu"

    @property
    def gpu_kernels(self) -> bool:
        """The Mosaic GPU stats kernel (``row_stats_gpu``), pushes in XLA. It is always compiled for
        the GPU; CPU tests run it under ``plgpu.force_gpu_interpret_mode``."""
        return self.kernels == "pallas" and platform_paths(self.platform).pallas == "gpu"

    @property
    def gemm_kernels(self) -> bool:
        """The statistics pass in the Mosaic GPU kernel of ``row_stats_gpu`` and the pushes' P (and
        dL) tiles in those of ``block_product_gpu``, their products in XLA: kernels "gpu_gemm"
        (off the GPU in Mosaic GPU interpret mode)."""
        return self.kernels == "gpu_gemm"

    @property
    def gpu_interpret(self):
        """``interpret`` of the Mosaic GPU kernels: False on the GPU, interpret mode elsewhere."""
        return False if platform_kind(self.platform) == "gpu" else interpret_params()

    @property
    def leaf_tier(self) -> str:
        """Tier of the leaf products: the forward's Y_i rhs_i (s_i and r_i) and the backward's
        Y_i^T products (``precision.leaf_tier``)."""
        return leaf_tier(self.tier)

    def chained(self, spec: str, a, b):
        """einsum for the leaf products at ``leaf_tier`` (``precision.leaf_dot``)."""
        return leaf_dot(spec, a, b, self.leaf_tier, self.platform)

    def transposed_push(self, spec: str, a, b):
        """einsum for the backward's pushes A^T g, at ``tier`` (``precision.transposed_push_dot``:
        two bf16 passes in "bfloat16", g split)."""
        return transposed_push_dot(spec, a, b, self.tier, self.platform)

    def inversion(self, spec: str, a, b):
        """einsum for the diagonal inversion's merges (``diag_resolvent``; its error reaches every
        s_i). In the "bfloat16" tier the leaf products' own tier, bf16x3 (``leaf_dot``): Y_i enters
        only bf16x3 leaf products, and with bf16x3 merges the error of Y_i rhs_i stays within 2x of
        that product's own, two orders below what f's bf16 rounding does to s (docs/design.md).
        Elsewhere fp32-faithful: ``Precision.HIGHEST``, on GPU XLA's six-pass bf16 algorithm."""
        if self.tier == "bfloat16":
            return leaf_dot(spec, a, b, self.leaf_tier, self.platform)
        return logits_dot(spec, a, b, "float32", self.platform)

    def plain(self, spec: str, a, b):
        """einsum for dq and dk, at ``plain_tier``."""
        return chained_dot(spec, a, b, self.plain_tier, self.platform)

    def g_dtypes(self, width: int, dtype) -> tuple:
        """dtypes of the parts in which the backward keeps g = gamma * lambda (full-length
        buffers): g whole, (``dtype``,), since the transposed pushes of the "bfloat16" tier read
        its low part too; where those pushes add in place in the Mosaic GPU kernel
        (``accumulates_in_kernel``), its bf16 hi + lo parts (``precision.split_bf16``), which the
        kernels read in place: hi is also the g that ``precision.difference_dot`` rounds."""
        return (jnp.bfloat16, jnp.bfloat16) if self.accumulates_in_kernel(width) else (dtype,)

    def accumulates_in_kernel(self, width: int) -> bool:
        """Whether the backward's pushed products (P^T g, dL k, dL^T q) add into bacc, dq and dk in
        place in ``accumulate_gpu.gpu_accumulate_product``: kernels "gpu_gemm" in the "bfloat16"
        tier (one bf16 pass each; P^T g one per part of g, kept as bf16 hi + lo, in one kernel; the
        forward's P s, where ``pushes_in_kernel``, one per part of P, in one kernel), at a width D
        the kernel covers, where this JAX lowers it (``accumulate_gpu.in_place_supported``; else
        those products stay XLA)."""
        return self.gemm_kernels and self.tier == "bfloat16" and accumulate_covers(width) and in_place_supported()

    def leaf_solves_in_kernel(self, width: int) -> bool:
        """Whether the leaf steps run in ``leaf_gpu``'s kernels (forward ``gpu_leaf_solve``: Y_i,
        f_i, racc_i read in place, s's bf16 copy and r written in place; backward, where g is kept as
        two bf16 buffers, ``gpu_leaf_solve_transposed``: Y_i and bacc_i read in place, g's parts
        written in place): kernels "gpu_gemm" in the "bfloat16" tier (whose leaf products are
        bf16x3, as the kernels'), at a leaf and width they cover, where this JAX lowers an
        aliased operand (``accumulate_gpu.in_place_supported``)."""
        return (
            self.gemm_kernels
            and self.tier == "bfloat16"
            and leaf_solve_covers(self.leaf, width)
            and in_place_supported()
        )

    def pushes_in_kernel(self, width: int) -> bool:
        """Whether the forward's pushes add P s into racc in place the same way (with s kept in a
        bf16 copy for them): where ``accumulates_in_kernel`` and the push is not the fused
        ``gpu_block_product`` (Dv > ``FUSED_MAX_DV``)."""
        return self.accumulates_in_kernel(width) and not product_fused(width)

    def fused_push_in_place(self, width: int) -> bool:
        """Whether the forward's fused pushes (``gpu_block_product``, Dv <= ``FUSED_MAX_DV``) read
        their block in place from the full-length q, k, m, logl, segment ids and bf16 copies of s
        kept by the leaf loop (each solved leaf rounded once in the "bfloat16" tier, whose pushes
        round s anyway; split into hi + lo once in bf16x3): kernels "gpu_gemm"; where this JAX
        lowers an aliased kernel operand (``accumulate_gpu.in_place_supported``) they also add into
        racc in place."""
        return self.gemm_kernels and product_fused(width)

    def unfused_sum(self, product):
        """A pushed product (XLA's) before it is added into its accumulator's rows: on GPU through an
        optimization barrier, so that the add runs in place in the update of the accumulator (its
        rows read once, where they are written) instead of in the product's epilogue, for which
        XLA's GPU compiler first copies those rows out (docs/performance.md, "XLA's pushes add in
        place"). Elsewhere unchanged (a TPU fuses the sum into the product and reads the slice in
        place)."""
        return lax.optimization_barrier(product) if platform_kind(self.platform) == "gpu" else product

    def splits_s_once(self, dtype) -> bool:
        """Whether the backward's g s^T products all take s split into bf16 hi + lo once, outside
        the loop (``precision.difference_dot``'s split): with the Mosaic GPU kernels, whose dual
        GEMM reads the parts, at plain tier "bfloat16" with float32 accumulation (``dtype``). XLA's
        pushes split their s tile inside the loop instead: in the deviceless H100 compile the
        hoisted split costs more launches than it saves bytes (docs/performance.md)."""
        return self.gemm_kernels and self.plain_tier == "bfloat16" and jnp.dtype(dtype) == jnp.float32

    @property
    def splits_pushed_probs(self) -> bool:
        """Whether the forward's pushes split each P tile into bf16 hi + lo parts in separate
        passes on a GPU: the explicit bf16x3 split (``precision.chained_dot``) and the bfloat16
        tier's two passes (``precision.push_dot``)."""
        return platform_kind(self.platform) == "gpu" and self.tier in ("bf16x3", "bfloat16")

    @property
    def residual_in_leaf_step(self) -> bool:
        """Whether the XLA leaf step writes r_i = racc_i + A_ii s_i over racc_i (on a GPU, where the
        write costs no more than the product after the loop saves), or r is formed after the
        forward loop as racc + A_ii s (elsewhere: on a TPU v5e the written r kept more of the
        solve's temporaries, docs/performance.md). The leaf kernels always write it."""
        return platform_kind(self.platform) == "gpu"

    @property
    def solves_diagonal_base(self) -> bool:
        """Whether the diagonal inversion takes its smallest blocks by one batched triangular
        solve (``trsolve.lower_resolvent(base_solve=True)``: cuBLAS's batched trsm on a GPU,
        LAPACK's on a CPU, one call where the series and its first merges are about a dozen small
        kernels) or by the nilpotent series (on a TPU, whose compiler expands a triangular solve
        into a loop of its own)."""
        return platform_kind(self.platform) in ("gpu", "cpu")

    @property
    def splits_resolvents(self) -> bool:
        """Whether the leaves' Y_i can come as the leaf kernels' split pair (``diag_resolvent(split=
        True)``): the leaf a power of two, at least twice the inversion's first blocks and 128."""
        first = SOLVE_LEAF if self.solves_diagonal_base else LEAF
        return self.leaf & (self.leaf - 1) == 0 and self.leaf >= max(2 * first, 128)

    @property
    def padded_len(self) -> int:
        return self.leaf * self.num_leaves

    @property
    def schedule(self) -> PushSchedule:
        """The pushes' schedule (static blocks per ``static_span``)."""
        return _schedule(self.num_leaves, self.tile_leaves, self.static_span)

    @property
    def stats_schedule(self) -> PushSchedule:
        """The statistics pass's schedule: every block in one loop (its blocks are independent,
        so a static program would only let the compiler hold many logits tiles at once)."""
        return _schedule(self.num_leaves, self.tile_leaves, None)


# With the Mosaic GPU kernels, up to this many leaves run as one static program (span 1): no leaf
# loop, none of its per-step launches; beyond it the program's compile time grows past twice the
# loop's (docs/performance.md, "Sliced operands counted as sliced, and a bf16 model's leaf
# steps in bf16", step 5).
GEMM_STATIC_LEAVES = 16


def default_static_span(num_leaves: int, tile_leaves: int, tier: str, kernels: str, platform: str) -> int | None:
    """``static_span="auto"``: the pushes' wide blocks static (``schedule.auto_static_span``),
    except on GPU in the "bfloat16" tier with XLA's pushes, where every push stays in the leaf
    loop, and with the Mosaic GPU kernels ("gpu_gemm") at most ``GEMM_STATIC_LEAVES`` leaves,
    where every push and leaf step is static (span 1). The deviceless H100 compile rates the
    static blocks faster where a push is three bf16 passes or a Mosaic GPU kernel (and the whole
    schedule static faster still with the kernels, at the same temporaries), and slower at the
    bfloat16 tier's XLA pushes (one GEMM, and since P is split two), whose static tiles' q and k
    slices XLA copies out before the product; on a TPU v5e the static blocks keep the
    temporaries lower (docs/performance.md)."""
    if platform_kind(platform) == "gpu" and tier == "bfloat16" and kernels == "xla":
        return None
    if kernels == "gpu_gemm" and num_leaves <= GEMM_STATIC_LEAVES:
        return 1
    return auto_static_span(num_leaves, tile_leaves)


@functools.lru_cache(maxsize=256)
def _schedule(num_leaves: int, tile_leaves: int, static_span: int | None) -> PushSchedule:
    return PushSchedule.make(num_leaves, tile_leaves, static_span)


def _accumulator(shape, dtype, negative: bool = True, distinct: int = 0):
    """An empty sum: -0.0 everywhere, the exact additive identity (x + -0.0 == x for every x).

    Not 0.0: the compiler merges equal constant arrays, and a model's own f32 zeros of this
    shape (erf's expansion in an exact GELU has them) would become one buffer with the loops'
    accumulators, which XLA's GPU compiler then copies once per loop that adds into it in place
    (docs/performance.md). ``negative=False``: +0.0 (an identity but for the sign of an exact
    zero sum), for a program whose accumulators must not merge with the -0.0 ones.
    ``distinct`` k > 0: the same zeros made as an iota along axis k - 1 times the zero, which
    the compiler neither folds to a constant nor merges with the constant fill (nor with
    another k's), for a second accumulator of the same program: still one write pass, where a
    merged buffer is copied (a read and a write) for each accumulator that adds in place."""
    zero = -0.0 if negative else 0.0
    if distinct:
        return lax.broadcasted_iota(dtype, shape, distinct - 1) * jnp.asarray(zero, dtype)
    return jnp.full(shape, zero, dtype)


def _unwritten(shape, dtype):
    """A buffer whose every row the solve writes before it reads it (s and lambda where the leaf
    kernels write them, s's bf16 copy, g's parts): no fill pass (``lax.empty``: uninitialized on
    GPU and TPU, zeros elsewhere)."""
    return lax.empty(shape, dtype)


class _FirstWrites:
    """Which rows of a buffer left unfilled hold a value, tracked while a static program is traced
    (every push's rows Python integers), leaf by leaf. ``self.take(buf, start, rows)`` -> (buf,
    overwrite), for a kernel's product into those rows (``gpu_accumulate_product``'s
    ``overwrite``): True for the first push into all of them (it writes them), False where all
    hold a value (it adds), and where only some do (the backward meets such pushes) the (start,
    stop) ranges of the others, relative to ``start``, which the push writes while it adds to the
    rest. ``self.unwritten(start, rows)``: the leaves among those rows that no push wrote.
    ``self.ready(buf, start, rows)``, before a read: buf with the rows no push wrote set to the
    empty sum. Where not ``enabled`` (the buffer is filled): (buf, False), no leaves and buf
    throughout."""

    def __init__(self, leaf: int, enabled: bool):
        self.leaf, self.enabled, self.written = leaf, enabled, set()

    def _leaves(self, start, rows: int):
        return range(start // self.leaf, (start + rows) // self.leaf)

    def unwritten(self, start, rows: int) -> tuple:
        if not self.enabled:
            return ()
        return tuple(i for i in self._leaves(start, rows) if i not in self.written)

    def take(self, buf, start, rows: int):
        new = self.unwritten(start, rows)
        self.written.update(new)
        if not new:
            return buf, False
        if len(new) == len(self._leaves(start, rows)):
            return buf, True
        return buf, tuple((i * self.leaf - start, (i + 1) * self.leaf - start) for i in new)

    def ready(self, buf, start, rows: int):
        if not self.enabled:
            return buf
        for i in self._leaves(start, rows):
            if i not in self.written:
                empty = _accumulator((buf.shape[0], self.leaf, buf.shape[2]), buf.dtype)
                buf = lax.dynamic_update_slice_in_dim(buf, empty, i * self.leaf, axis=1)
                self.written.add(i)
        return buf


def _barrier(carry, q, k):
    """(carry, q, k) through one optimization barrier: the next static tile's logits then wait
    for the previous tile's result. Without it the compiler may compute the independent
    logits tiles of the static pushes side by side, or merge a forward tile with the same
    tile of the backward, and keep them all in memory."""
    return lax.optimization_barrier((carry, q, k))


def diag_blocks(plan: RecursivePlan, diag_logits, seg, m, logl):
    """A_ii (B, n, Cs, Cs): the diagonal leaves of A from their logits (``leaf_logits``) and the
    known statistics."""
    b = m.shape[0]
    shape = (b, plan.num_leaves, plan.leaf, 1)
    z = (diag_logits - m.reshape(shape)) - logl.reshape(shape)
    return jnp.where(leaf_mask(seg, plan.leaf), jnp.exp(z), 0.0)


def _by_leaf(plan: RecursivePlan, a):
    """(B, Tp, ...) -> (B n, Cs, ...): each leaf's rows as one batch row (the kernels that take every
    leaf at once); None stays None."""
    return None if a is None else a.reshape(a.shape[0] * plan.num_leaves, plan.leaf, *a.shape[2:])


def _gemm_diagonal_blocks(plan: RecursivePlan, q_b, k_b, seg, m, logl):
    """``diag_blocks`` from the P-tile kernel (``gpu_block_probs``, causal, float32 out, every leaf
    at once as its batch): the logits q_i k_i^T of bf16 q and k in one pass, masked and
    exponentiated in registers, the tiles with no key before any row skipped. (B, n, Cs, Cs)
    float32, equal to ``diag_blocks`` of the bfloat16 tier's ``leaf_logits`` up to fp32 summation
    order."""
    leaves = functools.partial(_by_leaf, plan)
    seg = leaves(seg)
    (a_ii,) = gpu_block_probs(
        leaves(q_b),
        seg,
        leaves(m),
        leaves(logl),
        leaves(k_b),
        seg,
        scale=plan.scale,
        split=False,
        causal=True,
        out_dtype=jnp.float32,
        interpret=plan.gpu_interpret,
    )
    return a_ii.reshape(q_b.shape[0], plan.num_leaves, plan.leaf, plan.leaf)


def diag_resolvent(plan: RecursivePlan, a_ii, gamma, split: bool = False):
    """Y_i = A_ii (I - diag(gamma_i) A_ii)^-1 for all leaves at once, (B, n, Cs, Cs), strictly
    lower, its merges at ``RecursivePlan.inversion``'s precision (it reaches every s_i). The
    leaf steps take X_i = (I - diag(gamma_i) A_ii)^-1 = I + diag(gamma_i) Y_i through it: with
    rhs_i = f_i + gamma_i racc_i, A_ii s_i = Y_i rhs_i, so r_i = racc_i + Y_i rhs_i (the residual,
    no product by A_ii) and s_i = f_i + gamma_i r_i; lambda_i = X_i^T w_i = w_i + Y_i^T (gamma_i
    w_i). ``split`` (``RecursivePlan.splits_resolvents``): the same Y_i as the leaf kernels' pair
    (diag (B, n Cs, Cs / 2), low (B, n Cs / 2, Cs / 2)) (``leaf_gpu._y_parts``), which takes no
    copy of every Y_i (``trsolve.lower_resolvent(split_top=True)``)."""
    b, n, c, _ = a_ii.shape
    scale = gamma.reshape(b * n, c).astype(a_ii.dtype)
    y = lower_resolvent(
        a_ii.reshape(b * n, c, c), scale, plan.inversion, base_solve=plan.solves_diagonal_base, split_top=split
    )
    if split:
        diag, low = y
        return diag.reshape(b, n * c, c // 2), low.reshape(b, n * c // 2, c // 2)
    return y.reshape(b, n, c, c)


def _leaf_resolvent(plan: RecursivePlan, y_leaves, i):
    """Y_i (B, Cs, Cs) of leaf i (traced or not) from ``diag_resolvent``'s result, whole or split."""
    if not isinstance(y_leaves, tuple):
        return lax.dynamic_index_in_dim(y_leaves, i, axis=1, keepdims=False)
    c, h = plan.leaf, plan.leaf // 2
    diag = lax.dynamic_slice_in_dim(y_leaves[0], i * c, c, axis=1)
    low = lax.dynamic_slice_in_dim(y_leaves[1], i * h, h, axis=1)
    top = jnp.concatenate([diag[:, :h], jnp.zeros_like(low)], axis=2)
    return jnp.concatenate([top, jnp.concatenate([low, diag[:, h:]], axis=2)], axis=1)


def _leaf_rows(plan: RecursivePlan, y_leaves):
    """``diag_resolvent``'s result as the leaf kernels take it: Y_i one under another (B, n Cs, Cs),
    or the split pair as it is."""
    if isinstance(y_leaves, tuple):
        return y_leaves
    return y_leaves.reshape(y_leaves.shape[0], plan.num_leaves * plan.leaf, plan.leaf)


def _gemm_block_update(plan: RecursivePlan, q_b, seg, m, logl, k_b, r0, rows: int, k0, keys: int, s_keys):
    """A[rows, keys] s[keys] at the push tier, float32 (B, rows, Dv), where the push is not fused
    (Dv > 512, ``product_fused``; ``_forward`` runs the fused ones): the P tile from
    ``gpu_block_probs`` (bf16 hi + lo parts), which reads its rows and keys in place from the
    full-length q_b, k_b (bf16), m, logl and seg (rows from r0, keys from k0), and the product in
    XLA (s split in bf16x3, rounded once in the "bfloat16" tier): the same product as the XLA
    path's ``block_product`` at ``plan.tier``."""
    window = dict(rows=rows, keys=keys, row_start=r0, key_start=k0)
    parts = gpu_block_probs(
        q_b, seg, m, logl, k_b, seg, scale=plan.scale, split=True, interpret=plan.gpu_interpret, **window
    )
    return split_dot("bpk,bkd->bpd", *parts, s_keys, round_b=plan.tier == "bfloat16")


class _GemmBackwardInputs(NamedTuple):
    """The backward's full-length operands of the Mosaic GPU dual-GEMM kernel: q, k as given and in
    bf16, segment ids (or None), the row statistics m, logl, and s split into bf16 hi + lo once
    (``precision.split_bf16``; s is fixed in the backward)."""

    q: jax.Array
    k: jax.Array
    q_b: jax.Array
    k_b: jax.Array
    seg: jax.Array | None
    m: jax.Array
    logl: jax.Array
    s_hi: jax.Array
    s_lo: jax.Array


def _gemm_block_grads(plan: RecursivePlan, x: _GemmBackwardInputs, r0, rows: int, k0, keys: int, g_buf, delta):
    """``_backward``'s (A^T g, dq, dk) of one pushed block (rows from r0, keys from k0) with P and dL
    from the Mosaic GPU dual-GEMM kernel, the products in XLA; the same products as the XLA path at
    the tiers the kernels serve (plain tier "bfloat16": g rounded once, s split, dL in one bf16
    pass; A^T g as ``RecursivePlan.transposed_push``). g_buf: float32 g, whose rows the kernel
    takes rounded, from slices."""
    bf16 = jnp.bfloat16
    g_p = take_chunk(g_buf, r0, rows)
    parts, dlogits = gpu_block_probs_and_grad(
        *_panel_operands(x.q_b, x.seg, x.m, x.logl, x.k_b, r0, rows, k0, keys),
        bf16_round_bits(g_p).astype(bf16),
        take_chunk(x.s_hi, k0, keys),
        take_chunk(x.s_lo, k0, keys),
        take_chunk(delta, r0, rows),
        scale=plan.scale,
        split=plan.tier == "bf16x3",
        interpret=plan.gpu_interpret,
    )
    if plan.tier == "bf16x3":
        b_keys = split_dot("bpk,bpd->bkd", parts[0], parts[1], g_p)
    else:  # P rounded once, g split
        b_keys = plan.transposed_push("bpk,bpd->bkd", parts[0], g_p)
    dq_p = plan.plain("bpk,bkd->bpd", dlogits, take_chunk(x.k, k0, keys)) * plan.scale
    dk_keys = plan.plain("bpk,bpd->bkd", dlogits, take_chunk(x.q, r0, rows)) * plan.scale
    return b_keys, dq_p, dk_keys


def _gemm_block_accumulate(
    plan: RecursivePlan,
    x: _GemmBackwardInputs,
    r0,
    rows: int,
    k0,
    keys: int,
    g_parts,
    delta,
    bacc,
    dq,
    dk,
    writes=(False, False),
):
    """``_backward``'s tile in the "bfloat16" tier with the Mosaic GPU kernels throughout: P and dL of
    the block (rows from r0, keys from k0) from the dual-GEMM kernel, read in place; then bacc[keys]
    += P^T g_hi[rows] + P^T g_lo[rows] (two bf16 passes in one kernel), dq[rows] += scale dL
    k[keys], dk[keys] += scale dL^T q[rows] (one each), added in place (``accumulate_gpu``): the
    same products as the XLA path's at this tier. g_parts: g's full-length bf16 hi + lo parts
    (``RecursivePlan.g_dtypes``). ``writes``: (dq, dk) rows written instead of added to, the first
    push into them in a static program (``_FirstWrites``). Returns (bacc, dq, dk)."""
    g_hi, g_lo = g_parts
    window = dict(rows=rows, keys=keys, row_start=r0, key_start=k0)
    (probs,), dlogits = gpu_block_probs_and_grad(
        *(x.q_b, x.seg, x.m, x.logl, x.k_b, x.seg, g_hi, x.s_hi, x.s_lo, delta),
        scale=plan.scale,
        split=False,
        interpret=plan.gpu_interpret,
        **window,
    )
    add = functools.partial(gpu_accumulate_product, interpret=plan.gpu_interpret)
    bacc = add(bacc, probs, (g_hi, g_lo), acc_start=k0, b_start=r0, transpose_a=True)
    dq = add(dq, dlogits, x.k_b, acc_start=r0, b_start=k0, scale=plan.scale, overwrite=writes[0])
    dk = add(dk, dlogits, x.q_b, acc_start=k0, b_start=r0, transpose_a=True, scale=plan.scale, overwrite=writes[1])
    return bacc, dq, dk


def _gemm_diagonal_grads(plan: RecursivePlan, x: _GemmBackwardInputs, g_hi, delta, dq, dk, fresh):
    """The diagonal leaves' share of the backward where its products add in place
    (``RecursivePlan.accumulates_in_kernel``), every leaf i at once as the kernels' batch: dL_ii
    from the dual-GEMM kernel (``gpu_block_probs_and_grad``, causal: P_ii recomputed from q_i, k_i
    and the row statistics, g_i s_i^T with s split), then dq + scale dL_ii k_i and dk + scale
    dL_ii^T q_i added and cast to q's and k's dtypes in one ``accumulate_gpu.gpu_add_product`` each,
    so the float32 accumulators are read once and the results written once in their own dtype. dL_ii
    is strictly lower triangular: the dual GEMM skips its tiles above the diagonal and the products
    read only its (64, 64) blocks on and below it (``a_lower``). The same products as the XLA path's
    ``probs_grad`` and ``RecursivePlan.plain``, up to fp32 summation order. g_hi (B, Tp, D) bf16,
    delta (B, Tp) float32, dq and dk (B, Tp, D) float32; ``fresh``: the leaves whose rows of dq and
    of dk no push wrote (left unfilled: their diagonal product is written alone, not added).
    Returns (dq, dk) (B, Tp, D)."""
    b, tp, d = dq.shape
    leaves = functools.partial(_by_leaf, plan)
    seg = leaves(x.seg)
    _, dl = gpu_block_probs_and_grad(
        *(leaves(x.q_b), seg, leaves(x.m), leaves(x.logl), leaves(x.k_b), seg),
        *(leaves(g_hi), leaves(x.s_hi), leaves(x.s_lo), leaves(delta)),
        scale=plan.scale,
        causal=True,
        interpret=plan.gpu_interpret,
    )
    add = functools.partial(gpu_add_product, scale=plan.scale, interpret=plan.gpu_interpret, a_lower=True)
    n = plan.num_leaves  # leaves(.)'s batch row j holds leaf j % n
    dq = add(leaves(dq), dl, leaves(x.k_b), out_dtype=x.q.dtype, fresh_batches=(n, fresh[0]))
    dk = add(leaves(dk), dl, leaves(x.q_b), transpose_a=True, out_dtype=x.k.dtype, fresh_batches=(n, fresh[1]))
    return dq.reshape(b, tp, d), dk.reshape(b, tp, d)


def _take_segments(seg, start, size: int):
    """``take_chunk`` of the segment ids, or None when there are none (one sequence per row)."""
    return None if seg is None else take_chunk(seg, start, size)


def _panel_operands(q, seg, m, logl, k, r0, rows: int, k0, keys: int):
    """A pushed block's sliced operands in the order the block functions and kernels take them:
    (q, seg, m, logl) of rows [r0, r0 + rows), (k, seg) of keys [k0, k0 + keys)."""
    return (
        take_chunk(q, r0, rows),
        _take_segments(seg, r0, rows),
        take_chunk(m, r0, rows),
        take_chunk(logl, r0, rows),
        take_chunk(k, k0, keys),
        _take_segments(seg, k0, keys),
    )


def _forward(plan: RecursivePlan, q, k, gamma, f, seg, for_backward: bool = False):
    """(s, r, m, logl, a_ii, y_leaves, s_parts): the backward's residuals where ``for_backward``
    (r = racc + A_ii s, the pushed sums with the leaves' own; s_parts the (hi, lo) bf16 parts of s
    where the leaf kernel writes them, for the kernels' backward, else None); without it r and
    s_parts are None."""
    c, n = plan.leaf, plan.num_leaves
    sched = plan.schedule
    diag_logits = leaf_logits(q, k, c, plan.scale, plan.tier, plan.platform)
    if plan.gpu_kernels or plan.gemm_kernels:
        # bf16 q and k: one exact pass at any tier; float32 ones need a tier of the kernel (ops.dispatch)
        stats_tier = plan.tier if plan.tier in GPU_TIERS or q.dtype != jnp.bfloat16 else "bfloat16"
        m, logl = gpu_row_statistics(q, k, seg, scale=plan.scale, tier=stats_tier, interpret=plan.gpu_interpret)
    elif plan.tpu_kernels:
        m, logl = tpu_row_statistics(q, k, seg, scale=plan.scale, interpret=plan.interpret)
    else:
        m, logl = row_statistics(
            q,
            k,
            seg,
            leaf=c,
            scale=plan.scale,
            tier=plan.tier,
            schedule=plan.stats_schedule,
            platform=plan.platform,
            diag_logits=diag_logits,
        )
    if plan.gemm_kernels:  # the kernels multiply bf16 q and k: one conversion, outside the loop
        q_b, k_b = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    if plan.gemm_kernels and plan.tier == "bfloat16":  # the tier's one-pass logits, as leaf_logits takes them
        a_ii = _gemm_diagonal_blocks(plan, q_b, k_b, seg, m, logl)
    else:
        a_ii = diag_blocks(plan, diag_logits, seg, m, logl)

    def block_update(r0, rows, k0, keys, s_keys):
        if plan.gemm_kernels:
            return _gemm_block_update(plan, q_b, seg, m, logl, k_b, r0, rows, k0, keys, s_keys)
        args = _panel_operands(q, seg, m, logl, k, r0, rows, k0, keys)
        if plan.tpu_kernels:
            return tpu_block_product(*args, s_keys, scale=plan.scale, tier=plan.tier, interpret=plan.interpret)
        return block_product(
            *args,
            s_keys,
            scale=plan.scale,
            tier=plan.tier,
            platform=plan.platform,
            fuse_exp=not plan.splits_pushed_probs,
        )

    in_place = plan.pushes_in_kernel(f.shape[-1])
    fused_window = plan.fused_push_in_place(f.shape[-1])
    # how many bf16 copies of s the leaf loop keeps for the kernels' pushes (full-length buffers):
    # s rounded once (one bf16 pass), or its hi + lo parts (the fused push's three passes at bf16x3)
    s_copies = 2 if fused_window and plan.tier == "bf16x3" else 1 if in_place or fused_window else 0

    # In a program with no leaf loop every push's rows are known while tracing: the first push into
    # rows of racc writes them (racc then needs no fill; rows no push reached, leaf 0's, become the
    # empty sum before the leaf step reads them), the later ones add.
    racc_writes = _FirstWrites(c, in_place and not sched.looped)

    def tile(carry, r0, rows, k0, keys):
        s_buf, racc, s_b, r_buf = carry
        if in_place:  # racc[rows] += (P_hi + P_lo) bf16(s)[keys] in one kernel, s read from its bf16 copy
            window = dict(rows=rows, keys=keys, row_start=r0, key_start=k0)
            parts = gpu_block_probs(
                q_b, seg, m, logl, k_b, seg, scale=plan.scale, split=True, interpret=plan.gpu_interpret, **window
            )
            racc, overwrite = racc_writes.take(racc, r0, rows)
            racc = gpu_accumulate_product(
                racc, parts, s_b[0], acc_start=r0, b_start=k0, overwrite=overwrite, interpret=plan.gpu_interpret
            )
            return s_buf, racc, s_b, r_buf
        if fused_window:  # the fused push reads q, k, m, logl and s's bf16 part(s) in place
            push = functools.partial(
                gpu_block_product,
                q_b,
                seg,
                m,
                logl,
                k_b,
                seg,
                *(s_b if s_copies == 2 else (s_b[0], None)),
                scale=plan.scale,
                interpret=plan.gpu_interpret,
                rows=rows,
                keys=keys,
                row_start=r0,
                key_start=k0,
            )
            if in_place_supported():  # and adds into racc in place
                return s_buf, push(acc=racc), s_b, r_buf
            update = push()
        else:
            update = block_update(r0, rows, k0, keys, take_chunk(s_buf, k0, keys))
        update = plan.unfused_sum(update)
        racc = lax.dynamic_update_slice_in_dim(racc, take_chunk(racc, r0, rows) + update, r0, axis=1)
        return s_buf, racc, s_b, r_buf

    leaf_in_kernel = s_copies == 1 and plan.leaf_solves_in_kernel(f.shape[-1])
    # the backward's kernels take s as bf16 hi + lo: the leaf kernel writes lo beside s's bf16 copy (hi)
    keeps_lo = for_backward and leaf_in_kernel and plan.gemm_kernels
    y_leaves = diag_resolvent(plan, a_ii, gamma, split=leaf_in_kernel and plan.splits_resolvents)
    y_rows = _leaf_rows(plan, y_leaves)

    def solve_leaf(carry, i):
        s_buf, racc, s_b, r_buf = carry
        start = i * c
        if leaf_in_kernel:  # Y_i, f_i, racc_i read in place; s_i, bf16(s_i) (and lo) and r_i written in place
            s_lo = s_b[1] if keeps_lo else None
            pushed = None if racc_writes.unwritten(start, c) else racc  # no push reached leaf i: racc_i = 0
            s_buf, *s_b = gpu_leaf_solve(
                y_rows, f, pushed, gamma, s_b[0], s_buf, start, s_lo=s_lo, r=r_buf, interpret=plan.gpu_interpret
            )
            if r_buf is not None:
                *s_b, r_buf = s_b
            return s_buf, racc, tuple(s_b), r_buf
        racc = racc_writes.ready(racc, start, c)
        # s_buf starts as f and leaf i overwrites its own rows only, after reading f_i there
        f_i, racc_i, gamma_i = take_chunk(s_buf, start, c), take_chunk(racc, start, c), take_chunk(gamma, start, c)
        y_i = _leaf_resolvent(plan, y_leaves, i)
        r_i = racc_i + plan.chained("bij,bjd->bid", y_i, f_i + gamma_i[..., None] * racc_i)
        s_i = f_i + gamma_i[..., None] * r_i
        if for_backward and plan.residual_in_leaf_step:  # r_i over racc_i, which nothing reads after this step
            racc = lax.dynamic_update_slice_in_dim(racc, r_i, start, axis=1)
        if s_copies:  # s rounded (or split) for the pushes once, here
            parts = split_bf16(s_i) if s_copies == 2 else (s_i.astype(jnp.bfloat16),)
            s_b = tuple(lax.dynamic_update_slice_in_dim(buf, x, start, axis=1) for buf, x in zip(s_b, parts))
        return lax.dynamic_update_slice_in_dim(s_buf, s_i, start, axis=1), racc, s_b, r_buf

    def step(carry, xs):
        i, branch = xs
        return sched.visit(branch, i + 1, solve_leaf(carry, i), c, tile), None

    def barrier(carry):
        nonlocal q, k  # the next tile reads q and k as they leave the barrier
        carry, q, k = _barrier(carry, q, k)
        return carry

    # Leaves in order: each segment's leaves in a loop, then the static block that follows it.
    # s is written over f (no zero-filled s buffer, no f read from a second buffer), but by the
    # leaf kernel into a buffer of its own (its programs read f_i while others write s_i; each
    # row is written before it is read); pushes read only rows already solved.
    acc = gamma.dtype  # the accumulation dtype; f may come in bf16, which only the leaf kernel reads as it is
    f = f if leaf_in_kernel else f.astype(acc)
    # a bf16 f gets its s back in bf16: the leaf kernel's bf16 copy (the pushes') is that s, and
    # no float32 s is written at all
    bf16_out = leaf_in_kernel and f.dtype == jnp.bfloat16
    s0 = None if bf16_out else _unwritten(f.shape, acc) if leaf_in_kernel else f
    copies = tuple(_unwritten(f.shape, jnp.bfloat16) for _ in range(s_copies + keeps_lo))
    racc0 = _unwritten(f.shape, acc) if racc_writes.enabled else _accumulator(f.shape, acc)
    # the leaf kernel writes r into a buffer of its own (its programs read racc_i while others write r_i)
    r0 = _unwritten(f.shape, acc) if leaf_in_kernel and for_backward else None
    carry = (s0, racc0, copies, r0)
    for first, count in sched.segments():
        if count == 1:
            carry = solve_leaf(carry, first)  # its block, first + 1, is static (or absent)
        else:
            carry, _ = lax.scan(
                step,
                carry,
                (jnp.arange(first, first + count), jnp.asarray(sched.branch[first + 1 : first + count + 1])),
            )
        if first + count < n:
            carry = sched.visit_static(first + count, carry, c, tile, barrier)
    s, racc, copies, r = carry
    s = copies[0] if bf16_out else s
    if not for_backward:
        return s, None, m, logl, a_ii, y_leaves, None
    if r is None and not plan.residual_in_leaf_step:  # A_ii s_i of every leaf at once
        b, tp, d = f.shape
        r = racc + plan.chained("bnij,bnjd->bnid", a_ii, s.reshape(b, n, c, d)).reshape(b, tp, d)
    r = racc if r is None else r  # the XLA leaf steps wrote r over racc
    return s, r, m, logl, a_ii, y_leaves, copies if keeps_lo else None


def _backward(plan: RecursivePlan, res, ds, df_dtype=None):
    """(dq, dk, dgamma, df): df in ``df_dtype`` (bf16) straight from the leaf kernel where it runs,
    else in the accumulation dtype."""
    q, k, gamma, seg, s, r, m, logl, a_ii, y_leaves, s_parts_kept = res
    c, n = plan.leaf, plan.num_leaves
    sched = plan.schedule
    b, tp, d = s.shape
    acc = gamma.dtype  # the accumulation dtype (s may be bf16: see _forward)

    if plan.gemm_kernels:  # conversions and s's split once, outside the loop (or by the forward's leaf kernel)
        s_hi, s_lo = split_bf16(s) if s_parts_kept is None else s_parts_kept
        gemm_inputs = _GemmBackwardInputs(
            q, k, q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), seg, m, logl, s_hi, s_lo
        )
    # the diagonal leaves' g s^T takes the same split (``precision.difference_dot``)
    s_parts = (s_hi, s_lo) if plan.splits_s_once(acc) else None

    def block_grads(r0, rows, k0, keys, g_buf, delta):
        """(A^T g on the keys, dq on the rows, dk on the keys) of one pushed block."""
        if plan.gemm_kernels:
            return _gemm_block_grads(plan, gemm_inputs, r0, rows, k0, keys, g_buf, delta)
        g_p, delta_p = take_chunk(g_buf, r0, rows), take_chunk(delta, r0, rows)
        q_p, seg_p, m_p, logl_p, k_keys, seg_keys = _panel_operands(q, seg, m, logl, k, r0, rows, k0, keys)
        s_keys = take_chunk(s, k0, keys)
        if plan.tpu_kernels:
            plain = plan.plain_tier
            # g rounded once and s split (``difference_dot``): bf16x3 of bf16-valued g; A^T g takes g whole
            round_g = plain == "bfloat16"
            return tpu_block_product_bwd(
                q_p,
                seg_p,
                m_p,
                logl_p,
                g_p,
                delta_p,
                k_keys,
                seg_keys,
                s_keys,
                scale=plan.scale,
                tier=plan.tier,
                plain_tier="bf16x3" if round_g else plain,
                round_g=round_g,
                interpret=plan.interpret,
            )
        probs, dlogits = block_probs_and_grad(
            q_p,
            seg_p,
            m_p,
            logl_p,
            k_keys,
            seg_keys,
            g_p,
            delta_p,
            s_keys,
            scale=plan.scale,
            tier=plan.tier,
            plain_tier=plan.plain_tier,
            platform=plan.platform,
        )
        b_keys = plan.transposed_push("bpk,bpd->bkd", probs, g_p)
        dq_p = plan.plain("bpk,bkd->bpd", dlogits, k_keys) * plan.scale
        dk_keys = plan.plain("bpk,bpd->bkd", dlogits, q_p) * plan.scale
        return b_keys, dq_p, dk_keys

    def tile(carry, r0, rows, k0, keys):
        bacc, g_buf, delta, dq, dk, lam = carry
        if plan.accumulates_in_kernel(d):
            (dq, dq_over), (dk, dk_over) = dq_writes.take(dq, r0, rows), dk_writes.take(dk, k0, keys)
            writes = (dq_over, dk_over)
            # with the leaf kernel's row sums, the dual GEMM adds delta's partial sums itself
            rows_delta = delta[0] if leaf_in_kernel else delta
            bacc, dq, dk = _gemm_block_accumulate(
                plan, gemm_inputs, r0, rows, k0, keys, g_buf, rows_delta, bacc, dq, dk, writes
            )
            return bacc, g_buf, delta, dq, dk, lam
        b_keys, dq_p, dk_keys = block_grads(r0, rows, k0, keys, g_buf[0], delta)

        def add(buf, value, start):
            value = plan.unfused_sum(value)
            return lax.dynamic_update_slice_in_dim(buf, take_chunk(buf, start, value.shape[1]) + value, start, axis=1)

        return add(bacc, b_keys, k0), g_buf, delta, add(dq, dq_p, r0), add(dk, dk_keys, k0), lam

    # The leaf kernel (g in two bf16 parts) also forms delta's and dgamma's rows, as partial sums
    # over its column blocks: its tier, "bfloat16", is g s^T's too (g rounded once), and the dual
    # GEMM reads delta's partial sums and adds them.
    leaf_in_kernel = plan.accumulates_in_kernel(d) and plan.leaf_solves_in_kernel(d)
    y_rows = _leaf_rows(plan, y_leaves)

    def solve_leaf(carry, i):
        """lam_i, and the leaf's rows of g, of delta = rowsum(g * r) (every block that pushes from
        these rows takes it) and of dgamma = rowsum(lam * r): r_i is read once, here."""
        bacc, g_buf, delta, dq, dk, lam = carry
        start = i * c
        if leaf_in_kernel:  # Y_i, bacc_i and r_i read in place; the leaf's rows of lambda (or of its
            # bf16 copy alone), g's two bf16 parts and delta's and dgamma's partial sums written in place
            lam_b = lam[1] if len(lam) == 2 else None
            lam_f, *out = gpu_leaf_solve_transposed(
                y_rows,
                bacc,
                gamma,
                *g_buf,
                lam[0],
                start,
                lam_b=lam_b,
                row_sums=(r, *delta),
                interpret=plan.gpu_interpret,
            )
            *out, delta_parts, dgamma_parts = out
            return (bacc, tuple(out[:2]), (delta_parts, dgamma_parts), dq, dk, (lam_f, *out[2:])), None
        y_i = _leaf_resolvent(plan, y_leaves, i)
        w_i, gamma_i = take_chunk(bacc, start, c), take_chunk(gamma, start, c)[..., None]
        lam_i = w_i + plan.chained("bji,bjd->bid", y_i, gamma_i * w_i)  # X_i^T w_i
        g_i = gamma_i * lam_i
        parts = split_bf16(g_i) if len(g_buf) == 2 else (g_i.astype(g_buf[0].dtype),)
        g_buf = tuple(lax.dynamic_update_slice_in_dim(buf, x, start, axis=1) for buf, x in zip(g_buf, parts))
        r_i = take_chunk(r, start, c)
        bacc = lax.dynamic_update_slice_in_dim(bacc, lam_i, start, axis=1)
        delta = lax.dynamic_update_slice_in_dim(delta, row_delta(g_i, r_i, plan.plain_tier), start, axis=1)
        return (bacc, g_buf, delta, dq, dk, lam), jnp.sum(lam_i * r_i, axis=-1)

    def step(carry, xs):
        i, branch = xs
        carry, out_i = solve_leaf(carry, i)
        return sched.visit(branch, i, carry, c, tile), out_i

    def barrier(carry):
        nonlocal q, k  # the next tile reads q and k as they leave the barrier
        carry, q, k = _barrier(carry, q, k)
        return carry

    # Leaves in reverse: each segment's leaves in a loop, then the static block of its first leaf.
    # bacc starts as ds, and lam_i replaces leaf i's rows once solved (pushes from leaf i reach
    # only earlier rows), so at the end bacc is lam: no zero-filled bacc, no lam gathered.
    g_buf = tuple(_unwritten((b, tp, d), dtype) for dtype in plan.g_dtypes(d, acc))
    if leaf_in_kernel:  # the partial sums' buffers, (B, D / Bn, Tp) each, written leaf by leaf
        parts = (b, d // leaf_column_block(d), tp)
        delta = (_unwritten(parts, acc), _unwritten(parts, acc))
    else:
        delta = jnp.zeros((b, tp), acc)
    # In a static program with the kernels' products the first push into rows of dq (of dk)
    # writes them: no fill; the rows no push reaches (leaf 0's of dq, the last leaf's of dk)
    # become the empty sum before the diagonal products read them.
    first_writes = not sched.looped and plan.accumulates_in_kernel(d)
    dq_writes, dk_writes = _FirstWrites(c, first_writes), _FirstWrites(c, first_writes)
    if first_writes:
        dq0, dk0 = _unwritten((b, tp, d), acc), _unwritten((b, tp, d), acc)
    else:
        # Where no leaf loop runs the backward's zeros take the other sign and dk's its own buffer:
        # equal to the forward's racc fill (and to each other) they were one buffer, copied for
        # each accumulator that adds into it in place. In looped programs XLA fills each
        # accumulator anew, and -0.0 keeps them apart from the model's zeros (docs/performance.md).
        looped = sched.looped
        dq0, dk0 = (_accumulator((b, tp, d), acc, negative=looped, distinct=0 if looped else k) for k in (0, 1))
    # the leaf kernel writes lam into a buffer of its own (its programs read bacc_i while others
    # write lam_i; each row is written before it is read), or for a bf16 f only its bf16 copy (the
    # cotangent df: no cast pass; nothing else reads a float32 lambda, as the kernel forms the row
    # sums); elsewhere lam replaces bacc's rows
    if not leaf_in_kernel:
        lam = None
    elif df_dtype == jnp.bfloat16:
        lam = (None, _unwritten((b, tp, d), jnp.bfloat16))
    else:
        lam = (_unwritten((b, tp, d), acc),)
    carry, outs = (ds, g_buf, delta, dq0, dk0, lam), []
    for first, count in reversed(sched.segments()):
        if count == 1:
            carry, out_i = solve_leaf(carry, first)  # its block, first, is static (or absent)
            outs.append(out_i)  # None where the leaf kernel forms dgamma's partial sums
        else:
            carry, out_seg = lax.scan(
                step,
                carry,
                (jnp.arange(first, first + count), jnp.asarray(sched.branch[first : first + count])),
                reverse=True,
            )
            outs.append(None if out_seg is None else merge_chunks(out_seg))
        if first > 0:
            carry = sched.visit_static(first, carry, c, tile, barrier)
    bacc, g_buf, delta, dq, dk, lam = carry
    lam = bacc if lam is None else lam[-1]
    if leaf_in_kernel:  # the partial sums added in the order the dual GEMM adds delta's
        delta, dgamma = (functools.reduce(operator.add, list(jnp.moveaxis(x, 1, 0))) for x in delta)
    else:
        dgamma = outs[0] if len(outs) == 1 else jnp.concatenate(outs[::-1], axis=1)

    if plan.accumulates_in_kernel(d):  # the diagonal leaves' dL, dq and dk in the kernels, cast in place
        fresh = (dq_writes.unwritten(0, tp), dk_writes.unwritten(0, tp))  # leaves no push reached
        dq, dk = _gemm_diagonal_grads(plan, gemm_inputs, g_buf[0], delta, dq, dk, fresh)
        return dq, dk, dgamma, lam
    # The diagonal leaves' share of the logits gradient, all leaves at once.
    g4 = g_buf[0].reshape(b, n, c, d)  # g, or its hi part, which difference_dot's rounding gives
    s4 = s.reshape(b, n, c, d) if s_parts is None else tuple(x.reshape(b, n, c, d) for x in s_parts)
    dlogits = probs_grad("bnid,bnjd->bnij", a_ii, g4, delta.reshape(b, n, c), s4, plan.plain_tier, plan.platform)
    q4, k4 = q.reshape(b, n, c, d), k.reshape(b, n, c, d)
    dq = dq + (plan.plain("bnij,bnjd->bnid", dlogits, k4) * plan.scale).reshape(b, tp, d)
    dk = dk + (plan.plain("bnij,bnid->bnjd", dlogits, q4) * plan.scale).reshape(b, tp, d)
    return dq, dk, dgamma, lam


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _solve(plan, q, k, gamma, f, seg):
    return _forward(plan, q, k, gamma, f, seg)[0]


def recursive_solve_fwd(plan, q, k, gamma, f, seg):
    s, r, m, logl, a_ii, y_leaves, s_parts = _forward(plan, q, k, gamma, f, seg, for_backward=True)
    return s, (q, k, gamma, seg, s, r, m, logl, a_ii, y_leaves, s_parts, jnp.zeros((), f.dtype))  # the last: f's dtype


def _solve_bwd(plan, res, ds):
    q, k, f_dtype = res[0], res[1], res[-1].dtype
    # gamma's dtype: the accumulation dtype
    dq, dk, dgamma, df = _backward(plan, res[:-1], ds.astype(res[2].dtype), df_dtype=f_dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dgamma, df.astype(f_dtype), None


_solve.defvjp(recursive_solve_fwd, _solve_bwd)


def recursive_feedback_solve(
    q_b,
    k_b,
    gamma,
    f,
    segment_ids,
    *,
    leaf_size: int,
    tile: int,
    tier: str,
    platform: str,
    dtype,
    kernels: str = "xla",
    static_span="auto",
):
    """Recursive solve on validated inputs; q_b/k_b/f (B,T,D), gamma (B,T), segment_ids (B,T)
    integers or None (one sequence per row: no segment mask anywhere, only causality).

    ``leaf_size``: Cs; ``tile``: rows and keys of one tile of the wide blocks (rounded down to
    whole leaves). ``dtype``: accumulation dtype (float32, or float64 under x64). q_b and k_b keep their
    dtype for the logits (bf16 products are exact with fp32 accumulation); f and gamma are
    cast to ``dtype`` (a bf16 f where the leaf kernel reads it, below, stays bf16). T is padded to
    a multiple of the leaf with q = k = f = gamma = 0 and a padding segment (padded rows come
    last, so they never reach real rows). Returns s (B, T, D) in ``dtype``, or in bf16 for a bf16
    f where the Mosaic GPU leaf kernels run (``RecursivePlan.leaf_solves_in_kernel``): s rounded
    to bf16 once, as the caller's cast to f's dtype would. ``kernels``: "xla" (portable), or
    "pallas": with platform "gpu" the Mosaic GPU kernel ``row_stats_gpu.gpu_row_statistics`` for
    the statistics pass only (pushes stay XLA; any D that is a multiple of 64, streamed above
    256); otherwise the TPU kernels (``row_stats_tpu``,
    ``block_product_tpu``) in the statistics pass and the pushes of the forward and the backward
    (interpret mode off the TPU; leaves and diagonal inversion stay XLA). "pallas" needs float32
    accumulation and a leaf that is a multiple of 128 (the key block of the kernels), on GPU also D
    a multiple of 64 and tier bf16x3 or bfloat16 for float32 q/k, checked by ``ops.dispatch``.
    "gpu_gemm": the statistics pass in ``gpu_row_statistics``, the forward pushes fused in one
    Mosaic GPU kernel (``gpu_block_product``, D <= 512) or their P tiles in one (wider D), and the P
    and dL tiles (backward) of the pushed blocks in the GEMM-with-epilogue kernels of
    ``block_product_gpu``, the other products and everything else in XLA (Mosaic GPU interpret mode
    off the GPU); D a multiple of 64, tier bf16x3 (bf16 q/k) or bfloat16, float32 accumulation and a
    leaf that is a multiple of 128 (``block_product_gpu.check_solve_support``, ``ops.dispatch``).
    """
    b, t, d = f.shape
    kdtype = q_b.dtype if q_b.dtype == k_b.dtype == jnp.bfloat16 else dtype
    if kernels == "gpu_gemm":
        check_solve_support(d, tier, kdtype, platform)
    plan = RecursivePlan.make(
        t,
        leaf_size,
        tile,
        tier,
        platform,
        float(d) ** -0.5,
        input_dtype=kdtype,
        kernels=kernels,
        static_span=static_span,
    )
    tp = plan.padded_len
    if segment_ids is None and kernels == "pallas":  # the kernels always compare segment ids
        segment_ids = default_segment_ids(b, t)
    # Without segment ids the padding needs no mask either: padded rows come after every real
    # row and keys are strictly causal, so no real row sees a padded key.
    seg = None if segment_ids is None else pad_time(segment_ids.astype(jnp.int32), tp, PAD_SEGMENT)
    s = _solve(
        plan,
        pad_time(q_b.astype(kdtype), tp),
        pad_time(k_b.astype(kdtype), tp),
        pad_time(gamma.astype(dtype), tp),
        # a bf16 f stays bf16 where the leaf kernel may read it as it is (_forward widens it otherwise)
        pad_time(f if f.dtype == jnp.bfloat16 and plan.leaf_solves_in_kernel(d) else f.astype(dtype), tp),
        seg,
    )
    return s[:, :t]
