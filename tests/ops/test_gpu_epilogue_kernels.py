"""The Mosaic GPU GEMM-with-epilogue kernels of the recursive solve (``block_product_gpu``)
against their XLA twins (``block_product``, the code the XLA path runs) in Mosaic GPU
interpret mode (jax >= 0.11, skipped before): P tiles (unmasked, segment-masked, causal
diagonal tiles), the backward's (P, dL) tiles, and the opt-in ``kernels="gpu_gemm"`` end to
end through ``feedback_solve``, forward and gradients, against ``kernels="xla"``. Also their
lowering for "cuda" (skipped where the installed JAX cannot lower Mosaic GPU here) and their
errors. On a GPU (``scripts/accelerator_check.sh kernels``) the end-to-end test runs the
compiled kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sessa_jax.ops.solve import accumulate_gpu as ag
from sessa_jax.ops.solve import block_product as bp
from sessa_jax.ops.solve import block_product_gpu as bg
from sessa_jax.ops.solve import leaf_gpu as lg
from sessa_jax.ops.solve.precision import bf16_round_bits, split_bf16
from tests.support.gpu_kernels import interpret_or_skip, lower_or_skip
from tests.support.kernel_inputs import kernel_segments, normal

B, D = 2, 128
SD = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
EPS_BF16 = 2.0**-8  # bf16's relative spacing: one rounding of a value differs by at most half of it
EPS_F32 = 2.0**-23


def _panel(p: int, kk: int, mask: str, seed: int = 0):
    """q (B, P, D), k (B, K, D) bf16 and row statistics m, logl (B, P) that make P ~ a softmax row's
    size (logits up to ~4, so exp spans several binades); segment ids per ``mask``."""
    q, k = normal(seed, (B, p, D), BF16), normal(seed + 1, (B, kk, D), BF16)
    m = 1.0 + 0.5 * normal(seed + 2, (B, p))
    logl = 2.0 + 0.3 * normal(seed + 3, (B, p))
    if mask == "segments":
        seg = kernel_segments(B, max(p, kk))
        return q, k, m, logl, seg[:, :p], seg[:, max(p, kk) - kk :]
    return q, k, m, logl, None, None


def _twin_probs(q, k, m, logl, seg_q, seg_k, causal=False):
    return bp.block_probs(q, seg_q, m, logl, k, seg_k, scale=D**-0.5, tier="bfloat16", platform="gpu", causal=causal)


def _allowed(seg_q, seg_k, p: int, kk: int, causal: bool):
    """(B, P, K) bool: the entries the mask keeps (same segment; with ``causal`` key < row)."""
    allowed = np.ones((B, p, kk), bool)
    if seg_q is not None:
        allowed &= np.asarray(seg_q)[:, :, None] == np.asarray(seg_k)[:, None, :]
    if causal:
        allowed &= np.tril(np.ones((p, kk), bool), -1)[None]
    return allowed


def _assert_probs(parts, want, allowed):
    """hi is P rounded once to bf16; hi + lo is P to bf16x3's ~2^-16; entries outside ``allowed``
    exactly 0."""
    hi = np.asarray(parts[0].astype(jnp.float32))
    want = np.asarray(want)
    assert parts[0].dtype == BF16 and parts[0].shape == want.shape
    np.testing.assert_allclose(hi, want, rtol=EPS_BF16, atol=0)
    if len(parts) == 2:
        total = hi + np.asarray(parts[1].astype(jnp.float32))
        # 2^-16: the lo part's own bf16 rounding; 64 fp32 ulps: the logits' fp32 accumulation order
        # and exp, which the kernel does not share with the twin
        np.testing.assert_allclose(total, want, rtol=2.0**-16 + 64 * EPS_F32, atol=0)
        assert np.abs(np.asarray(parts[1].astype(jnp.float32))).max() > 0  # the low part is really there
    for part in parts:
        assert np.all(np.asarray(part)[~allowed] == 0)
    assert hi[allowed].min() > 0  # every allowed entry is a positive P


@pytest.mark.parametrize(
    "mask,causal,split",
    [("none", False, True), ("segments", False, True), ("none", True, False), ("segments", True, True)],
)
def test_block_probs_kernel_matches_xla_twin(mask, causal, split):
    p, kk = (256, 256) if causal else (128, 384)
    q, k, m, logl, seg_q, seg_k = _panel(p, kk, mask)
    parts = bg.gpu_block_probs(
        q, seg_q, m, logl, k, seg_k, scale=D**-0.5, split=split, causal=causal, interpret=interpret_or_skip()
    )
    assert len(parts) == (2 if split else 1)
    _assert_probs(parts, _twin_probs(q, k, m, logl, seg_q, seg_k, causal), _allowed(seg_q, seg_k, p, kk, causal))


@pytest.mark.parametrize("mask", ["none", "segments"])
def test_block_probs_kernel_writes_a_diagonal_panel_in_float32(mask):
    """out_dtype float32: P itself (the diagonal leaves' A_ii), equal to the twin to the logits' fp32
    accumulation order and exp; zeros outside the causal mask, where the tiles with no key before
    any row skip their logits; the declared FLOPs count the tiles computed."""
    p = kk = 256
    q, k, m, logl, seg_q, seg_k = _panel(p, kk, mask, seed=7)
    (probs,) = bg.gpu_block_probs(
        q,
        seg_q,
        m,
        logl,
        k,
        seg_k,
        scale=D**-0.5,
        split=False,
        causal=True,
        out_dtype=jnp.float32,
        interpret=interpret_or_skip(),
    )
    want, allowed = np.asarray(_twin_probs(q, k, m, logl, seg_q, seg_k, True)), _allowed(seg_q, seg_k, p, kk, True)
    assert probs.dtype == jnp.float32 and probs.shape == (B, p, kk)
    np.testing.assert_allclose(np.asarray(probs), want, rtol=64 * EPS_F32, atol=0)
    assert np.all(np.asarray(probs)[~allowed] == 0) and np.asarray(probs)[allowed].min() > 0
    with pytest.raises(ValueError, match="want bfloat16 parts, or float32 with split=False"):
        bg.gpu_block_probs(q, seg_q, m, logl, k, seg_k, scale=1.0, split=True, out_dtype=jnp.float32)


@pytest.mark.parametrize("mask,causal,split", [("none", False, False), ("segments", False, True), ("none", True, True)])
def test_block_probs_and_grad_kernel_matches_xla_twin(mask, causal, split):
    """The backward's dual GEMM against ``block_probs_and_grad`` at the bfloat16 plain tier."""
    p, kk = (256, 256) if causal else (128, 256)
    q, k, m, logl, seg_q, seg_k = _panel(p, kk, mask, seed=4)
    # As in the solve: s varies slowly along time and r (a weighted mean of s) is close to it, so
    # g s^T - rowsum(g r) is a small difference of large terms (~1/30 of them here), whose
    # accuracy needs s's low part
    common = 2.0 * normal(12, (B, 1, D))
    s = common + jnp.cumsum(normal(13, (B, kk, D)), axis=1) / (4.0 * kk)
    r = common + normal(11, (B, p, D)) / 16.0
    g = normal(10, (B, p, D))
    g_used = bf16_round_bits(g)
    delta = bp.row_delta(g, r, "bfloat16")
    np.testing.assert_array_equal(delta, jnp.sum(g_used * r, axis=-1))
    s_hi, s_lo = split_bf16(s)
    parts, dl = bg.gpu_block_probs_and_grad(
        q,
        seg_q,
        m,
        logl,
        k,
        seg_k,
        g_used.astype(BF16),
        s_hi,
        s_lo,
        delta,
        scale=D**-0.5,
        split=split,
        causal=causal,
        interpret=interpret_or_skip(),
    )
    probs = _twin_probs(q, k, m, logl, seg_q, seg_k, causal)
    want = bp.probs_grad("bpd,bkd->bpk", probs, g, delta, s, "bfloat16", "gpu")
    if not causal:  # the twin the solve runs on its pushed blocks
        p_twin, dl_twin = bp.block_probs_and_grad(
            q,
            seg_q,
            m,
            logl,
            k,
            seg_k,
            g,
            delta,
            s,
            scale=D**-0.5,
            tier="bfloat16",
            plain_tier="bfloat16",
            platform="gpu",
        )
        np.testing.assert_array_equal(p_twin, probs)
        np.testing.assert_array_equal(dl_twin, want)
    _assert_probs(parts, probs, _allowed(seg_q, seg_k, p, kk, causal))
    assert dl.dtype == BF16 and dl.shape == (B, p, kk)
    dl, want = np.asarray(dl.astype(jnp.float32)), np.asarray(want)
    # dL is rounded once to bf16; before that, the kernel's fp32 g s^T (two wgmmas into one
    # accumulator) differs from the twin's (two products, then a sum) by fp32 accumulation order,
    # ~D fp32 ulps of |g| |s| |P|, which the difference g s^T - delta does not shrink.
    gs_bound = float(jnp.max(jnp.abs(g))) * float(jnp.max(jnp.abs(s))) * D  # >= |g_i . s_j|
    np.testing.assert_allclose(dl, want, rtol=EPS_BF16, atol=float(jnp.max(probs)) * gs_bound * D * EPS_F32)
    assert np.linalg.norm(dl - want) <= EPS_BF16 / 2 * np.linalg.norm(want)
    assert np.abs(want).max() > 0.01


@pytest.mark.parametrize("causal", [False, True])
def test_block_probs_and_grad_adds_delta_partial_sums(causal):
    """delta as n partial sums (B, n, P), as the backward leaf kernel writes them: P and dL the
    same bit for bit as with delta (B, P) summed from them in the same order; a delta of another
    shape is refused, naming it."""
    p, kk = 256, 256
    q, k, m, logl, seg_q, seg_k = _panel(p, kk, "none", seed=5)
    g, s = normal(20, (B, p, D), BF16), normal(21, (B, kk, D))
    s_hi, s_lo = split_bf16(s)
    parts = normal(22, (B, 3, p)) * 4.0
    summed = (parts[:, 0] + parts[:, 1]) + parts[:, 2]
    interp = interpret_or_skip()

    def run(delta):
        return bg.gpu_block_probs_and_grad(
            q, seg_q, m, logl, k, seg_k, g, s_hi, s_lo, delta, scale=D**-0.5, causal=causal, interpret=interp
        )

    (whole_p,), whole_dl = run(summed)
    (parts_p,), parts_dl = run(parts)
    for got, want in ((parts_p, whole_p), (parts_dl, whole_dl)):
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    assert float(jnp.abs(whole_dl.astype(jnp.float32)).max()) > 0
    with pytest.raises(ValueError, match=r"delta must be \(B, P\) = \(2, 256\) or partial sums"):
        run(parts[:, :, :128])


@pytest.mark.parametrize("mask,p,kk,dv", [("none", 64, 128, 64), ("segments", 128, 256, 512)])
def test_block_product_kernel_matches_xla_twin(mask, p, kk, dv):
    """The fused push P s (P and s split hi + lo, three products) against its twin
    ``split_block_product``; Dv=512 runs two Dv tiles (each recomputing the logits), P=128 two
    row blocks, K=128 and 256 two and four key blocks of the kernel's loop."""
    q, k, m, logl, seg_q, seg_k = _panel(p, kk, mask, seed=30)
    s = 2.0 * normal(34, (B, 1, dv)) + jnp.cumsum(normal(35, (B, kk, dv)), axis=1) / kk
    s_hi, s_lo = split_bf16(s)
    out = bg.gpu_block_product(q, seg_q, m, logl, k, seg_k, s_hi, s_lo, scale=D**-0.5, interpret=interpret_or_skip())
    want = bp.split_block_product(q, seg_q, m, logl, k, seg_k, s, scale=D**-0.5)
    assert out.dtype == jnp.float32 and out.shape == (B, p, dv)
    probs = np.asarray(_twin_probs(q, k, m, logl, seg_q, seg_k), np.float64)
    s64 = np.asarray(s, np.float64)
    scale_ = np.einsum("bpk,bkd->bpd", np.abs(probs), np.abs(s64))  # sum_k |P| |s| per entry
    out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
    # hi + lo is P to ~2^-16 in either (a hi that rounds the other way is made up by lo); the
    # logits' and the K sum's fp32 accumulation orders differ by ~(64 + K) fp32 ulps
    bound = (2.0**-15 + (64 + 2 * kk) * EPS_F32) * scale_
    assert np.all(np.abs(out - want) <= bound)
    # against the float64 product: the low parts are really used (one bf16 pass is ~2^-9 off)
    exact = np.einsum("bpk,bkd->bpd", probs, s64)
    assert np.linalg.norm(out - exact) <= 2.0**-14 * np.linalg.norm(exact)
    one_pass = np.einsum("bpk,bkd->bpd", probs.astype(BF16).astype(np.float64), s64.astype(BF16).astype(np.float64))
    assert np.linalg.norm(one_pass - exact) > 4 * np.linalg.norm(out - exact)


@pytest.mark.parametrize("mask,p,kk,dv", [("none", 64, 128, 64), ("segments", 128, 256, 512)])
def test_bfloat16_tier_block_product_kernel_matches_xla_twin(mask, p, kk, dv):
    """The bfloat16 tier's fused push (s_lo None: P split hi + lo, s rounded to bf16 once, two
    products) against its twin ``split_block_product(split=False)``: P's low part is used (one
    pass of bf16(P) is several times further from the product with that rounded s)."""
    q, k, m, logl, seg_q, seg_k = _panel(p, kk, mask, seed=31)
    s = 2.0 * normal(36, (B, 1, dv)) + jnp.cumsum(normal(37, (B, kk, dv)), axis=1) / kk
    s_b = s.astype(BF16)
    out = bg.gpu_block_product(q, seg_q, m, logl, k, seg_k, s_b, None, scale=D**-0.5, interpret=interpret_or_skip())
    want = bp.split_block_product(q, seg_q, m, logl, k, seg_k, s, scale=D**-0.5, split=False)
    assert out.dtype == jnp.float32 and out.shape == (B, p, dv)
    probs = np.asarray(_twin_probs(q, k, m, logl, seg_q, seg_k), np.float64)
    sb64 = np.asarray(s_b, np.float64)
    scale_ = np.einsum("bpk,bkd->bpd", np.abs(probs), np.abs(sb64))
    out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
    # hi + lo is P to ~2^-16 in either; the rest is the fp32 accumulation order
    assert np.all(np.abs(out - want) <= (2.0**-15 + (64 + 2 * kk) * EPS_F32) * scale_)
    exact = np.einsum("bpk,bkd->bpd", probs, sb64)  # the product with s as rounded
    assert np.linalg.norm(out - exact) <= 2.0**-14 * np.linalg.norm(exact)
    one_pass = np.einsum("bpk,bkd->bpd", probs.astype(BF16).astype(np.float64), sb64)
    assert np.linalg.norm(one_pass - exact) > 4 * np.linalg.norm(out - exact)


# --------------------------------------------------------------------------- the solve with them
def _solve_inputs(seed: int, t: int, d: int):
    """(q, k, gamma, f) for the solve: bf16 q, k, f (B, t, d) and gamma 0.95 tanh(N(0, 1)) (B, t)."""
    return (
        normal(seed, (B, t, d), BF16),
        normal(seed + 1, (B, t, d), BF16),
        0.95 * jnp.tanh(normal(seed + 2, (B, t))),
        normal(seed + 3, (B, t, d), BF16),
    )


def _solve_grad(kernels, precision, segment_ids):
    from sessa_jax.ops import feedback_solve

    def loss(q, k, g, f):
        s = feedback_solve(
            q, k, g, f, segment_ids=segment_ids, method="recursive", leaf_size=128, precision=precision, kernels=kernels
        )
        return jnp.sum(s.astype(jnp.float32) * jnp.cos(f.astype(jnp.float32))), s

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


@pytest.mark.parametrize(
    "precision,packed,fused",
    [("bfloat16", False, True), ("bfloat16", True, False), ("bf16x3", True, True), ("bf16x3", False, False)],
)
def test_feedback_solve_with_gemm_kernels_matches_xla(precision, packed, fused, monkeypatch):
    """kernels="gpu_gemm" (Mosaic GPU interpret mode on CPU, the compiled kernels on a GPU) against
    kernels="xla", bf16 inputs: s and every gradient agree to bf16 (the paths differ only by fp32
    accumulation order). ``fused``: the forward pushes in ``gpu_block_product`` (the solve's choice
    at D=64); else in ``gpu_block_probs`` and ``split_dot``, its choice at Dv > 512."""
    from sessa_jax.ops.solve import recursive

    if jax.default_backend() != "gpu":
        interpret_or_skip()
    calls = []
    covers = recursive.product_fused
    monkeypatch.setattr(recursive, "product_fused", lambda dv: calls.append(dv) or (fused and covers(dv)))
    t, d = 512, 64
    seg = kernel_segments(B, t) if packed else None
    args = _solve_inputs(20, t, d)
    (_, s_k), g_k = _solve_grad("gpu_gemm", precision, seg)(*args)
    assert calls and set(calls) == {d}  # the forward pushes asked which kernel takes them
    (_, s_x), g_x = _solve_grad("xla", precision, seg)(*args)
    assert s_k.dtype == BF16 and float(jnp.abs(s_x.astype(jnp.float32)).max()) > 1.0
    for name, a, w in zip(("s", "dq", "dk", "dgamma", "df"), (s_k, *g_k), (s_x, *g_x)):
        a, w = np.asarray(a.astype(jnp.float32)), np.asarray(w.astype(jnp.float32))
        eps = EPS_BF16 if name in ("s", "dq", "dk", "df") else 1e3 * EPS_F32  # bf16 outputs; dgamma float32
        np.testing.assert_allclose(a, w, rtol=eps, atol=eps * np.abs(w).max(), err_msg=name)
        # fp32 summation order moves few bf16 roundings: 2^-12 relative, while one bf16 pass of
        # g s^T (s's low part dropped) puts dq, dk ~1e-3 away here
        assert np.linalg.norm(a - w) <= 2.0**-12 * np.linalg.norm(w), name


@pytest.mark.parametrize(
    "precision,packed,fused",
    [("bfloat16", False, True), ("bfloat16", True, True), ("bf16x3", True, True), ("bfloat16", False, False)],
)
def test_gemm_solve_reads_its_unwritten_buffers_only_where_written(precision, packed, fused, monkeypatch):
    """With the kernels the solve leaves s, lambda, s's bf16 copy (its hi and lo parts at bf16x3)
    and g's parts unfilled (``lax.empty``, uninitialized on a GPU), and with the pushes' products
    in ``gpu_accumulate_product`` (``fused`` False) in a static program racc too, whose rows the
    first push into them writes: NaN in them leaves s and every gradient bit for bit the same, so
    no kernel reads a row before it is written."""
    from sessa_jax.ops.solve import recursive

    if jax.default_backend() != "gpu":
        interpret_or_skip()
    covers = recursive.product_fused
    monkeypatch.setattr(recursive, "product_fused", lambda dv: fused and covers(dv))
    t, d = 512, 64
    seg = kernel_segments(B, t) if packed else None
    args = _solve_inputs(70, t, d)
    clean = _solve_grad("gpu_gemm", precision, seg)(*args)
    monkeypatch.setattr(recursive, "_unwritten", lambda shape, dtype: jnp.full(shape, jnp.nan, dtype))
    poisoned = _solve_grad("gpu_gemm", precision, seg)(*args)
    for got, want in zip(jax.tree.leaves(poisoned), jax.tree.leaves(clean)):
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


@pytest.mark.parametrize("fused", [True, False])
def test_gemm_kernels_in_the_leaf_loops_match_xla(fused, monkeypatch):
    """Every push in the leaf loops (static_span None): the kernels' windows and in-place sums
    at traced starts, with segment ids, against kernels="xla" on the same schedule."""
    from sessa_jax.ops.solve import recursive

    if jax.default_backend() != "gpu":
        interpret_or_skip()
    covers = recursive.product_fused
    monkeypatch.setattr(recursive, "product_fused", lambda dv: fused and covers(dv))
    t, d = 512, 64
    seg = kernel_segments(B, t)

    def grads(kernels):
        def loss(q, k, g, f):
            s = recursive.recursive_feedback_solve(
                q,
                k,
                g,
                f,
                seg,
                leaf_size=128,
                tile=256,
                tier="bfloat16",
                platform=jax.default_backend(),
                dtype=jnp.float32,
                kernels=kernels,
                static_span=None,
            )
            s = s.astype(f.dtype)  # as feedback_solve returns it (the kernels give a bf16 f's s in bf16)
            return jnp.sum(s.astype(jnp.float32) * jnp.cos(f.astype(jnp.float32))), s

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))

    plan = recursive.RecursivePlan.make(t, 128, 256, "bfloat16", "gpu", 0.1, kernels="gpu_gemm", static_span=None)
    assert plan.schedule.segments() == [(0, plan.num_leaves)]  # one loop, no static block
    args = _solve_inputs(30, t, d)
    (_, s_k), g_k = grads("gpu_gemm")(*args)
    (_, s_x), g_x = grads("xla")(*args)
    for name, a, w in zip(("s", "dq", "dk", "dgamma", "df"), (s_k, *g_k), (s_x, *g_x)):
        a, w = np.asarray(a.astype(jnp.float32)), np.asarray(w.astype(jnp.float32))
        assert np.abs(w).max() > 0, name
        assert np.linalg.norm(a - w) <= 2.0**-12 * np.linalg.norm(w), name


def test_feedback_solve_gemm_kernel_errors():
    from sessa_jax.ops import feedback_solve

    x = jnp.zeros((1, 256, 64), BF16)
    g = jnp.zeros((1, 256))
    with pytest.raises(ValueError, match="run the tiers 'bf16x3' and 'bfloat16'"):
        feedback_solve(x, x, g, x, method="recursive", leaf_size=128, precision="float32", kernels="gpu_gemm")
    with pytest.raises(ValueError, match="need leaf_size a multiple of 128"):
        feedback_solve(x, x, g, x, method="recursive", leaf_size=64, precision="bfloat16", kernels="gpu_gemm")
    with pytest.raises(ValueError, match="at precision 'bf16x3' need bf16 q_b and k_b"):
        bg.check_solve_support(64, "bf16x3", jnp.float32, "gpu")
    with pytest.raises(ValueError, match="D a multiple of 64; got D=96"):
        bg.check_solve_support(96, "bfloat16", BF16, "gpu")
    bg.check_solve_support(1024, "bf16x3", BF16, "gpu")  # any D that is a multiple of 64
    bg.check_solve_support(128, "bfloat16", jnp.float32, "gpu")  # bfloat16 logits: one pass of bf16(q), bf16(k)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dtype=jnp.float32), "q must be bfloat16"),
        (dict(d=96), "D=96 must be a multiple of 64"),
        (dict(block_k=96), "block_k=96 must be a multiple of 64"),
        (dict(p=192), "P=192 must be a multiple of block_q=128"),
        (dict(one_seg=True), "give both seg_q and seg_k, or neither"),
    ],
)
def test_gemm_kernel_errors(kwargs, match):
    d, p = kwargs.get("d", 64), kwargs.get("p", 128)
    q, k = jnp.zeros((1, p, d), kwargs.get("dtype", BF16)), jnp.zeros((1, 256, d), kwargs.get("dtype", BF16))
    v = jnp.zeros((1, p))
    seg = (jnp.zeros((1, p), jnp.int32), None) if kwargs.get("one_seg") else (None, None)
    with pytest.raises(ValueError, match=match):
        bg.gpu_block_probs(q, seg[0], v, v, k, seg[1], scale=1.0, block_q=128, block_k=kwargs.get("block_k", 128))


@pytest.mark.parametrize("masked", [False, True])
def test_kernels_read_a_window_of_longer_inputs_in_place(masked):
    """A panel given as a window of full-length inputs (rows, keys and their traced starts, as the
    solve's loop passes them) gives the same tiles bit for bit as the kernels on the sliced arrays."""
    t, p, kk, r0, k0 = 512, 128, 256, 320, 64
    q, k, m, logl, seg, _ = _panel(t, t, "segments" if masked else "none", seed=7)
    seg = (seg, seg) if masked else (None, None)
    g = normal(20, (B, t, D), BF16)
    s_hi, s_lo = split_bf16(normal(21, (B, t, D)))
    delta = normal(22, (B, t))
    rows, keys = slice(r0, r0 + p), slice(k0, k0 + kk)
    cut = lambda x, s: None if x is None else x[:, s]  # noqa: E731
    interp = interpret_or_skip()

    @jax.jit
    def windowed(r0, k0):
        window = dict(rows=p, keys=kk, row_start=r0, key_start=k0, interpret=interp)
        fwd = bg.gpu_block_probs(q, seg[0], m, logl, k, seg[1], scale=D**-0.5, split=True, **window)
        bwd = bg.gpu_block_probs_and_grad(
            q, seg[0], m, logl, k, seg[1], g, s_hi, s_lo, delta, scale=D**-0.5, split=True, **window
        )
        return fwd, bwd

    got = windowed(jnp.int32(r0), jnp.int32(k0))
    panel = (q[:, rows], cut(seg[0], rows), m[:, rows], logl[:, rows], k[:, keys], cut(seg[1], keys))
    want = (
        bg.gpu_block_probs(*panel, scale=D**-0.5, split=True, interpret=interp),
        bg.gpu_block_probs_and_grad(
            *panel,
            g[:, rows],
            s_hi[:, keys],
            s_lo[:, keys],
            delta[:, rows],
            scale=D**-0.5,
            split=True,
            interpret=interp,
        ),
    )
    for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.shape == w.shape == (B, p, kk)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(w))
    assert np.abs(np.asarray(jax.tree.leaves(got)[-1].astype(jnp.float32))).max() > 0


# the fused push's window tests: T = 512 full-length inputs, a (P, K) = (128, 192) block at rows
# [320, 448) and keys [64, 256), Dv = 128
_T, _P, _K, _R0, _K0, _DV = 512, 128, 192, 320, 64, 128


def _fused_window_inputs(split: bool, seed: int):
    """Full-length (q, k, m, logl, segment ids) and s's bf16 parts ((hi, lo), or (bf16(s), None))."""
    q, k, m, logl, seg, _ = _panel(_T, _T, "segments", seed=seed)
    s = normal(seed + 15, (B, _T, _DV))
    return (q, k, m, logl, seg), split_bf16(s) if split else (s.astype(BF16), None)


@pytest.mark.parametrize("split", [False, True])
def test_fused_product_reads_a_window_of_longer_inputs_in_place(split):
    """The fused push given its block as a window of full-length q, k, m, logl, segment ids and s
    parts (traced starts, as the solve's loop passes them) equals the kernel on the sliced arrays
    bit for bit, and declares its block's work (not the full inputs') to the compiler."""
    p, kk, r0, k0, dv = _P, _K, _R0, _K0, _DV
    (q, k, m, logl, seg), s_parts = _fused_window_inputs(split, seed=8)
    rows, keys = slice(r0, r0 + p), slice(k0, k0 + kk)
    interp = interpret_or_skip()
    window = dict(scale=D**-0.5, rows=p, keys=kk, interpret=interp)

    @jax.jit
    def windowed(r0, k0):
        return bg.gpu_block_product(q, seg, m, logl, k, seg, *s_parts, row_start=r0, key_start=k0, **window)

    got = windowed(jnp.int32(r0), jnp.int32(k0))
    cut = tuple(None if x is None else x[:, keys] for x in s_parts)
    want = bg.gpu_block_product(
        q[:, rows],
        seg[:, rows],
        m[:, rows],
        logl[:, rows],
        k[:, keys],
        seg[:, keys],
        *cut,
        scale=D**-0.5,
        interpret=interp,
    )
    assert got.shape == want.shape == (B, p, dv)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.abs(np.asarray(got)).max() > 0
    cost = bg.product_cost(B, p, kk, D, dv, 2 if split else 1, True)
    assert cost.flops == 2 * B * p * kk * (D + (3 if split else 2) * dv)  # one Dv tile: the logits once


@pytest.mark.parametrize("p,kk,bq,bk", [(256, 256, 64, 128), (1024, 1024, 64, 128), (128, 384, 64, 64)])
def test_causal_dual_gemm_declares_only_the_tiles_it_computes(p, kk, bq, bk):
    """The causal dual GEMM skips every tile with no key before any of its rows; its declared FLOPs
    count the others, found here by brute force over the (row, key) grid."""
    below = np.arange(kk)[None, :] < np.arange(p)[:, None]
    tiles = below.reshape(p // bq, bq, kk // bk, bk).any(axis=(1, 3)).sum()
    assert bg.causal_tiles(p, kk, bq, bk) == tiles < (p // bq) * (kk // bk)
    cost = bg.causal_grad_cost(B, p, kk, D, 3, False, bq, bk)
    assert cost.flops == 3 * 2 * B * int(tiles) * bq * bk * D


@pytest.mark.parametrize("split", [False, True])
def test_fused_product_adds_into_a_buffer_in_place(split):
    """Given acc, the fused push adds its window's product into acc's rows [row_start, row_start +
    rows) in place (traced starts, segment ids): equal bit for bit to XLA adding the kernel's
    returned product (acc + product, the solve's order); the other rows untouched."""
    if not ag.in_place_supported():
        pytest.skip(f"jax {jax.__version__} cannot lower a jax.new_ref kernel operand")
    t, p, kk, r0, k0, dv = _T, _P, _K, _R0, _K0, _DV
    (q, k, m, logl, seg), s_parts = _fused_window_inputs(split, seed=9)
    acc = normal(25, (B, t, dv))
    interp = interpret_or_skip()
    common = dict(scale=D**-0.5, rows=p, keys=kk, interpret=interp)

    @jax.jit
    def both(acc, r0, k0):
        product = bg.gpu_block_product(q, seg, m, logl, k, seg, *s_parts, row_start=r0, key_start=k0, **common)
        added = bg.gpu_block_product(q, seg, m, logl, k, seg, *s_parts, row_start=r0, key_start=k0, acc=acc, **common)
        return added, lax.dynamic_update_slice_in_dim(acc, lax.dynamic_slice_in_dim(acc, r0, p, 1) + product, r0, 1)

    got, want = both(acc, jnp.int32(r0), jnp.int32(k0))
    assert got.shape == acc.shape and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    outside = np.r_[0:r0, r0 + p : t]
    np.testing.assert_array_equal(np.asarray(got)[:, outside], np.asarray(acc)[:, outside])
    assert not np.array_equal(np.asarray(got)[:, r0 : r0 + p], np.asarray(acc)[:, r0 : r0 + p])


def test_fused_product_refuses_a_buffer_of_another_shape():
    if not ag.in_place_supported():
        pytest.skip(f"jax {jax.__version__} cannot lower a jax.new_ref kernel operand")
    q = jnp.zeros((1, 512, 64), BF16)
    v = jnp.zeros((1, 512))
    with pytest.raises(ValueError, match=r"acc must be float32 \(B, T, Dv\) = \(1, 512, 64\)"):
        bg.gpu_block_product(
            q, None, v, v, q, None, q, None, scale=1.0, rows=128, keys=128, acc=jnp.zeros((1, 128, 64))
        )


@pytest.mark.parametrize("start,match", [(32, "multiple of 64"), (448, r"must lie inside the inputs' 512 rows")])
def test_kernel_window_errors(start, match):
    q = jnp.zeros((1, 512, 64), BF16)
    v = jnp.zeros((1, 512))
    with pytest.raises(ValueError, match=match):
        bg.gpu_block_probs(q, None, v, v, q, None, scale=1.0, rows=128, keys=128, row_start=start)
    with pytest.raises(ValueError, match=match):
        bg.gpu_block_product(q, None, v, v, q, None, q, None, scale=1.0, rows=128, keys=128, row_start=start)


# --------------------------------------------------------------------------- lowering for CUDA
@pytest.mark.parametrize("d,masked,split", [(64, True, True), (256, False, False), (1024, True, True)])
def test_gemm_kernels_lower_for_cuda(d, masked, split):
    p, kk = 128, 256
    rows, keys, vec = SD((B, p, d), BF16), SD((B, kk, d), BF16), SD((B, p), jnp.float32)
    segs = (SD((B, p), jnp.int32), SD((B, kk), jnp.int32)) if masked else ()

    def fwd(q, k, m, logl, *seg):
        seg_q, seg_k = seg or (None, None)
        return bg.gpu_block_probs(q, seg_q, m, logl, k, seg_k, scale=0.1, split=split)

    def bwd(q, k, m, logl, g, s_hi, s_lo, delta, *seg):
        seg_q, seg_k = seg or (None, None)
        return bg.gpu_block_probs_and_grad(q, seg_q, m, logl, k, seg_k, g, s_hi, s_lo, delta, scale=0.1, split=split)

    text = lower_or_skip(jax.jit(fwd), (rows, keys, vec, vec, *segs))
    assert bg.FWD_KERNEL_NAME in text and "mosaic_gpu" in text
    text = lower_or_skip(jax.jit(bwd), (rows, keys, vec, vec, rows, keys, keys, vec, *segs))
    assert bg.BWD_KERNEL_NAME in text and "mosaic_gpu" in text


@pytest.mark.parametrize(
    "d,dv,masked,split",
    [(64, 64, True, True), (128, 512, False, True), (1024, 1024, True, True), (128, 256, True, False)],
)
def test_block_product_kernel_lowers_for_cuda(d, dv, masked, split):
    p, kk = 128, 256
    rows, keys, vec = SD((B, p, d), BF16), SD((B, kk, d), BF16), SD((B, p), jnp.float32)
    values = SD((B, kk, dv), BF16)
    segs = (SD((B, p), jnp.int32), SD((B, kk), jnp.int32)) if masked else ()

    def fwd(q, k, m, logl, s_hi, s_lo, *seg):
        seg_q, seg_k = seg or (None, None)
        return bg.gpu_block_product(q, seg_q, m, logl, k, seg_k, s_hi, s_lo if split else None, scale=0.1)

    text = lower_or_skip(jax.jit(fwd), (rows, keys, vec, vec, values, values, *segs))
    name = bg.PRODUCT_KERNEL_NAME if split else bg.PRODUCT_BF16_KERNEL_NAME
    assert name in text and "mosaic_gpu" in text


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dv=320), "Dv=320 must be a multiple of 64 up to 256, or a multiple of 256"),
        (dict(dv=32), "Dv=32 must be a multiple of 64"),
        (dict(s_dtype=jnp.float32), "s_hi must be bfloat16"),
        (dict(block_k=256), "need 4.. KiB of shared memory, over the H100's 227 KiB"),
    ],
)
def test_block_product_kernel_errors(kwargs, match):
    dv = kwargs.get("dv", 256)
    q, k = jnp.zeros((1, 64, 64), BF16), jnp.zeros((1, 256, 64), BF16)
    s = jnp.zeros((1, 256, dv), kwargs.get("s_dtype", BF16))
    v = jnp.zeros((1, 64))
    with pytest.raises(ValueError, match=match):
        bg.gpu_block_product(q, None, v, v, k, None, s, s, scale=1.0, block_k=kwargs.get("block_k", 64))


@pytest.mark.parametrize("kernels,d", [("gpu_gemm", 128), ("xla", 128), ("gpu_gemm", 1024)])
def test_recursive_solve_with_gemm_kernels_lowers_for_cuda(kernels, d):
    """Forward + backward of the solve for "cuda": the kernels are in the program exactly when
    opted in (the statistics kernel too, streamed at D=1024); the forward pushes take the fused
    product up to D=512, the P tiles above (the P-tile kernel also gives A_ii at every width)."""
    from sessa_jax.ops.solve.recursive import recursive_feedback_solve

    t = 1024

    def loss(q, k, g, f):
        s = recursive_feedback_solve(
            q,
            k,
            g,
            f,
            None,
            leaf_size=128,
            tile=256,
            tier="bfloat16",
            platform="gpu",
            dtype=jnp.float32,
            kernels=kernels,
        )
        return jnp.sum(s * jnp.cos(f.astype(jnp.float32)))

    x = SD((B, t, d), BF16)
    text = lower_or_skip(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), (x, x, SD((B, t), jnp.float32), x))
    opted_in, fused = kernels == "gpu_gemm", d <= bg.FUSED_MAX_DV
    assert (bg.PRODUCT_BF16_KERNEL_NAME in text) == (opted_in and fused)  # the bfloat16 tier's two passes
    assert bg.PRODUCT_KERNEL_NAME not in text
    # the P-tile kernel: the pushes' P tiles where they are not fused, and the diagonal leaves' A_ii
    # in float32 (causal) at any width
    assert (bg.FWD_KERNEL_NAME in text) == opted_in
    assert (bg.BWD_KERNEL_NAME in text) == opted_in
    # the bfloat16 tier's pushed products add into racc, bacc, dq and dk in place (where this jax lowers it)
    in_place = opted_in and ag.in_place_supported()
    assert (ag.KERNEL_NAME in text) == (ag.TRANSPOSED_KERNEL_NAME in text) == in_place
    # and the diagonal leaves' last products of dq and dk are added and cast in one pass each
    assert (ag.ADD_KERNEL_NAME in text) == (ag.ADD_TRANSPOSED_KERNEL_NAME in text) == in_place
    # and the leaf steps read Y_i and their right-hand sides in place (leaf 128 and D covered), the
    # forward's writing r = racc + A_ii s as well (no product by A_ii of its own)
    assert (lg.KERNEL_NAME in text) == (lg.TRANSPOSED_KERNEL_NAME in text) == in_place
    assert ("sessa_row_stats_gpu" in text) == opted_in  # the statistics pass: the (streamed) stats kernel
