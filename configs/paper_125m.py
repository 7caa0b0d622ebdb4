"""The paper's 125M size (GPT-2 small widths); ``model.match_params`` widens baselines to match.

    python train.py --config=configs/paper_125m.py --config.data.text.arrayrecord_dir=SHARDS
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _paper import paper_config  # noqa: E402


def get_config():
    return paper_config("125m")
