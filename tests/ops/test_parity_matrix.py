"""Every path of ``feedback_solve`` and ``causal_attention`` against the dense oracle: one matrix.

Rows are the paths: the dense method itself; the blocked solve and attention with the "loop"
schedule (chunks of 1, a chunk that leaves masked tiles and a partial last chunk, one chunk
longer than T) and the "panels" schedule; the recursive solve at the public entry point, with
one-token leaves, with tiles of wide blocks and with a static span. Columns are the input
dtypes: float64 (x64), float32 and bfloat16. Each cell runs without segment ids (causality
alone: the recursive solve's unpacked path) and with ``SEGMENTS_37`` (one-token documents,
padding in the middle and at the end). Inputs are in the hard regime: sharp logits, GQA for
attention, gamma near +-1 for the solve; T = 37 is no multiple of any chunk or leaf.

The oracle is the dense method run in float64 on the very same (dtype-rounded) inputs and
cotangent, computed once per (op, dtype, segments). The output and each gradient must lie
within ``tolerance(dtype)`` of it, relative to its largest entry, and keep the input dtype.
Special cases (errors, memory, schedule rules, long or odd shapes) stay in the tests of each path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.golden import relative_error
from sessa_jax.ops import causal_attention, feedback_solve
from sessa_jax.ops.attention.blocked import blocked_causal_attention
from sessa_jax.ops.masks import compute_dtype
from sessa_jax.ops.solve.blocked import blocked_feedback_solve
from sessa_jax.ops.solve.recursive import recursive_feedback_solve
from tests.support.parity import SEGMENTS_37, output_and_grads

B, T = 2, 37  # SEGMENTS_37's shape
DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16}


def tolerance(dtype) -> float:
    """Bound on the relative error of a path with ``dtype`` inputs against the float64 oracle.

    Both ops compute in float32 at least (float64 under x64), so 64 units in the last place of
    that dtype; bfloat16 results are rounded once more at the end: two bfloat16 ulps on top.
    """
    compute = jnp.promote_types(dtype, jnp.float32)
    tol = 64 * float(jnp.finfo(compute).eps)
    if jnp.dtype(dtype) == jnp.bfloat16:
        tol += 2 * float(jnp.finfo(jnp.bfloat16).eps)
    return tol


def _recursive(leaf: int, tile: int, static_span):
    def solve(q, k, g, f, seg):
        return recursive_feedback_solve(
            q,
            k,
            g,
            f,
            seg,
            leaf_size=leaf,
            tile=tile,
            tier="float32",
            platform="cpu",
            dtype=compute_dtype(q, k, g, f),
            static_span=static_span,
        ).astype(f.dtype)

    return solve


def _blocked_solve(chunk: int, schedule: str):
    def solve(q, k, g, f, seg):
        return blocked_feedback_solve(q, k, g, f, seg, chunk, compute_dtype(q, k, g, f), schedule).astype(f.dtype)

    return solve


def _blocked_attention(chunk: int, schedule: str):
    def attend(q, k, v, seg):
        return blocked_causal_attention(q, k, v, seg, chunk, compute_dtype(q, k, v), schedule).astype(v.dtype)

    return attend


SOLVE_PATHS = {
    "dense": lambda q, k, g, f, seg: feedback_solve(q, k, g, f, segment_ids=seg, method="dense"),
    "blocked-loop-c1": _blocked_solve(1, "loop"),
    "blocked-loop-c4": _blocked_solve(4, "loop"),  # with SEGMENTS_37: off-diagonal tiles fully masked for some rows
    "blocked-loop-c7": _blocked_solve(7, "loop"),
    "blocked-loop-c64": _blocked_solve(64, "loop"),  # one chunk longer than T
    "blocked-panels-c5": _blocked_solve(5, "panels"),
    "blocked-panels-c16": _blocked_solve(16, "panels"),
    "recursive": lambda q, k, g, f, seg: feedback_solve(q, k, g, f, segment_ids=seg, method="recursive", leaf_size=8),
    "recursive-leaf1": _recursive(1, 2, "auto"),
    "recursive-tiles": _recursive(4, 8, None),  # the all-loop schedule
    "recursive-static": _recursive(4, 8, 2),  # every second block pushed with static offsets
}
ATTENTION_PATHS = {
    "dense": lambda q, k, v, seg: causal_attention(q, k, v, segment_ids=seg, method="dense"),
    "blocked-loop-c1": _blocked_attention(1, "loop"),
    "blocked-loop-c5": _blocked_attention(5, "loop"),
    "blocked-loop-c7": _blocked_attention(7, "loop"),
    "blocked-loop-c64": _blocked_attention(64, "loop"),
    "blocked-panels-c8": _blocked_attention(8, "panels"),
    "blocked-panels-c64": _blocked_attention(64, "panels"),
}


def _inputs(op: str, dtype):
    """(arguments, cotangent) in ``dtype``, drawn in float64 from a seeded generator."""
    rng = np.random.default_rng(37)
    if op == "solve":  # q_b, k_b, f (B, T, 8); gamma (B, T)
        args = (
            4.0 * rng.standard_normal((B, T, 8)),
            rng.standard_normal((B, T, 8)),  # sharp rows
            0.999 * np.tanh(3.0 * rng.standard_normal((B, T))),  # gamma near +-1: the hardest solve
            rng.standard_normal((B, T, 8)),
        )
        cot = rng.standard_normal((B, T, 8))
    else:  # GQA: q (B, T, 4, 6), k and v (B, T, 2, 6)
        args = (
            3.0 * rng.standard_normal((B, T, 4, 6)),
            rng.standard_normal((B, T, 2, 6)),
            rng.standard_normal((B, T, 2, 6)),
        )
        cot = rng.standard_normal((B, T, 4, 6))
    with jax.enable_x64(dtype == "float64"):
        return tuple(jnp.asarray(a, DTYPES[dtype]) for a in args), jnp.asarray(cot, DTYPES[dtype])


def _segments(segmented: bool):
    return SEGMENTS_37 if segmented else None


@functools.lru_cache(maxsize=None)
def _oracle(op: str, dtype: str, segmented: bool):
    """The dense method in float64 on ``_inputs(op, dtype)``: (output, gradients) as numpy arrays."""
    args, cot = _inputs(op, dtype)
    dense = SOLVE_PATHS["dense"] if op == "solve" else ATTENTION_PATHS["dense"]
    seg = _segments(segmented)
    with jax.enable_x64(True):
        wide = tuple(jnp.asarray(np.asarray(a, np.float64)) for a in args)
        out, grads = output_and_grads(lambda *a: dense(*a, seg), wide, jnp.asarray(np.asarray(cot, np.float64)))
        assert out.dtype == jnp.float64
        return np.asarray(out), tuple(np.asarray(g) for g in grads)


def _check(op: str, path, dtype: str, segmented: bool):
    args, cot = _inputs(op, dtype)
    seg = _segments(segmented)
    with jax.enable_x64(dtype == "float64"):
        out, grads = output_and_grads(lambda *a: path(*a, seg), args, cot)
    out_ref, grads_ref = _oracle(op, dtype, segmented)
    tol = tolerance(DTYPES[dtype])
    assert out.dtype == DTYPES[dtype] and all(g.dtype == DTYPES[dtype] for g in grads)
    assert relative_error(out, out_ref) <= tol, ("output", relative_error(out, out_ref), tol)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert relative_error(g, g_ref) <= tol, (f"gradient of argument {i}", relative_error(g, g_ref), tol)


# Chunk variants whose float32 and bfloat16 cells add no case that another chunk of the same
# schedule does not cover (one chunk, one chunk longer than T, a second panel width): their
# float64 cells run in `make test`, the rest with the slow tests (`pytest -m slow`).
FLOAT64_ONLY_BY_DEFAULT = {
    "solve": ("blocked-loop-c1", "blocked-loop-c64", "blocked-panels-c16"),
    "attention": ("blocked-loop-c1", "blocked-loop-c5", "blocked-loop-c64", "blocked-panels-c64"),
}


def _cells(op: str, paths) -> list:
    """(path, dtype) parameters of ``op``'s matrix, the reduced variants' low-precision cells marked slow."""
    return [
        pytest.param(
            path,
            dtype,
            marks=pytest.mark.slow if path in FLOAT64_ONLY_BY_DEFAULT[op] and dtype != "float64" else (),
        )
        for path in paths
        for dtype in DTYPES
    ]


@pytest.mark.parametrize("segmented", [False, True], ids=["causal", "segments"])
@pytest.mark.parametrize("path,dtype", _cells("solve", SOLVE_PATHS))
def test_feedback_solve_matches_the_dense_oracle(path, dtype, segmented):
    _check("solve", SOLVE_PATHS[path], dtype, segmented)


@pytest.mark.parametrize("segmented", [False, True], ids=["causal", "segments"])
@pytest.mark.parametrize("path,dtype", _cells("attention", ATTENTION_PATHS))
def test_causal_attention_matches_the_dense_oracle(path, dtype, segmented):
    _check("attention", ATTENTION_PATHS[path], dtype, segmented)


def test_the_matrix_can_fail():
    """The bound is tight enough to catch a wrong path: the solve without its feedback term
    (gamma = 0, i.e. s = f) and attention over one head group too few both miss it."""
    args, cot = _inputs("solve", "float32")
    out_ref, _ = _oracle("solve", "float32", False)
    q, k, g, f = args
    wrong = feedback_solve(q, k, jnp.zeros_like(g), f, method="dense")
    assert relative_error(wrong, out_ref) > 100 * tolerance(jnp.float32)
    (q, k, v), _ = _inputs("attention", "float32")
    out_ref, _ = _oracle("attention", "float32", False)
    wrong = causal_attention(q, k[:, :, ::-1], v[:, :, ::-1], method="dense")  # heads paired with the other group
    assert relative_error(wrong, out_ref) > 100 * tolerance(jnp.float32)
