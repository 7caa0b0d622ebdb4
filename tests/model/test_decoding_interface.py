"""``decoding.generate`` with a user's own model (the DecodableModel interface, not SessaLM),
the scalar and key arguments users pass, SessaLM caches of the wrong layout, and the
public feedback solve's refusal of empty and integer inputs."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax import SessaConfig, SessaLayer, SessaLM, decoding, ops

LAYER = SessaConfig(d_model=16, n_heads=2, solver="blocked", max_len=12)
PROMPT = (jnp.arange(10, dtype=jnp.int32).reshape(2, 5) * 7) % 29


@dataclasses.dataclass(frozen=True)
class UserConfig:
    """Not a SessaConfig: generate reads only vocab_size and max_len."""

    layer: SessaConfig
    vocab_size: int = 29
    max_len: int = 12


class UserDecoder(nn.Module):
    """A researcher's decoder: own embedding, two SessaLayer blocks, own norm and head, and its
    own cache layout ({"blocks": [layer cache, layer cache]})."""

    config: UserConfig

    def init_cache(self, batch_size, max_len):
        return {"blocks": [decoding.init_layer_cache(self.config.layer, batch_size, max_len) for _ in range(2)]}

    @nn.compact
    def __call__(self, tokens, *, cache=None, decode=False):
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.layer.d_model)(tokens)
        new = []
        for i in range(2):
            block = SessaLayer(cfg.layer, name=f"block_{i}")
            if cache is None:
                x = block(x)
            else:
                x, c = block(x, cache=cache["blocks"][i], decode=decode)
                new.append(c)
        logits = nn.Dense(cfg.vocab_size)(nn.LayerNorm()(x)).astype(jnp.float32)
        return logits if cache is None else (logits, {"blocks": new})


@pytest.fixture(scope="module")
def user_model():
    model = UserDecoder(UserConfig(LAYER))
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), PROMPT)


@pytest.fixture(scope="module")
def lm():
    model = SessaLM(LAYER.replace(vocab_size=29, n_layers=2))
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), PROMPT)


def greedy_by_recompute(model, params, prompt, n):
    """Oracle: the whole sequence through the model without a cache, one token at a time."""
    seq = np.asarray(prompt)
    apply = jax.jit(model.apply)  # one compile per length; run eagerly it took six times as long
    for _ in range(n):
        logits = apply(params, jnp.asarray(seq))
        seq = np.concatenate([seq, np.asarray(jnp.argmax(logits[:, -1], -1))[:, None]], axis=1)
    return seq


def test_generate_with_user_model(user_model):
    model, params = user_model
    out = decoding.generate(model, params, PROMPT, 6, jax.random.PRNGKey(3), temperature=0)
    assert out.shape == (2, 11) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), greedy_by_recompute(model, params, PROMPT, 6))
    sampled = decoding.generate(model, params, PROMPT, 6, jax.random.key(3), temperature=1.0, top_k=5)
    assert sampled.shape == (2, 11) and bool(jnp.all((sampled >= 0) & (sampled < 29)))


def test_generate_names_the_missing_interface(user_model):
    model, params = user_model

    class NoCache(UserDecoder):  # the cache layout is unknown without init_cache or a SessaConfig
        init_cache = None

    with pytest.raises(
        TypeError,
        match=r"NoCache has no init_cache\(batch_size, max_len\) method and its config is a "
        r"UserConfig, not a SessaConfig",
    ):
        decoding.generate(NoCache(model.config), params, PROMPT, 2, jax.random.PRNGKey(0))

    class Bare:
        config = object()

    with pytest.raises(TypeError, match=r"Bare lacks the decoding interface .* missing: \['vocab_size', 'max_len'\]"):
        decoding.generate(Bare(), params, PROMPT, 2, jax.random.PRNGKey(0))


def test_generate_takes_numpy_scalars(lm):
    model, params = lm
    rng = jax.random.PRNGKey(1)
    ref = decoding.generate(model, params, PROMPT, 3, rng, temperature=0.7, top_k=4, top_p=0.9)
    got = decoding.generate(
        model, params, PROMPT, np.int64(3), rng, temperature=np.float32(0.7), top_k=np.int32(4), top_p=np.float64(0.9)
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.parametrize(
    "bad,msg",
    [
        (0, r"rng must be a JAX PRNG key, not the integer 0; pass a key such as jax\.random\.key\(0\)"),
        (np.int64(7), r"not the integer 7"),
        (jnp.zeros((2,), jnp.float32), r"got float32 of shape \(2,\)"),
        (jax.random.split(jax.random.key(0), 2), r"a single PRNG key; got keys of shape \(2,\)"),
        ("seed", r"rng must be a JAX PRNG key"),
    ],
)
def test_generate_rng_errors(lm, bad, msg):
    model, params = lm
    with pytest.raises(ValueError, match=msg):
        decoding.generate(model, params, PROMPT, 2, bad)


@pytest.mark.parametrize("bad", [True, 2.0, np.float32(2), 0])
def test_generate_max_new_tokens_errors(lm, bad):
    model, params = lm
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer >= 1"):
        decoding.generate(model, params, PROMPT, bad, jax.random.PRNGKey(0))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("layers", [1, 3])
def test_lm_cache_with_wrong_layer_count(scan, layers):
    cfg = LAYER.replace(vocab_size=29, n_layers=2, scan_layers=scan)
    model = SessaLM(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), PROMPT)  # op by op the init took the test's time
    wrong = decoding.init_cache(cfg.replace(n_layers=layers), 2)
    with pytest.raises(ValueError, match=r"(a list of 2; got %d entries|leading axis of 2; got leading axes)" % layers):
        model.apply(params, PROMPT, cache=wrong)
    with pytest.raises(ValueError, match=r"init_cache\(config, batch_size\) for this config \(n_layers=2"):
        decoding.prefill(model, params, PROMPT, wrong)


@pytest.mark.parametrize("scan", [False, True])
def test_lm_cache_of_the_other_layout(scan):
    """A stacked cache into a per-layer model and the reverse (scan_layers differs)."""
    cfg = LAYER.replace(vocab_size=29, n_layers=2, scan_layers=scan)
    model = SessaLM(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), PROMPT)
    other = decoding.init_cache(cfg.replace(scan_layers=not scan), 2)
    with pytest.raises(ValueError, match=r"scan_layers=%s\)" % scan):
        model.apply(params, PROMPT, cache=other)


def test_cache_helpers_name_a_non_cache():
    with pytest.raises(
        ValueError,
        match=r"expected a decode cache built by sessa_jax\.decoding\.init_cache .* "
        r"got list of 0 entries",
    ):
        decoding.cache_index([])


@pytest.mark.parametrize("shape,axis", [((1, 0, 4), "time"), ((0, 3, 4), "batch"), ((1, 3, 0), "width")])
@pytest.mark.parametrize("method", ["dense", "blocked", "auto"])
def test_feedback_solve_empty_axis(shape, axis, method):
    z = jnp.zeros(shape)
    with pytest.raises(
        ValueError,
        match=r"feedback_solve: q_b, k_b, f have shape %s, an empty %s axis"
        % (str(shape).replace("(", r"\(").replace(")", r"\)"), axis),
    ):
        ops.feedback_solve(z, z, jnp.zeros(shape[:2]), z, method=method)


@pytest.mark.parametrize("name", ["q_b", "k_b", "gamma", "f"])
@pytest.mark.parametrize("method", ["dense", "blocked"])
def test_feedback_solve_integer_inputs(name, method):
    args = dict(q_b=jnp.ones((1, 3, 4)), k_b=jnp.ones((1, 3, 4)), gamma=jnp.full((1, 3), 0.5), f=jnp.ones((1, 3, 4)))
    args[name] = args[name].astype(jnp.int32)
    with pytest.raises(
        ValueError, match=r"feedback_solve: %s has dtype int32; .* %s\.astype\(jnp\.float32\)" % (name, name)
    ):
        ops.feedback_solve(args["q_b"], args["k_b"], args["gamma"], args["f"], method=method)
