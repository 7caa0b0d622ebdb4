"""Helpers for tests that run this checkout in another process: waiting on a run, building the wheel."""

import glob
import subprocess
import sys
import time


def wait_for(proc: subprocess.Popen, predicate, timeout: float = 900, poll_s: float = 0.05) -> None:
    """Polls ``predicate()`` until it is true; fails if ``proc`` ends first or ``timeout`` seconds pass."""
    t0 = time.monotonic()
    while not predicate():
        assert proc.poll() is None, f"run ended early:\n{proc.stdout.read()}"
        assert time.monotonic() - t0 < timeout, "timed out waiting for the run"
        time.sleep(poll_s)


def build_wheel(repo: str, out_dir) -> str:
    """Builds ``repo``'s wheel offline (no dependencies, no build isolation) into ``out_dir``; returns its path."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(out_dir), repo], check=True, capture_output=True, timeout=1800)
    (whl,) = glob.glob(str(out_dir) + "/*.whl")
    return whl
