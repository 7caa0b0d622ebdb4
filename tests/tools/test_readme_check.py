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
    ok = _readme(tmp_path, "$ printf 'step 1 | 12.5k tok/s | eta 1m02s\\nloss 0.5\\n'\nstep 1 | 3.1k tok/s | eta 0m09s\nloss 0.5")
    assert readme_check.main(["--readme", ok]) == 0  # rates and ETAs are masked; the unmarked block is not run
    drift = _readme(tmp_path, "$ echo 'loss 0.5'\nloss 0.6")
    assert readme_check.main(["--readme", drift]) == 1
    assert readme_check.main(["--readme", drift, "--update"]) == 0
    assert "loss 0.5\n```" in open(drift).read() and readme_check.main(["--readme", drift]) == 0
    with pytest.raises(SystemExit, match="exited 3; a README command must run as written"):
        readme_check.main(["--readme", _readme(tmp_path, "$ exit 3")])
