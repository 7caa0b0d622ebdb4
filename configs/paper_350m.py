"""The paper's 350M size (GPT-2 medium widths); ``model.match_params`` widens baselines to match."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _paper import paper_config  # noqa: E402


def get_config():
    return paper_config("350m")
