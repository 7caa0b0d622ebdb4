"""The paper's 350M size (GPT-2 medium widths); ``model.match_params`` widens baselines to match."""

from sessa_jax.configs._paper import paper_config


def get_config():
    return paper_config("350m")
