"""scripts/readme_check.py: passes on a matching transcript, fails on drift and on a failing command."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("readme_check", os.path.join(REPO, "scripts", "readme_check.py"))
readme_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_check)


def _readme(tmp_path, body: str) -> str:
    path = tmp_path / "README.md"
    path.write_text(f"# t\n\n<!-- readme-check -->\n```console\n{body}\n```\n\n```console\n$ false\n```\n")
    return str(path)


def test_match_drift_update_and_failure(tmp_path):
    ok = _readme(
        tmp_path, "$ printf 'step 1 | 12.5k tok/s | eta 1m02s\\nloss 0.5\\n'\nstep 1 | 3.1k tok/s | eta 0m09s\nloss 0.5"
    )
    assert readme_check.main(["--readme", ok]) == 0  # rates and ETAs are masked; the unmarked block is not run
    drift = _readme(tmp_path, "$ echo 'loss 0.5'\nloss 0.6")
    assert readme_check.main(["--readme", drift]) == 1
    assert readme_check.main(["--readme", drift, "--update"]) == 0
    assert "loss 0.5\n```" in open(drift).read() and readme_check.main(["--readme", drift]) == 0
    with pytest.raises(SystemExit, match="exited 3; a README command must run as written"):
        readme_check.main(["--readme", _readme(tmp_path, "$ exit 3")])


def test_references_name_what_exists(tmp_path):
    """Commands and links that name a missing module, script, config, file or heading are reported;
    existing ones, what a command writes, and comments are not."""
    (tmp_path / "other.md").write_text("# Other page\n\n## Memory planning: `scripts/aot_memory.py`\n")
    good = tmp_path / "good.md"
    good.write_text(
        "# t\n\nSee [other](other.md#memory-planning-scriptsaot_memorypy), [top](#t) and "
        "[the paper](https://arxiv.org/abs/2604.18580).\n\n"
        "```bash\n.venv/bin/python -m benchmarks.feedback_solve --T 512\n"
        "python -m sessa_jax.data.text prepare --output /tmp/new_shards\n"
        "python scripts/aot_memory.py --config=paper_125m   # a comment naming scripts/missing.py\n"
        "# python -m benchmarks.not_a_module  (a comment line)\n"
        "python scripts/compare_models.py --out results/new.jsonl\n```\n"
    )
    assert readme_check.references(str(good)) == []
    bad = tmp_path / "README.md"
    bad.write_text(
        "# t\n\n[gone](missing.md) [wrong anchor](other.md#no-such-heading)\n\n"
        "```console\n$ python -m benchmarks.not_a_module\n$ python scripts/not_a_script.py\n"
        "$ sessa-train --config=not_a_config\n```\n"
    )
    problems = "\n".join(readme_check.references(str(bad)))
    for expected in (
        "benchmarks.not_a_module`: no such module",
        "scripts/not_a_script.py: no such file",
        "--config=not_a_config: no such run config",
        "`sessa-train` called bare",
        "link to missing.md: no such file",
        "link to other.md#no-such-heading: no heading",
    ):
        assert expected in problems, (expected, problems)
    assert readme_check.main(["--readme", str(bad), "--refs"]) == 1


def test_anchors_follow_github():
    lines = [
        "# Results: memory tails",
        "```",
        "# not a heading",
        "```",
        "## Measured: `--scale cpu`",
        "## The Mamba-style baseline's scan",
        "## Notes",
        "## Notes",
    ]
    assert readme_check.anchors(lines) == {
        "results-memory-tails",
        "measured---scale-cpu",
        "the-mamba-style-baselines-scan",
        "notes",
        "notes-1",
    }
