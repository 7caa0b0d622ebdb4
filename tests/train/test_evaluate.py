"""Evaluation over the whole held-out split: closed-form metrics of a uniform-over-bytes model."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.data import EVAL, make_dataset
from sessa_jax.data.pipeline import make_source
from sessa_jax.train.config import load_config
from sessa_jax.train.evaluate import evaluate, make_eval_step, summarize, token_bytes_for

V = 264


def uniform_bytes_apply(params, inputs, segment_ids=None, positions=None, **kw):
    """A 'model' whose next-byte distribution is uniform over the 256 byte values."""
    row = jnp.where(jnp.arange(V) < 256, 0.0, -1e9)
    return jnp.broadcast_to(row, (*inputs.shape, V))


@pytest.fixture
def text_cfg(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):  # printable bytes (no NUL, so not "binary"); lengths leave a partial last batch
        (tmp_path / f"doc{i}.txt").write_bytes(bytes(rng.integers(32, 127, 700 + 131 * i).tolist()))
    return load_config(
        "text_bytes",
        [
            f"data.text.path={tmp_path}",
            "data.seq_len=32",
            "data.batch_size=4",
            "data.text.eval_fraction=0.3",
            "model.max_len=32",
            "model.chunk_size=32",
        ],
    )


def test_uniform_bytes_give_8_bits_per_byte_over_the_whole_split(text_cfg):
    src = make_source(text_cfg.data, EVAL)
    rows = len(src)
    assert rows % text_cfg.data.batch_size, "the fixture must leave a partial last batch"
    want_tokens = sum(float(src[i]["weights"].sum()) for i in range(rows))  # every held-out target
    data = make_dataset(text_cfg.data, EVAL, process_index=0, process_count=1)
    m = evaluate(
        None, make_eval_step(uniform_bytes_apply), data, text_cfg.data.batch_size, token_bytes_for(text_cfg.data, V)
    )
    assert m["eval_tokens"] == want_tokens
    # Closed forms, up to each batch's float32 sum of its per-token losses, whose error bound is
    # (terms - 1) float32 eps relative (the compiler picks the order: it differs between XLA's
    # optimization levels); batches are added in float64.
    rtol = text_cfg.data.batch_size * text_cfg.data.seq_len * float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(m["eval_bits_per_byte"], 8.0, rtol=rtol)  # log2(256)
    np.testing.assert_allclose(m["eval_bits_per_token"], 8.0, rtol=rtol)
    np.testing.assert_allclose(m["eval_loss"], math.log(256), rtol=rtol)
    np.testing.assert_allclose(m["eval_perplexity"], 256.0, rtol=10 * rtol)  # exp: rtol x log(256)
    # num_batches caps the pass: one batch reads batch_size rows' worth of targets
    one = evaluate(
        None,
        make_eval_step(uniform_bytes_apply),
        data,
        text_cfg.data.batch_size,
        token_bytes_for(text_cfg.data, V),
        num_batches=1,
    )
    assert one["eval_tokens"] == sum(float(src[i]["weights"].sum()) for i in range(text_cfg.data.batch_size))


def test_summarize_bits_per_byte_counts_bytes_not_tokens():
    # 10 tokens of 3 bytes each at 6 nats/token: 6/ln2 bits/token, a third of that per byte.
    m = summarize(dict(loss_sum=60.0, correct_sum=4.0, weight_sum=10.0, bytes_sum=30.0), per_byte=True)
    np.testing.assert_allclose(m["eval_bits_per_token"], 6 / math.log(2))
    np.testing.assert_allclose(m["eval_bits_per_byte"], 2 / math.log(2))
    assert m["eval_accuracy"] == 0.4
    assert "eval_bits_per_byte" not in summarize(
        dict(loss_sum=1.0, correct_sum=0.0, weight_sum=1.0, bytes_sum=0.0), per_byte=False
    )


def test_synthetic_tasks_need_a_batch_count():
    from sessa_jax.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.eval_batches=0 evaluates the whole held-out split"):
        load_config("tiny", ["train.eval_batches=0"])
