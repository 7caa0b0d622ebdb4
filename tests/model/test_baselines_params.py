"""Matched comparisons: with model.match_params, every kind has the parameter count of Sessa."""

import pytest

from sessa_jax.baselines import count_params
from sessa_jax.train.config import load_config, model_config


@pytest.mark.parametrize("name", ["paper_125m", "paper_350m", "mqar"])
def test_matched_presets_are_within_5_percent(name):
    counts = {}
    for kind in ("sessa", "transformer", "mamba"):
        config = model_config(load_config(name, [f"model.kind={kind}", "model.match_params=True"]))
        counts[kind] = count_params(config, kind)
    ref = counts["sessa"]
    assert all(abs(c - ref) <= 0.05 * ref for c in counts.values()), counts


def test_without_matching_the_kinds_differ():
    """The check above can fail: the same width gives different counts per kind."""
    config = model_config(load_config("mqar"))
    counts = {k: count_params(config, k) for k in ("sessa", "transformer", "mamba")}
    assert abs(counts["transformer"] - counts["sessa"]) > 0.05 * counts["sessa"], counts
