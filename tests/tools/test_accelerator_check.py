"""scripts/accelerator_check.sh without a device: every step's dry run (DRY_RUN=1) names files,
benchmarks and flags that exist, and its solve-paths benchmark runs at toy size on CPU, so that a
device session spends its minutes measuring."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.support.processes import TIMEOUT_S

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "accelerator_check.sh"
STEPS = ["report", "tests", "solve", "paths", "kernels", "layer", "quick", "compile", "all"]


def _dry_run(step: str, out: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    return subprocess.run(
        ["bash", str(SCRIPT), step, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


FLAG = r'add_argument\(\s*"(--[A-Za-z0-9-]+)"'


def _flags(path: pathlib.Path) -> set[str]:
    """The long options a script's argparse declares, itself or through the shared harness's
    argument helpers (``harness.add_..._args``) it calls."""
    text = path.read_text()
    flags = set(re.findall(FLAG, text))
    harness = (ROOT / "benchmarks" / "harness.py").read_text()
    for helper in re.findall(r"harness\.(add_\w+)\(", text):
        body = harness.split(f"\ndef {helper}(", 1)[1].split("\ndef ", 1)[0]
        flags |= set(re.findall(FLAG, body))
    return flags


def _target(words: list[str]) -> pathlib.Path | None:
    """The script a command runs: benchmarks/NAME.py for ``-m benchmarks.NAME``, or its first .py
    word (None for ``-m pytest``, whose .py words are test files)."""
    if "-m" in words:
        module = words[words.index("-m") + 1]
        if module == "pytest":
            return None
        assert module.startswith("benchmarks."), module
        return ROOT / "benchmarks" / f"{module.split('.', 1)[1]}.py"
    scripts = [w for w in words if w.endswith(".py")]
    assert scripts, words
    return ROOT / scripts[0]


@pytest.mark.parametrize("step", [s for s in STEPS if s not in ("paths", "all")])
def test_dry_run_names_existing_scripts_and_flags(step, tmp_path):
    result = _dry_run(step, tmp_path)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ timeout")]
    assert commands, result.stdout
    for line in commands:
        words = line.split()
        for name in [w for w in words if w.endswith(".py")]:
            assert (ROOT / name).is_file(), f"{name} (in: {line})"
        target = _target(words)
        if target is None:
            continue
        assert target.is_file(), f"{target} (in: {line})"
        used = {w for w in words if w.startswith("--")}
        assert used <= _flags(target), f"{target.name} has no {sorted(used - _flags(target))}"


def test_paths_step_runs_the_solve_paths_benchmark_on_cpu(tmp_path):
    """benchmarks.solve_paths at toy size: four paths (segment ids None / one segment, loop / the
    static schedule), each with s (float32) equal to the first path's to float32 rounding and the
    gradients to their output rounding: dq, dk and df come back in the inputs' bf16, where a
    float32 rounding difference can round an entry to the neighbouring bf16 value, one spacing
    (at most 2^-7 of the entry) away. (The paths' float32 gradients agree to 1e-12 under x64 in
    tests/ops/test_recursive_fast_paths.py.)"""
    result = _dry_run("paths", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| None") or line.startswith("| one")]
    assert len(rows) == 4, result.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "xla"
        assert float(cells[3]) > 0
        assert float(cells[4]) <= 1e-5 and float(cells[5]) <= 2.0**-7, row
    assert (tmp_path / "paths.txt").read_text().count("| None") == 2


def test_unknown_step_is_refused(tmp_path):
    result = _dry_run("everything", tmp_path)
    assert result.returncode == 2 and "unknown step" in result.stderr
