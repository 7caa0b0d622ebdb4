"""Train a model from a run config; resumes automatically from WORKDIR's latest checkpoint.

    python train.py                                     # configs/default.py -> runs/default
    python train.py --config=configs/tiny.py --config.train.steps=30 --workdir=runs/tiny
    python train.py --config=mqar --config.model.kind=mamba --config.model.match_params=True

Overrides are ``--config.<section>.<key>=<value>``; bad keys or values fail before compiling.
"""

import sys

from sessa_jax.train.config import ConfigError, load_config


def main(argv: list[str]) -> int:
    config, workdir, overrides = "default", None, []
    for arg in argv:
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            overrides.append(arg)
        elif arg.startswith("--workdir="):
            workdir = arg.split("=", 1)[1]
        elif arg in ("-h", "--help"):
            print(__doc__)
            return 0
        else:
            print(f"train.py: unknown argument {arg!r}; expected --config=, --config.KEY=VALUE or --workdir=")
            return 2
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from sessa_jax.train.loop import train  # imports JAX: after the config is known to be good
    from sessa_jax.train.run_errors import USER_ERRORS

    name = config.rsplit("/", 1)[-1].removesuffix(".py")
    try:
        result = train(cfg, workdir or f"runs/{name}")
    except USER_ERRORS as e:  # bad data, mesh, workdir or checkpoint found after start-up: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.step != cfg.train.steps and not result.interrupted:
        print(f"error: stopped at step {result.step} of train.steps={cfg.train.steps}", file=sys.stderr)
    return 0 if result.step == cfg.train.steps or result.interrupted else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
