"""Influence by VJPs: exact against full Jacobians, closed forms, tail classes, non-decaying retrieval."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax import SessaConfig, SessaLayer, SessaLM
from sessa_jax import analysis as an
from tests.support.shared import built_once

T = 1024  # tail tests: lags 1 .. 1023
D = 4
LAGS = an.log_lags(T - 1, 20)
FIT_FROM = 32  # fit the tail, past the small-t transient of the discrete recurrences


def _full_jacobian_norms(fn, x):
    jac = jax.jit(jax.jacrev(fn))(x)  # (T, O, T, D): fine at test size only
    return np.sqrt(np.sum(np.asarray(jac, np.float64) ** 2, axis=(1, 3)))


def test_influence_equals_full_jacobian_for_a_random_layer():
    cfg = SessaConfig(d_model=8, n_heads=2, chunk_size=4)
    layer = SessaLayer(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (11, 8))
    variables = jax.jit(layer.init)(jax.random.PRNGKey(1), x[None])  # op by op the init took seconds
    fn = an.layer_fn(layer, variables)
    targets = np.array([0, 3, 10])
    got = an.influence(fn, x, targets, target_chunk=2)  # chunking must not matter
    want = _full_jacobian_norms(fn, x)[targets]
    # the same float32 products summed in another order: a few ulps of the largest entry
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * want.max())
    assert np.all(got[0, 1:] == 0) and np.all(got[1, 4:] == 0)  # causal: the future has no influence


def test_influence_of_a_whole_model_from_its_embeddings():
    cfg = SessaConfig(d_model=8, n_heads=2, n_layers=2, vocab_size=16, chunk_size=4)
    model = SessaLM(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (9,), 0, 16)
    variables = jax.jit(model.init)(jax.random.PRNGKey(3), tokens[None])
    fn, x0 = an.lm_fn(model, variables, tokens)
    np.testing.assert_allclose(
        jax.jit(fn.apply)(fn.args, x0), jax.jit(model.apply)(variables, tokens[None])[0], rtol=1e-6, atol=1e-6
    )
    got = an.influence(fn, x0, np.arange(9))
    want = _full_jacobian_norms(fn, x0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * want.max())
    assert np.all(np.triu(got, 1) == 0) and np.all(np.diag(got) > 0)


def test_uniform_sessa_from_a_source_in_the_middle_matches_its_closed_form():
    t_len, source, gamma = 96, 40, 0.5
    module, variables = an.uniform_mixer("sessa", D, gamma=gamma)
    x = an.constant_input(t_len, D)
    got = an.influence(an.layer_fn(module, variables), x, np.arange(source, t_len))[:, source]
    want = np.sqrt(D) * an.sessa_uniform_closed_form(gamma, t_len, source)[source:]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert np.array_equal(an.sessa_uniform_closed_form(gamma, t_len), an.sessa_uniform_closed_form(gamma, t_len, 0))
    # the Sessa / Transformer ratio at t is ~ (t / source)^gamma, not the ~t^gamma of source 0
    ratio = want[-1] / np.sqrt(D) * t_len  # g_t / (1 / (t + 1)) at t = t_len - 1
    assert abs(ratio / ((t_len - 1) / source) ** gamma - 1) < 0.05


def test_influence_compiles_once_per_shape_and_batches_over_examples():
    cfg = SessaConfig(d_model=8, n_heads=2, n_layers=1, vocab_size=16, chunk_size=4)
    model = SessaLM(cfg)
    toks = jax.random.randint(jax.random.PRNGKey(4), (3, 10), 0, 16)
    init = jax.jit(model.init)  # one compile for both parameter sets
    variables = init(jax.random.PRNGKey(5), toks[:1])
    before = an.TRACES["influence"]
    rows = []
    for b in range(3):  # new tokens and a new target each call: one trace for the shape
        fn, x0 = an.lm_fn(model, variables, toks[b])
        rows.append(an.influence(fn, x0, [9 - b]))
    assert an.TRACES["influence"] == before + 1
    other = init(jax.random.PRNGKey(6), toks[:1])  # new parameters, same shapes: still no retrace
    fn, x0 = an.lm_fn(model, other, toks[0])
    an.influence(fn, x0, [9])
    assert an.TRACES["influence"] == before + 1
    # the batched form gives the per-example rows, with one more trace (its own shape)
    batched = an.lm_influence(model, variables, toks, np.array([[9], [8], [7]]))
    assert an.TRACES["influence"] == before + 2
    for b in range(3):
        np.testing.assert_allclose(batched[b], rows[b], rtol=1e-5, atol=1e-6 * rows[b].max())
    an.lm_influence(model, variables, toks[::-1], np.array([[5], [6], [7]]))
    assert an.TRACES["influence"] == before + 2


def _profile(kind, t_len=T, lags=LAGS, **kw):
    module, variables = an.uniform_mixer(kind, D, **kw)
    return an.lag_profile(an.layer_fn(module, variables), an.constant_input(t_len, D), lags)


def _profile_once(tmp_path_factory, kind, **kw):
    """``_profile(kind, **kw)`` computed once per session: as module fixtures, each xdist worker
    that got one of the tests using it computed its own. The values come back exactly (JSON
    keeps a float's every bit), in their dtype."""

    def build(_folder):
        prof = np.asarray(_profile(kind, **kw))
        return {"values": prof.tolist(), "dtype": prof.dtype.name}

    record = built_once(tmp_path_factory, f"analysis-profile-{kind}", build)[1]
    return np.asarray(record["values"], record["dtype"])


@pytest.fixture(scope="module")
def sessa_half(tmp_path_factory):
    return _profile_once(tmp_path_factory, "sessa", gamma=0.5)


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    return _profile_once(tmp_path_factory, "transformer")


def test_sessa_uniform_routing_matches_closed_form(sessa_half):
    # d s_t / d x_0 = g_t * I, so ||.||_F = sqrt(D) g_t; float32 solve: well inside 1e-4
    want = np.sqrt(D) * an.sessa_uniform_closed_form(0.5, T)[LAGS]
    np.testing.assert_allclose(sessa_half, want, rtol=1e-4)


def test_transformer_uniform_attention_matches_closed_form(transformer):
    np.testing.assert_allclose(transformer, np.sqrt(D) / (LAGS + 1), rtol=1e-4)


@pytest.mark.parametrize("gamma", [0.5, 0.8])
def test_sessa_tail_is_a_power_law_with_exponent_one_minus_gamma(gamma, sessa_half):
    prof = sessa_half if gamma == 0.5 else _profile("sessa", gamma=gamma)
    tail = LAGS >= FIT_FROM
    fit = an.fit_power_law(LAGS[tail], prof[tail])
    assert abs(fit.slope + (1.0 - gamma)) <= 0.05, fit
    assert an.fit_exponential(LAGS[tail], prof[tail]).r2 < 0.99  # and not an exponential


def test_transformer_tail_is_one_over_t(transformer):
    tail = LAGS >= FIT_FROM
    fit = an.fit_power_law(LAGS[tail], transformer[tail])
    assert abs(fit.slope + 1.0) <= 0.05, fit


def test_mamba_tail_is_exponential():
    decay = 0.95
    lags = np.arange(1, 301, 15)
    prof = _profile("mamba", t_len=301, lags=lags, decay=decay)
    exp_fit = an.fit_exponential(lags, prof)
    assert exp_fit.r2 > 0.99, exp_fit
    assert exp_fit.slope == pytest.approx(np.log(decay), rel=1e-2), exp_fit  # rate = log(decay) per step
    assert an.fit_power_law(lags, prof).r2 < 0.99  # a power law does not fit it


def test_selective_retrieval_does_not_decay():
    d, anchor = 8, 40
    module, variables = an.selective_mixer(d)
    x = an.marker_input(anchor + 2049, d, anchor=anchor)
    prof = an.lag_profile(an.layer_fn(module, variables), x, [16, 2048], source=anchor)
    assert abs(prof[1] / prof[0] - 1.0) <= 0.10, prof
    # and it is the feedback doing it: influence ~ gamma * ||I||_F = 0.999 sqrt(D)
    np.testing.assert_allclose(prof, 0.999 * np.sqrt(d), rtol=1e-3)


def test_fits_recover_known_exponents():
    lags = np.arange(1, 200)
    assert an.fit_power_law(lags, 3.0 * lags**-0.7).slope == pytest.approx(-0.7, abs=1e-10)
    fit = an.fit_exponential(lags, 2.0 * 0.9**lags)
    assert fit.slope == pytest.approx(np.log(0.9), abs=1e-10) and fit.r2 == pytest.approx(1.0)


def test_bad_arguments_raise():
    fn = lambda x: x  # noqa: E731
    with pytest.raises(ValueError, match="targets"):
        an.influence(fn, jnp.zeros((4, 2)), [4])
    with pytest.raises(ValueError, match="source"):
        an.lag_profile(fn, jnp.zeros((4, 2)), [1, 5])
    with pytest.raises(ValueError, match="gamma"):
        an.uniform_mixer("sessa", gamma=1.0)
