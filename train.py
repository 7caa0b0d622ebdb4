"""Train a model from a run config (same as the ``sessa-train`` console script).

    python train.py                                     # config default -> runs/default
    python train.py --config=tiny --config.train.steps=30 --workdir=runs/tiny
    python train.py --config=mqar --config.model.kind=mamba --config.model.match_params=True

Overrides are ``--config.<section>.<key>=<value>`` (or ``--config.<section>.<key> <value>``);
bad keys or values fail before compiling. A failure after start-up ends in one ``error:``
line; its full traceback is in ``WORKDIR/train.log``.
"""

import sys

from sessa_jax.cli import train_main

main = train_main  # the name tests and scripts import

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
