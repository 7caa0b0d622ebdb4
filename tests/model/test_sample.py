"""sessa_jax.sample: the recompute sampler of the baselines rejects bad settings like generate."""

import jax
import jax.numpy as jnp
import pytest

from sessa_jax import SessaConfig, SessaLM
from sessa_jax.sample import generate_by_recompute

MODEL = SessaLM(SessaConfig(d_model=16, n_heads=2, vocab_size=11, n_layers=1, chunk_size=4), kind="transformer")
PROMPT = jnp.zeros((1, 3), jnp.int32)
PARAMS = MODEL.init(jax.random.PRNGKey(0), PROMPT)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-1.0), r"temperature must be a finite number >= 0 \(0 = greedy\); got -1.0"),
        (dict(top_k=0), r"top_k must be in \[1, vocab_size=11\]; got 0"),
        (dict(top_k=12), r"top_k must be in \[1, vocab_size=11\]; got 12"),
        (dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1; got 0"),
    ],
)
def test_recompute_sampler_rejects_bad_settings(kwargs, message):
    kwargs = {"max_new_tokens": 2, **kwargs}
    n = kwargs.pop("max_new_tokens")
    with pytest.raises(ValueError, match=message):
        generate_by_recompute(MODEL, PARAMS, PROMPT, n, jax.random.PRNGKey(0), **kwargs)
