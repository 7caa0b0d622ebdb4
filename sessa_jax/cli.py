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

# The package's modules are imported inside the entry points, after the arguments are checked
# (see above): importing them here would import JAX first.

TRAIN_USAGE = """usage: sessa-train [--config=NAME_OR_PATH] [--workdir=DIR] [--config.SECTION.KEY=VALUE ...]
       sessa-train tokenizer train --input PATH --output MODEL [--vocab_size N] [--model_type bpe|unigram]

Trains a model from a run config and resumes automatically from WORKDIR's latest checkpoint.

    sessa-train                                         # config default -> runs/default
    sessa-train --config=tiny --config.train.steps=30 --workdir=runs/tiny
    sessa-train --config=mqar --config.model.kind=mamba --config.model.match_params=True

NAME is a shipped config (sessa_jax/configs: tiny, default, mqar, symbol_soup, text_bytes,
text_bpe, paper_125m, paper_350m) or a path to a .py file defining get_config().
Overrides are --config.<section>.<key>=<value> (or with a space: --config.train.steps 30);
bad keys or values fail before compiling.
`tokenizer train` fits a sentencepiece model on a local corpus, offline.
"""


class _Help(Exception):
    pass


def parse_train_args(argv: list[str]) -> tuple[str, str | None, list[str]]:
    """(config name or path, workdir or None, ["--config.KEY=VALUE", ...]) of ``sessa-train``'s
    arguments. Each flag takes its value after ``=`` or as the next argument, as absl and
    argparse users type it: ``--config tiny``, ``--config.train.steps 30``, ``--workdir runs/x``.
    Raises ValueError naming a bad argument; ``-h``/``--help`` raises ``_Help``."""
    config, workdir, overrides = "default", None, []
    args = list(argv)
    i = 0

    def value_of(flag: str) -> str:
        nonlocal i
        if i + 1 >= len(args) or args[i + 1].startswith("--"):
            raise ValueError(f"{flag} needs a value: {flag}=VALUE or {flag} VALUE (see --help)")
        i += 1
        return args[i]

    while i < len(args):
        arg = args[i]
        name, sep, value = arg.partition("=")
        if arg in ("-h", "--help"):
            raise _Help
        elif name == "--config":
            config = value if sep else value_of(name)
        elif name.startswith("--config."):
            overrides.append(arg if sep else f"{name}={value_of(name)}")
        elif name == "--workdir":
            workdir = value if sep else value_of(name)
        else:
            raise ValueError(
                f"unknown argument {arg!r}; expected --config=NAME, --config.KEY=VALUE, --workdir=DIR "
                f"(or the same with a space before the value) or `tokenizer train ...` (see --help)"
            )
        i += 1
    if config == "":
        raise ValueError("--config is empty; pass a shipped config name (e.g. tiny) or a .py path")
    return config, workdir, overrides


def train_main(argv: list[str] | None = None) -> int:
    """``sessa-train``: exit status 0 when the run reached ``train.steps`` (or stopped on SIGTERM)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tokenizer"]:
        from sessa_jax.data.tokenizers import main as tokenizer_main

        return tokenizer_main(argv[1:])
    from sessa_jax.train.config import ConfigError, load_config

    try:
        config, workdir, overrides = parse_train_args(argv)
    except _Help:
        print(TRAIN_USAGE)
        return 0
    except ValueError as e:
        print(f"sessa-train: {e}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from sessa_jax.train.loop import train  # imports JAX: after the config is known to be good
    from sessa_jax.train.run_errors import RunLog, report_failure

    name = config.rsplit("/", 1)[-1].removesuffix(".py")
    workdir = workdir or f"runs/{name}"
    log = RunLog(workdir)
    try:
        result = train(cfg, workdir, log=log)
    except Exception as e:  # noqa: BLE001 - one `error:` line naming the cause; the traceback goes to the log
        return report_failure(e, workdir, sys.stderr, _process_index())
    finally:
        log.close()
    if result.step != cfg.train.steps and not result.interrupted:
        print(f"error: stopped at step {result.step} of train.steps={cfg.train.steps}", file=sys.stderr)
    return 0 if result.step == cfg.train.steps or result.interrupted else 1


def _process_index() -> int:
    try:
        import jax

        return jax.process_index()
    except Exception:  # noqa: BLE001 - a failed distributed start-up: report as process 0
        return 0


def sample_main(argv: list[str] | None = None) -> int:
    """``sessa-sample``: see ``sessa_jax.sample``."""
    from sessa_jax.sample import main

    return main(argv)


def eval_main(argv: list[str] | None = None) -> int:
    """``sessa-eval``: see ``sessa_jax.train.evaluate``."""
    from sessa_jax.train.evaluate import main

    return main(argv)
