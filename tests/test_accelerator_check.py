"""scripts/accelerator_check.sh without a device: every step's dry run (DRY_RUN=1) names files
and flags that exist, and its inline solve-paths script runs at toy size on CPU, so that a
device session spends its minutes measuring."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "accelerator_check.sh"
STEPS = ["report", "tests", "solve", "paths", "kernels", "layer", "quick", "compile", "all"]


def _dry_run(step: str, out: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    return subprocess.run(["bash", str(SCRIPT), step, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def _flags(path: pathlib.Path) -> set[str]:
    """The long options a script's argparse declares."""
    return set(re.findall(r'add_argument\(\s*"(--[A-Za-z0-9-]+)"', path.read_text()))


@pytest.mark.parametrize("step", [s for s in STEPS if s not in ("paths", "all")])
def test_dry_run_names_existing_scripts_and_flags(step, tmp_path):
    result = _dry_run(step, tmp_path)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ timeout")]
    assert commands, result.stdout
    for line in commands:
        words = line.split()
        scripts = [w for w in words if w.endswith(".py")]
        assert scripts, line
        for name in scripts:
            assert (ROOT / name).is_file(), f"{name} (in: {line})"
        if words[4:6] == ["-m", "pytest"]:
            continue
        target = ROOT / scripts[0]
        used = {w for w in words if w.startswith("--")}
        assert used <= _flags(target), f"{target.name} has no {sorted(used - _flags(target))}"


def test_paths_step_runs_its_inline_script_on_cpu(tmp_path):
    """The inline script at toy size: four paths (segment ids None / one segment, loop / the
    static schedule), each with s and gradients equal to the first path's to float32 rounding."""
    result = _dry_run("paths", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| None") or line.startswith("| one")]
    assert len(rows) == 4, result.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "xla"
        assert float(cells[3]) > 0
        assert float(cells[4]) <= 1e-5 and float(cells[5]) <= 1e-5, row
    assert (tmp_path / "paths.txt").read_text().count("| None") == 2


def test_unknown_step_is_refused(tmp_path):
    result = _dry_run("everything", tmp_path)
    assert result.returncode == 2 and "unknown step" in result.stderr
