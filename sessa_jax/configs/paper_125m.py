"""The paper's 125M size (GPT-2 small widths); ``model.match_params`` widens baselines to match.

python train.py --config=configs/paper_125m.py --config.data.text.arrayrecord_dir=SHARDS
"""

from sessa_jax.configs._paper import paper_config


def get_config():
    return paper_config("125m")
