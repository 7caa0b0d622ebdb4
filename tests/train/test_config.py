"""Run configs: every shipped config loads; bad keys, types and combinations fail with clear messages."""

import os
import subprocess
import sys

import pytest

from sessa_jax.train.config import CONFIG_DIR, ConfigError, load_config, model_config, resolve
from tests.support.processes import TIMEOUT_S

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


def test_shipped_configs_exist_and_validate():
    assert {"tiny", "default", "mqar", "symbol_soup", "text_bytes", "paper_125m", "paper_350m"} <= set(SHIPPED)
    for name in SHIPPED:
        cfg = load_config(name)
        assert model_config(cfg, match=False).vocab_size >= 1


def test_overrides_are_typed():
    cfg = load_config(
        "tiny",
        [
            "train.steps=7",
            "--config.optim.lr=1",
            "model.n_kv_heads=1",
            "model.dtype=bfloat16",
            "data.text.path=/tmp",
            "model.rope=False",
        ],
    )
    assert cfg.train.steps == 7 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.n_kv_heads == 1 and cfg.model.dtype == "bfloat16" and cfg.model.rope is False
    # chunk_size takes "auto" (the default) or an integer
    assert load_config("tiny", ["model.chunk_size=auto"]).model.chunk_size == "auto"
    assert load_config("tiny", ["model.chunk_size=48"]).model.chunk_size == 48
    # so does leaf_size
    assert load_config("tiny", []).model.leaf_size == "auto"
    assert load_config("tiny", ["model.leaf_size=1024"]).model.leaf_size == 1024


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=3"], r"unknown config key 'train.stepz': train has no 'stepz'; did you mean 'train.steps'\?"),
        (["modle.kind=mamba"], r"unknown config key 'modle.kind'.*did you mean 'model'"),
        (["train.steps=abc"], r"config key 'train.steps' expects int, got 'abc'"),
        (["train.steps=2.5"], r"config key 'train.steps' expects int, got '2.5'"),
        (["train"], r"override 'train' must look like key=value"),
        (["model=3"], r"config key 'model' is a section"),
        (["model.kind=rnn"], r"model.kind='rnn' is unknown; choose one of \('sessa', 'transformer', 'mamba'\)"),
        (["data.task=imagenet"], r"data.task='imagenet' is unknown"),
        (["optim.warmup_steps=30"], r"optim.warmup_steps=30 must be < train.steps=30"),
        (["optim.grad_accum=3"], r"data.batch_size=8 must be divisible by optim.grad_accum"),
        (["data.seq_len=8"], r"data.seq_len=8 is too short for num_kv_pairs=4"),
        (["model.vocab_size=16"], r"model.vocab_size=16 is smaller than data.task='mqar' needs \(32\)"),
        (["model.n_heads=3"], r"model.d_model=32 must be divisible by n_heads=3"),
        (["model.gamma_max=1.0"], r"model.gamma_max must satisfy 0 < gamma_max < 1"),
        (["model.dtype=int8"], r"model.dtype='int8' is not a float dtype name"),
        (["data.task=symbol_soup"], r"data.seq_len=32 is shorter than data.symbol_soup.max_tokens=600"),
        (
            ["data.task=symbol_soup", "data.symbol_soup.tsv_dir=/no/such/dir"],
            r"tsv_dir='/no/such/dir' is not a directory",
        ),
        (["data.task=text", "data.text.path=/no/such/corpus"], r"data.text.path='/no/such/corpus' does not exist"),
        (["optim.lr=-1"], r"optim: need lr > 0 \(got -1.0\)"),
        (["train.steps=0"], r"'train.steps' must be an integer >= 1; got 0"),
        (["model.chunk_size=0"], r"model.chunk_size must be 'auto' or an integer >= 1 \(e.g. 128\); got 0"),
        (["model.chunk_size=big"], r"model.chunk_size must be 'auto' or an integer >= 1 \(e.g. 128\); got 'big'"),
        (["model.leaf_size=0"], r"model.leaf_size must be 'auto' or an integer >= 1 .*; got 0"),
    ],
)
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"config 'tinny' not found.*known configs: \[.*'tiny'"):
        load_config("tinny")


def test_resolve_fills_derived_values():
    r = resolve(load_config("tiny"))
    assert r.model.vocab_size == 32 and r.model.match_params is False


def test_cli_reports_config_errors_before_compiling():
    out = subprocess.run(
        [sys.executable, "train.py", "--config=tiny", "--config.train.stepz=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert out.returncode == 2
    assert "config error: unknown config key 'train.stepz'" in out.stderr
    out = subprocess.run(
        [sys.executable, "train.py", "--bogus"], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert out.returncode == 2 and "unknown argument '--bogus'" in out.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["checkpoint.keep=0"], r"'checkpoint.keep' must be an integer >= 1; got 0"),
        (["optim.b2=1.0"], r"optim.b2 must lie in \[0, 1\); got 1.0"),
        (["optim.b1=-0.1"], r"optim.b1 must lie in \[0, 1\); got -0.1"),
        (["optim.eps=0.0"], r"optim.eps must be > 0; got 0.0"),
        (["data.seed=-1"], r"'data.seed' must be an integer >= 0; got -1"),
        (
            [
                "data.task=symbol_soup",
                "data.seq_len=64",
                "data.symbol_soup.max_tokens=64",
                "data.symbol_soup.min_tokens=40",
                "data.symbol_soup.num_train=30",
            ],
            r"data.symbol_soup.num_train=30 must be a positive multiple of 20",
        ),
        (["data.text.max_bytes=-5"], r"'data.text.max_bytes' must be an integer >= 0; got -5"),
    ],
)
def test_out_of_range_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_unknown_keys_set_in_a_config_file_are_rejected(tmp_path):
    """A typo in a config file adds a new ConfigDict key that nothing reads; it must not pass silently."""
    path = tmp_path / "typo.py"
    path.write_text(
        "from sessa_jax.train.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.train.stepz = 5\n"
        "    return c\n"
    )
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'.*did you mean 'train.steps'\?"):
        load_config(str(path))
    path.write_text(
        "from sessa_jax.train.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.data.update(seqlen=128)\n"
        "    c.extra = dict(a=1)\n"
        "    return c\n"
    )
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['data.seqlen', 'extra.a'\]"):
        load_config(str(path))


def test_test_aids_are_not_run_config_keys():
    """Pausing after each step is a test aid (tests/support/slow_train.py), not a run setting."""
    with pytest.raises(ConfigError, match=r"unknown config key 'train.step_delay_s'"):
        load_config("tiny", ["train.step_delay_s=0.1"])


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=inf",
        "optim.lr=1e999",
        "optim.lr=nan",
        "optim.weight_decay=inf",
        "optim.clip_norm=1e999",
        "optim.eps=inf",
        "optim.min_lr_ratio=nan",
    ],
)
def test_non_finite_optimizer_numbers_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key} must be a finite number; got"):
        load_config("tiny", [override])


def test_flag_values_may_follow_a_space_as_absl_users_type_them():
    from sessa_jax.cli import parse_train_args

    spaced = parse_train_args(
        [
            "--config",
            "tiny",
            "--config.train.steps",
            "30",
            "--workdir",
            "runs/x",
            "--config.model.n_layers=3",
            "--config.optim.lr",
            "-1e-3",
        ]
    )
    assert spaced == (
        "tiny",
        "runs/x",
        ["--config.train.steps=30", "--config.model.n_layers=3", "--config.optim.lr=-1e-3"],
    )
    assert parse_train_args(["--config=tiny", "--workdir=w"]) == ("tiny", "w", [])
    for bad, message in [
        (["--config"], "--config needs a value"),
        (["--config.train.steps", "--workdir=w"], "--config.train.steps needs a value"),
        (["--bogus"], "unknown argument '--bogus'"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_train_args(bad)


def test_cli_takes_space_separated_values_before_compiling():
    out = subprocess.run(
        [sys.executable, "train.py", "--config", "tiny", "--config.train.stepz", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert out.returncode == 2 and "config error: unknown config key 'train.stepz'" in out.stderr, out.stderr
