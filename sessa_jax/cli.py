"""Console scripts: ``sessa-train``, ``sessa-sample`` and ``sessa-eval`` (installed by pip).

    sessa-train --config=tiny --workdir=runs/tiny --config.train.steps=30
    sessa-train tokenizer train --input corpus/ --output spm.model --vocab_size 4000
    sessa-sample --run runs/text_bytes --prompt "def "
    sessa-eval --run runs/tiny

Each parses its arguments here and calls library functions; JAX is imported only after
the arguments and config are known to be good, so mistakes fail in well under a second.
"""

from __future__ import annotations

import sys

TRAIN_USAGE = """usage: sessa-train [--config=NAME_OR_PATH] [--workdir=DIR] [--config.SECTION.KEY=VALUE ...]
       sessa-train tokenizer train --input PATH --output MODEL [--vocab_size N] [--model_type bpe|unigram]

Trains a model from a run config and resumes automatically from WORKDIR's latest checkpoint.

    sessa-train                                         # config default -> runs/default
    sessa-train --config=tiny --config.train.steps=30 --workdir=runs/tiny
    sessa-train --config=mqar --config.model.kind=mamba --config.model.match_params=True

NAME is a shipped config (sessa_jax/configs: tiny, default, mqar, symbol_soup, text_bytes,
text_bpe, paper_125m, paper_350m) or a path to a .py file defining get_config().
Overrides are --config.<section>.<key>=<value>; bad keys or values fail before compiling.
`tokenizer train` fits a sentencepiece model on a local corpus, offline.
"""


def train_main(argv: list[str] | None = None) -> int:
    """``sessa-train``: exit status 0 when the run reached ``train.steps`` (or stopped on SIGTERM)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tokenizer"]:
        from sessa_jax.data.tokenizers import main as tokenizer_main

        return tokenizer_main(argv[1:])
    from sessa_jax.train.config import ConfigError, load_config

    config, workdir, overrides = "default", None, []
    for arg in argv:
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            overrides.append(arg)
        elif arg.startswith("--workdir="):
            workdir = arg.split("=", 1)[1]
        elif arg in ("-h", "--help"):
            print(TRAIN_USAGE)
            return 0
        else:
            print(f"sessa-train: unknown argument {arg!r}; expected --config=, --config.KEY=VALUE, --workdir= "
                  f"or `tokenizer train ...` (see --help)", file=sys.stderr)
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


def sample_main(argv: list[str] | None = None) -> int:
    """``sessa-sample``: see ``sessa_jax.sample``."""
    from sessa_jax.sample import main

    return main(argv)


def eval_main(argv: list[str] | None = None) -> int:
    """``sessa-eval``: see ``sessa_jax.train.evaluate``."""
    from sessa_jax.train.evaluate import main

    return main(argv)
