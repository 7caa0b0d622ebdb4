"""The options are defined once and the platform table decides every default path."""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax import SessaConfig, options
from sessa_jax.ops import dispatch, platforms
from sessa_jax.ops.solve import precision
from sessa_jax.ops.solve.recursive import RecursivePlan


def test_each_tuple_is_its_literal():
    for alias, values in [
        (options.SolveMethod, options.SOLVE_METHODS),
        (options.AttentionMethod, options.ATTENTION_METHODS),
        (options.FeedbackPrecision, options.FEEDBACK_PRECISIONS),
        (options.Kernels, options.KERNELS),
        (options.LayerKind, options.LAYER_KINDS),
        (options.LrSchedule, options.LR_SCHEDULES),
        (options.TokenizerKind, options.TOKENIZER_KINDS),
    ]:
        assert typing.get_args(alias) == values
    assert set(options.ATTENTION_OF_SOLVE) == set(options.SOLVE_METHODS)
    assert set(options.ATTENTION_OF_SOLVE.values()) <= set(options.ATTENTION_METHODS)
    assert set(options.PRECISION_TIERS) | {"auto"} == set(options.FEEDBACK_PRECISIONS)


def test_the_users_of_an_option_share_its_tuple():
    from sessa_jax.baselines import KINDS
    from sessa_jax.train import config as run_config
    from sessa_jax.train import optimizer

    assert dispatch.METHODS is options.SOLVE_METHODS and precision.PRECISIONS is options.FEEDBACK_PRECISIONS
    assert KINDS is run_config.KINDS is options.LAYER_KINDS and optimizer.SCHEDULES is options.LR_SCHEDULES
    with pytest.raises(ValueError, match=r"solver='vendor' is unknown; choose one of \('dense', 'blocked'"):
        SessaConfig(d_model=8, n_heads=2, solver="vendor")


def test_attention_has_its_own_method_names():
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 2, 4))
    with pytest.raises(ValueError, match=r"unknown method 'recursive'; choose one of \('dense', 'blocked', 'vendor'"):
        dispatch.causal_attention(q, q, q, method="recursive")
    # On the CPU no vendor kernel applies: "vendor" and "auto" run the blocked path.
    blocked = dispatch.causal_attention(q, q, q, method="blocked")
    for method in ("vendor", "auto"):
        np.testing.assert_array_equal(dispatch.causal_attention(q, q, q, method=method), blocked)


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_defaults_read_the_table(platform, monkeypatch):
    """Change one platform's row and every resolver follows it."""
    paths = platforms.PLATFORM_PATHS[platform]
    assert dispatch.resolve_method("auto", platform) == paths.solve
    assert dispatch.resolve_attention("auto", platform) == paths.attention
    assert precision.auto_precision(platform, jnp.float32) == paths.float32_tier
    assert precision.auto_precision(platform, jnp.bfloat16) == paths.bfloat16_tier
    swapped = dataclasses.replace(
        paths,
        solve="dense",
        attention="dense",
        float32_tier="bfloat16",
        bfloat16_tier="float32",
        pallas="gpu" if paths.pallas == "tpu" else "tpu",
        interpret=not paths.interpret,
    )
    monkeypatch.setitem(platforms.PLATFORM_PATHS, platform, swapped)
    assert dispatch.resolve_method("auto", platform) == "dense"
    assert dispatch.resolve_attention("auto", platform) == "dense"
    assert precision.resolve_precision("auto", platform, jnp.float32) == "bfloat16"
    assert precision.resolve_precision("auto", platform, jnp.bfloat16) == "float32"
    plan = RecursivePlan.make(256, 128, 128, "float32", platform, 1.0, kernels="pallas")
    assert (plan.tpu_kernels, plan.gpu_kernels, plan.interpret) == (
        swapped.pallas == "tpu",
        swapped.pallas == "gpu",
        swapped.interpret,
    )
    assert not RecursivePlan.make(256, 128, 128, "float32", platform, 1.0).tpu_kernels  # "xla": no kernels
