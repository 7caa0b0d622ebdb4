"""``sessa-train`` with a pause after every training step, so that a test can signal a run mid-way.

    python tests/support/slow_train.py DELAY_S [sessa-train arguments ...]

The pause is a test aid, not a run setting: this script wraps the loop's compiled train step
(``sessa_jax.train.loop.make_train_step``) in one that waits for the step's results and then
sleeps ``DELAY_S`` seconds; everything else is ``sessa_jax.cli.train_main`` unchanged.
"""

import sys
import time

import jax

from sessa_jax.cli import train_main
from sessa_jax.train import loop


def slowed(make_train_step, delay_s: float):
    """``make_train_step`` whose step functions sleep ``delay_s`` after each step's results exist."""

    def make(*args, **kwargs):
        step_fn = make_train_step(*args, **kwargs)

        def slow_step(*step_args):
            out = jax.block_until_ready(step_fn(*step_args))
            time.sleep(delay_s)
            return out

        return slow_step

    return make


if __name__ == "__main__":
    delay_s = float(sys.argv[1])
    # The loop builds its step with this name; if it ever stops doing so, fail here, not slowly later.
    assert callable(getattr(loop, "make_train_step", None)), "sessa_jax.train.loop.make_train_step is gone"
    loop.make_train_step = slowed(loop.make_train_step, delay_s)
    sys.exit(train_main(sys.argv[2:]))
