"""The recursive solve's compile-friendly paths, against the general ones they replace.

* Unpacked input (``segment_ids=None``): no segment mask anywhere in the solve, forward and
  backward; it must equal the masked solve on one-segment input (x64, 1e-12).
* Static schedule (``static_span``): the largest blocks pushed with static offsets between
  loops over segments of leaves; it must equal the all-loop schedule (x64, 1e-12).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.golden import relative_error
from sessa_jax.ops import feedback_solve
from sessa_jax.ops.solve.recursive import recursive_feedback_solve


def _inputs(dtype, t, *, d=8, b=2, seed=0, sharp=False):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    scale = 4.0 if sharp else 1.0  # sharp: logits ~ N(0, 16^2)
    q = scale * jax.random.normal(ks[0], (b, t, d), dtype)
    k = scale * jax.random.normal(ks[1], (b, t, d), dtype)
    sign = jnp.where(jax.random.bernoulli(ks[2], 0.5, (b, t)), 1.0, -1.0)
    g = (0.999 * sign).astype(dtype)  # gamma pinned at +-0.999: the hardest conditioning
    f = jax.random.normal(ks[3], (b, t, d), dtype)
    ds = jax.random.normal(ks[4], (b, t, d), dtype)
    return q, k, g, f, ds


def _value_and_grads(solve, args):
    """(s, (dq, dk, dgamma, df)) of sum(solve(q, k, g, f) * ds), jitted."""
    q, k, g, f, ds = args

    def loss(q, k, g, f):
        s = solve(q, k, g, f)
        return jnp.sum(s * ds), s

    (_, s), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, g, f)
    return s, grads


def _recursive(segment_ids, *, leaf, tile, tier="float32", platform="cpu", **kw):
    def solve(q, k, g, f):
        seg = None if segment_ids is None else segment_ids(g.shape)
        return recursive_feedback_solve(
            q, k, g, f, seg, leaf_size=leaf, tile=tile, tier=tier, platform=platform, dtype=f.dtype, **kw
        )

    return solve


def _assert_close(actual, expected, tol):
    """s, and each gradient measured against max(its own scale, 1e-2 x the largest gradient):
    saturated softmax rows shrink dq, dk far below the other gradients (and T=1 makes them 0)."""
    s, grads = actual
    s_ref, grads_ref = expected
    assert relative_error(s, s_ref) <= tol
    largest = max(float(jnp.max(jnp.abs(b))) for b in grads_ref)
    for name, a, b in zip(("dq", "dk", "dgamma", "df"), grads, grads_ref):
        assert relative_error(a, b, floor=1e-2 * largest) <= tol, name


def _primitives(jaxpr, found=None):
    """(primitive name, input avals) of every equation, sub-jaxprs (loops, branches) included."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        found.append((eqn.primitive.name, tuple(v.aval for v in eqn.invars if hasattr(v, "aval"))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _primitives(inner, found)
    return found


# Unpacked fast path ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "t,leaf,tile,sharp",
    [
        (1, 16, 16, False),  # one row, no past
        (64, 64, 64, False),  # one leaf
        (130, 16, 32, True),  # padded to whole tiles, wide blocks walked in tiles
        (257, 7, 28, False),  # odd leaf, padding
        (300, 8, 16, True),
    ],
)
def test_unpacked_solve_equals_the_masked_one_x64(t, leaf, tile, sharp):
    with jax.enable_x64(True):
        args = _inputs(jnp.float64, t, seed=t, sharp=sharp)
        ones = lambda shape: jnp.ones(shape, jnp.int32)
        masked = _value_and_grads(_recursive(ones, leaf=leaf, tile=tile), args)
        unpacked = _value_and_grads(_recursive(None, leaf=leaf, tile=tile), args)
        _assert_close(unpacked, masked, 1e-12)


def test_unpacked_solve_traced_for_gpu_equals_the_masked_one_x64():
    """Traced as for a GPU at bf16x3 (its forward pushes split P, so the unpacked path keeps the
    exponential out of the logits product with a barrier): still the masked solve's values."""
    from sessa_jax.ops.solve.recursive import RecursivePlan

    assert RecursivePlan.make(130, 16, 32, "bf16x3", "gpu", 1.0).splits_pushed_probs
    with jax.enable_x64(True):
        args = _inputs(jnp.float64, 130, seed=5, sharp=True)
        ones = lambda shape: jnp.ones(shape, jnp.int32)
        kw = dict(leaf=16, tile=32, tier="bf16x3", platform="gpu")
        _assert_close(
            _value_and_grads(_recursive(None, **kw), args), _value_and_grads(_recursive(ones, **kw), args), 1e-12
        )


@pytest.mark.parametrize("packed", [False, True])
def test_residual_in_the_leaf_step_equals_the_one_after_the_loop_x64(packed):
    """Traced for a GPU the XLA leaf step writes r_i = racc_i + Y_i rhs_i over racc_i; elsewhere r
    is racc + A_ii s after the loop: the same s and gradients, and the same as the dense oracle."""
    from sessa_jax.ops.solve.recursive import RecursivePlan

    assert RecursivePlan.make(300, 16, 64, "float32", "gpu", 1.0).residual_in_leaf_step
    assert not RecursivePlan.make(300, 16, 64, "float32", "tpu", 1.0).residual_in_leaf_step
    with jax.enable_x64(True):
        args = _inputs(jnp.float64, 300, seed=9, sharp=True)
        segs = (
            (lambda shape: (jnp.arange(shape[1]) >= 111).astype(jnp.int32) * jnp.ones(shape, jnp.int32))
            if packed
            else None
        )
        kw = dict(leaf=16, tile=64, tier="float32")
        in_step = _value_and_grads(_recursive(segs, platform="gpu", **kw), args)
        after = _value_and_grads(_recursive(segs, platform="tpu", **kw), args)
        _assert_close(in_step, after, 1e-12)
        q, k, g, f, ds = args
        seg = None if segs is None else segs(g.shape)

        def dense(q, k, g, f):
            return feedback_solve(q, k, g, f, segment_ids=seg, method="dense")

        _assert_close(in_step, _value_and_grads(dense, args), 1e-12)


def test_public_solve_without_segments_applies_no_segment_mask():
    """feedback_solve(segment_ids=None) traces no comparison of integer segment ids, forward or
    backward; with segment ids it does (the mask the unpacked path leaves out). Segment
    comparisons have the batch axis (B=3) in front; the identity of the leaf inversion has not."""
    q, k, g, f, _ = _inputs(jnp.float32, 96, b=3)

    def per_row(aval):
        return jnp.issubdtype(aval.dtype, jnp.integer) and aval.ndim >= 2 and aval.shape[0] == 3

    def integer_compares(segment_ids):
        def loss(q, k, g, f):
            return jnp.sum(feedback_solve(q, k, g, f, segment_ids=segment_ids, method="recursive", leaf_size=8) ** 2)

        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, g, f).jaxpr
        return [p for p in _primitives(jaxpr) if p[0] == "eq" and any(per_row(a) for a in p[1])]

    assert integer_compares(None) == []
    assert integer_compares(jnp.ones(g.shape, jnp.int32))


def test_unpacked_solve_with_the_kernels_still_masks_padding():
    """kernels="pallas" compares segment ids inside the kernels, so None becomes one segment
    there; the result equals the XLA unpacked path (TPU kernels in interpret mode)."""
    q, k, g, f, ds = _inputs(jnp.float32, 200, d=8, seed=1)
    xla = _value_and_grads(_recursive(None, leaf=128, tile=128), (q, k, g, f, ds))
    pallas = _value_and_grads(_recursive(None, leaf=128, tile=128, kernels="pallas"), (q, k, g, f, ds))
    _assert_close(pallas, xla, 1e-4)
    assert np.all(np.isfinite(np.asarray(pallas[0])))


# Static schedule --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,tile_leaves,span", [(16, 4, 8), (16, 4, 4), (16, 4, 1), (40, 4, 16), (13, 16, 4), (7, 2, 2), (24, 8, 8)]
)
def test_static_blocks_and_loop_segments_cover_the_schedule(n, tile_leaves, span):
    """The loop segments plus the static blocks push every block of the loop schedule once:
    loop blocks stay inside their segment, static blocks are exactly the multiples of the span."""
    from sessa_jax.ops.solve.schedule import PushSchedule, padded_leaves

    n = padded_leaves(n, tile_leaves)
    loop, static = PushSchedule.make(n, tile_leaves), PushSchedule.make(n, tile_leaves, span)
    assert static.static_blocks == tuple(j for j in range(1, n) if j % span == 0)
    assert list(loop.tiles()) == list(static.tiles())
    segments = static.segments()
    assert [first for first, _ in segments] == list(range(0, n, span)) and sum(c for _, c in segments) == n
    for first, count in segments:
        for j in range(first + 1, first + count):
            assert static.branch[j] and j not in static.static_blocks
            for _, r0, rows, k0, keys in static.block_tiles(j):
                assert first <= k0 and r0 + rows <= first + count  # the loop's blocks stay in the segment
    for j in static.static_blocks:
        assert static.branch[j] == 0 and loop.branch[j] != 0


_SLOW = pytest.mark.slow  # same schedule as a cell in make test, other packing (or a wider span)


@pytest.mark.parametrize(
    "t,leaf,tile,span,packed",
    [
        (300, 8, 32, 1, True),  # the whole schedule static
        pytest.param(300, 8, 32, 1, False, marks=_SLOW),
        (300, 8, 32, 8, False),  # the wide blocks static, narrow ones in the loops
        pytest.param(300, 8, 32, 8, True, marks=_SLOW),
        pytest.param(300, 8, 32, 16, False, marks=_SLOW),
        pytest.param(300, 8, 32, 16, True, marks=_SLOW),
        (257, 7, 28, 2, True),  # odd leaf, padding
        pytest.param(257, 7, 28, 2, False, marks=_SLOW),
        (130, 16, 32, 4, False),
        pytest.param(130, 16, 32, 4, True, marks=_SLOW),
    ],
)
def test_static_schedule_equals_the_loop_x64(t, leaf, tile, span, packed):
    with jax.enable_x64(True):
        args = _inputs(jnp.float64, t, seed=t, sharp=True)
        rng = np.random.default_rng(t)
        seg = np.cumsum(rng.random((2, t)) < 0.05, axis=1).astype(np.int32)  # documents of ~20 tokens
        segments = (lambda shape: jnp.asarray(seg)) if packed else None
        loop = _value_and_grads(_recursive(segments, leaf=leaf, tile=tile), args)
        static = _value_and_grads(_recursive(segments, leaf=leaf, tile=tile, static_span=span), args)
        _assert_close(static, loop, 1e-12)


@pytest.mark.parametrize("span", [1, 4])
def test_row_statistics_take_the_static_blocks_too(span):
    """A static schedule handed to the statistics pass: its static blocks are visited after the
    loop, with the same (m, logl) as the all-loop schedule (x64)."""
    from sessa_jax.ops.solve.row_stats import row_statistics
    from sessa_jax.ops.solve.schedule import PushSchedule

    with jax.enable_x64(True):
        q, k, _, _, _ = _inputs(jnp.float64, 128, sharp=True)
        stats = lambda sched: jax.jit(
            lambda q, k: row_statistics(q, k, None, leaf=8, scale=8**-0.5, tier="float32", schedule=sched)
        )(q, k)
        m_loop, logl_loop = stats(PushSchedule.make(16, 2))
        m_static, logl_static = stats(PushSchedule.make(16, 2, span))
        np.testing.assert_allclose(np.asarray(m_static), np.asarray(m_loop), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(logl_static), np.asarray(logl_loop), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "tier,kernels,platform,static",
    [
        ("bfloat16", "xla", "gpu", False),
        ("bf16x3", "xla", "gpu", True),
        ("bfloat16", "gpu_gemm", "gpu", "all"),
        ("bf16x3", "gpu_gemm", "gpu", "all"),
        ("bfloat16", "xla", "tpu", True),
        ("float32", "xla", "cpu", True),
    ],
)
def test_the_default_static_span_follows_the_push_kind(tier, kernels, platform, static):
    """ "auto": the wide blocks static where a push is three bf16 passes, every push in the loop
    where it is the GPU's bfloat16-tier one XLA GEMM, and with the Mosaic GPU kernels the whole
    schedule static up to GEMM_STATIC_LEAVES leaves, the wide blocks beyond (the compile reports'
    choices)."""
    from sessa_jax.ops.solve.recursive import GEMM_STATIC_LEAVES, RecursivePlan, default_static_span
    from sessa_jax.ops.solve.schedule import auto_static_span

    want = {"all": 1, True: 4, False: None}[static]
    assert default_static_span(16, 4, tier, kernels, platform) == want
    beyond = 2 * GEMM_STATIC_LEAVES  # past the bound the kernels take the wide blocks' rule
    assert default_static_span(beyond, 4, tier, kernels, platform) == (auto_static_span(beyond, 4) if static else None)
    plan = RecursivePlan.make(8192, 512, 2048, tier, platform, 1.0, kernels=kernels, static_span="auto")
    assert plan.static_span == want
    if static == "all":  # span 1: every leaf a segment of its own, no loop
        assert all(count == 1 for _, count in plan.schedule.segments())


@pytest.mark.parametrize(
    "n,tile_leaves,expected",
    [
        (16, 4, 4),  # T=8192 at leaf 512: the three wide blocks (6 tiles) static
        (8, 2, 2),  # T=8192 at leaf 1024: the three wide blocks (6 tiles) static
        (4, 4, None),  # one tile: no wide blocks
        (64, 8, None),  # 28 static tiles: over the bound, all in the loop
        (128, 8, None),
    ],
)
def test_default_static_span_makes_exactly_the_wide_blocks_static(n, tile_leaves, expected):
    from sessa_jax.ops.solve.schedule import STATIC_TILES, PushSchedule, auto_static_span

    span = auto_static_span(n, tile_leaves)
    assert span == expected
    if span is None:
        return
    static = PushSchedule.make(n, tile_leaves, span)
    assert not static.has_wide  # every wide block left the loops
    tiles = [t for j in static.static_blocks for t in static.block_tiles(j)]
    assert all(rows == keys == tile_leaves for *_, rows, _, keys in tiles) and len(tiles) <= STATIC_TILES


@pytest.mark.parametrize("packed,kernels", [(False, "xla"), (True, "xla"), (True, "pallas")])
def test_unwritten_buffers_are_written_before_they_are_read(packed, kernels, monkeypatch):
    """The buffers the solve leaves unfilled (``lax.empty``: g's, uninitialized on a GPU or TPU)
    are read only where written: NaN in them leaves s and every gradient bit for bit the same,
    with XLA's pushes and with the TPU kernels' (interpret mode here)."""
    from sessa_jax.ops.solve import recursive

    args = _inputs(jnp.float32, 512, d=16)
    segs = (lambda shape: jnp.zeros(shape, jnp.int32)) if packed else None
    solve = _recursive(segs, leaf=128, tile=256, static_span=2, kernels=kernels)
    clean = _value_and_grads(solve, args)
    monkeypatch.setattr(recursive, "_unwritten", lambda shape, dtype: jnp.full(shape, jnp.nan, dtype))
    poisoned = _value_and_grads(solve, args)
    for got, want in zip(jax.tree.leaves(poisoned), jax.tree.leaves(clean)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
