"""The bf16 hi/lo split of the bf16x3 tier, and why it rounds on the bits.

XLA's GPU compiler may keep values in more precision than asked (``xla_allow_excess_precision``,
on by default) and rewrites ``float32(bfloat16(x))`` to ``x``. A split written as
``lo = x - float32(bfloat16(x))`` then has lo = 0, and the tier quietly becomes one bf16 pass
(measured on an H100: 3e-3 instead of 5e-6). The CPU compiler does not do this rewrite, so these
tests replay it: ``_excess_precision_eval`` evaluates a function's jaxpr with every
float32 -> bfloat16 -> float32 round trip replaced by its input, as the GPU compiler does.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.ops.solve import precision
from sessa_jax.ops.solve.precision import bf16_round_bits, split_bf16

BF16 = jnp.bfloat16


def _relative_error(out, exact):
    """||out - exact|| / ||exact|| in float64."""
    return float(np.linalg.norm(np.asarray(out, np.float64) - exact) / np.linalg.norm(exact))


def _edge_values():
    """Finite float32 values around every rounding case of bf16, plus zeros and infinities."""
    rng = np.random.default_rng(0)
    low16 = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)  # ties at 0x8000
    high = rng.integers(0, 0xFFFF, size=400, dtype=np.uint32)
    high = np.concatenate([high, [0x0000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x7F7F, 0x7F7E]]).astype(np.uint32)
    bits = (high[:, None] << 16 | low16[None, :]).ravel()
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    extra = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4028235e38, -3.4028235e38], np.float32)
    return np.concatenate(
        [x, extra, rng.standard_normal(2000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 2000)]
    )


def test_bit_rounding_equals_the_bf16_conversion():
    x = jnp.asarray(_edge_values())
    got = np.asarray(jax.jit(bf16_round_bits)(x)).view(np.uint32)
    want = np.asarray(x.astype(BF16).astype(jnp.float32)).view(np.uint32)
    np.testing.assert_array_equal(got, want)  # bitwise: ties to even, signed zeros, overflow to inf


def test_split_parts_add_up_and_bf16_passes_through():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((64, 64)), jnp.float32)
    hi, lo = split_bf16(x)
    chex.assert_trees_all_equal_dtypes((hi, lo), (jnp.zeros((), BF16),) * 2)
    np.testing.assert_array_equal(np.asarray(hi), np.asarray(x.astype(BF16)))
    err = jnp.abs(hi.astype(jnp.float32) + lo.astype(jnp.float32) - x) / jnp.abs(x)
    assert float(jnp.max(err)) <= 2.0**-16
    same, none = split_bf16(x.astype(BF16))
    assert none is None and same.dtype == BF16


# --- replaying XLA GPU's excess-precision rewrite --------------------------------------------
def _is_convert(eqn, dtype):
    return eqn.primitive.name == "convert_element_type" and eqn.params["new_dtype"] == dtype


def _excess_precision_eval(fn, *args):
    """fn(*args), evaluated with float32(bfloat16(v)) replaced by v wherever v is float32."""
    closed = jax.make_jaxpr(fn)(*args)
    return _eval(closed.jaxpr, closed.consts, args)


def _eval(jaxpr, consts, args):
    env, narrowed = {}, {}  # narrowed: bf16 var -> the float32 var it was converted from

    def read(v):
        return v.val if hasattr(v, "val") else env[v]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        src = eqn.invars[0] if eqn.invars else None
        if _is_convert(eqn, jnp.dtype(BF16)) and src.aval.dtype == jnp.float32:
            narrowed[eqn.outvars[0]] = src
        if _is_convert(eqn, jnp.dtype(jnp.float32)) and src in narrowed:
            env[eqn.outvars[0]] = read(narrowed[src])  # the rewrite: the round trip is dropped
            continue
        sub = eqn.params.get("jaxpr")
        if sub is not None and hasattr(sub, "jaxpr"):  # a nested jit: evaluate it the same way
            outs = _eval(sub.jaxpr, sub.consts, [read(v) for v in eqn.invars])
        else:
            outs = eqn.primitive.bind(*[read(v) for v in eqn.invars], **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for var, value in zip(eqn.outvars, outs):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _convert_split(x):
    """The split as first written: correct on CPU, lo = 0 on GPU."""
    hi = x.astype(BF16)
    return hi, (x - hi.astype(jnp.float32)).astype(BF16)


def test_the_replayed_rewrite_zeroes_a_convert_split_but_not_the_bit_split():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((32, 32)), jnp.float32)
    _, lo_plain = _convert_split(x)
    _, lo_replayed = _excess_precision_eval(_convert_split, x)
    assert float(jnp.max(jnp.abs(lo_plain.astype(jnp.float32)))) > 0
    assert float(jnp.max(jnp.abs(lo_replayed.astype(jnp.float32)))) == 0.0  # what the H100 did
    hi, lo = split_bf16(x)
    hi_r, lo_r = _excess_precision_eval(split_bf16, x)
    np.testing.assert_array_equal(np.asarray(hi_r), np.asarray(hi))
    np.testing.assert_array_equal(np.asarray(lo_r), np.asarray(lo))


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_bf16x3_products_keep_their_accuracy_under_the_rewrite(platform, monkeypatch):
    """The tier's products (a float32 P times a float32 s, as in a push) stay ~1e-5 accurate when
    the GPU's rewrite is replayed; a one-pass bf16 product is ~1e-3."""
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.random((128, 256)), jnp.float32)  # probabilities-like: all positive
    b = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)

    rel = functools.partial(_relative_error, exact=exact)

    def x3(a, b):
        return precision.chained_dot("ij,jk->ik", a, b, "bf16x3", platform)

    (replayed,) = _excess_precision_eval(x3, a, b)
    one_pass = precision.chained_dot("ij,jk->ik", a, b, "bfloat16", platform)
    assert rel(replayed) <= 1e-5, rel(replayed)
    assert rel(one_pass) > 1e-4, rel(one_pass)  # so the bound above can tell the two apart
    monkeypatch.setattr(precision, "split_bf16", _convert_split)  # the split the H100 ran
    (lost,) = _excess_precision_eval(lambda a, b: x3(a, b), a, b)  # a new function: traced afresh
    assert rel(lost) > 1e-4, rel(lost)  # its low parts vanish: one bf16 pass's error


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_bfloat16_push_keeps_a_sinks_weight_unrounded(platform):
    """The bfloat16 tier's forward push (``push_dot``) on a P tile whose rows all give 1/3 to one
    key (an attention sink; bf16(1/3) is 2^-9 too large): P split into hi + lo, so only s's own
    rounding remains, also with the GPU's rewrite replayed; one pass of bf16(P) would add the
    same 2^-9 bias to every row, which the recurrence sums along the sequence."""
    rng = np.random.default_rng(4)
    rest = rng.random((128, 255))
    p = np.concatenate([np.full((128, 1), 1 / 3), (2 / 3) * rest / rest.sum(1, keepdims=True)], axis=1)
    a = jnp.asarray(p, jnp.float32)
    b = jnp.asarray(1.0 + 0.1 * rng.standard_normal((256, 64)), jnp.float32)
    exact = np.asarray(a, np.float64) @ np.asarray(b.astype(BF16), np.float64)  # s as rounded

    rel = functools.partial(_relative_error, exact=exact)

    (pushed,) = _excess_precision_eval(lambda a, b: precision.push_dot("ij,jk->ik", a, b, "bfloat16", platform), a, b)
    one_pass = precision.chained_dot("ij,jk->ik", a, b, "bfloat16", platform)
    assert rel(pushed) <= 2.0**-14, rel(pushed)
    assert rel(one_pass) > max(2.0**-11, 8 * rel(pushed)), (rel(one_pass), rel(pushed))
    sink = np.asarray(a.astype(BF16), np.float64)[:, 0] - p[:, 0]
    assert np.all(sink > 0)  # every row's rounding goes the same way


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_bfloat16_transposed_push_keeps_a_slowly_varying_g_unrounded(platform):
    """The bfloat16 tier's backward push (``transposed_push_dot``) on a column that every row
    weights alike (an attention sink's) and a g that varies slowly along the rows, as g = gamma
    lambda does: g split into hi + lo, so only P's own rounding remains, also with the GPU's rewrite
    replayed; one pass of bf16(g) rounds neighbouring rows alike and the column sums those errors."""
    rng = np.random.default_rng(5)
    p = jnp.asarray(0.3 + 0.05 * rng.random((512, 8)), jnp.float32)  # (rows, keys): P^T g sums rows
    g = jnp.asarray(1.0 + 0.01 * np.cumsum(rng.standard_normal((512, 64)), axis=0) / 23.0, jnp.float32)
    exact = np.asarray(p.astype(BF16), np.float64).T @ np.asarray(g, np.float64)  # P as rounded

    rel = functools.partial(_relative_error, exact=exact)

    def pulled(p, g):
        return precision.transposed_push_dot("pk,pd->kd", p, g, "bfloat16", platform)

    (out,) = _excess_precision_eval(pulled, p, g)
    one_pass = precision.chained_dot("pk,pd->kd", p, g, "bfloat16", platform)
    assert rel(out) <= 2.0**-14, rel(out)
    assert rel(one_pass) > max(2.0**-13, 100 * rel(out)), (rel(one_pass), rel(out))


@pytest.mark.parametrize("tier", ["bfloat16", "bf16x3"])
def test_leaf_products_on_gpu_take_the_compilers_three_pass_algorithm(tier):
    """The leaf products at bf16x3 (the leaf tier of both accelerator tiers) lower for a GPU as one dot with XLA's
    BF16_BF16_F32_X3 algorithm (the split inside the GEMM), and on the CPU as the explicit split's
    three bf16 dots; float32 stays one HIGHEST dot."""
    sd = jax.ShapeDtypeStruct((2, 128, 128), jnp.float32)

    def lowered(tier, platform):
        fn = jax.jit(lambda a, b: precision.leaf_dot("bij,bjd->bid", a, b, precision.leaf_tier(tier), platform))
        return fn.trace(sd, sd).lower(lowering_platforms=("cuda" if platform == "gpu" else "cpu",)).as_text()

    gpu = lowered(tier, "gpu")
    assert gpu.count("dot_general") == 1 and "num_primitive_operations = 3" in gpu
    assert "bf16" in gpu.split("algorithm")[1].split(">")[0]  # lhs and rhs precision bf16, accumulation f32
    cpu = lowered(tier, "cpu")
    assert cpu.count("dot_general") == 3 and "algorithm" not in cpu
    assert "algorithm" not in lowered("float32", "gpu")


def test_leaf_dot_is_the_bf16x3_product():
    """The product the leaf products take on each platform, where it runs here, is within bf16x3's
    error of the exact one (the same einsum, operands in the same order)."""
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (2, 128, 128)) for i in (0, 1))
    exact = np.einsum("bij,bjd->bid", np.asarray(a, np.float64), np.asarray(b, np.float64))
    err = lambda x: np.linalg.norm(np.asarray(x, np.float64) - exact) / np.linalg.norm(exact)  # noqa: E731
    split = precision.leaf_dot("bij,bjd->bid", a, b, "bf16x3", "cpu")
    assert err(split) < 2e-5  # bf16x3: ~2^-16 relative per product
    assert err(precision.leaf_dot("bij,bjd->bid", a, b, "bf16x3", "gpu")) < 2e-5


def test_difference_dot_takes_s_split_once_as_it_splits_it():
    """g s^T at the "bfloat16" tier with s given as its ``split_bf16`` parts (how the solve hands
    over an s it split once) is the product that splits s itself, bit for bit; the parts are
    refused at another tier or with float64 g, where the product would not split s."""
    g, s = (jax.random.normal(jax.random.PRNGKey(i), (2, 64, 32)) for i in (2, 3))
    whole = precision.difference_dot("bpd,bkd->bpk", g, s, "bfloat16", "cpu")
    parts = precision.difference_dot("bpd,bkd->bpk", g, split_bf16(s), "bfloat16", "cpu")
    np.testing.assert_array_equal(np.asarray(parts), np.asarray(whole))
    assert parts.dtype == jnp.float32
    with pytest.raises(ValueError, match="bfloat16 tier"):
        precision.difference_dot("bpd,bkd->bpk", g, split_bf16(s), "bf16x3", "cpu")
    with jax.enable_x64(True):
        g64 = jnp.asarray(np.asarray(g), jnp.float64)
        with pytest.raises(ValueError, match="float64"):
            precision.difference_dot("bpd,bkd->bpk", g64, split_bf16(s), "bfloat16", "cpu")
