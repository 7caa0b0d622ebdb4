"""Helpers for tests that run this checkout in another process: waiting on a run, building the wheel."""

import glob
import os
import subprocess
import sys
import time

# Every timeout on another process in the tests (a training run, a worker on fake devices, a
# wheel build, a notebook kernel) only guards against a hang: it is far above what any of them
# takes on a 2-core machine loaded several times over, so that a slow machine never fails a
# test. SESSA_TEST_TIMEOUT_S sets it (seconds), e.g. lower to find a hang sooner.
TIMEOUT_S = float(os.environ.get("SESSA_TEST_TIMEOUT_S", "3600"))


def wait_for(proc: subprocess.Popen, predicate, timeout: float = TIMEOUT_S, poll_s: float = 0.05) -> None:
    """Polls ``predicate()`` until it is true; fails if ``proc`` ends first or ``timeout`` seconds pass."""
    t0 = time.monotonic()
    while not predicate():
        assert proc.poll() is None, f"run ended early:\n{proc.stdout.read()}"
        assert time.monotonic() - t0 < timeout, "timed out waiting for the run"
        time.sleep(poll_s)


def build_wheel(repo: str, out_dir) -> str:
    """Builds ``repo``'s wheel offline (no dependencies, no build isolation) into ``out_dir``; returns its path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out_dir), repo],
        check=True,
        capture_output=True,
        timeout=TIMEOUT_S,
    )
    (whl,) = glob.glob(str(out_dir) + "/*.whl")
    return whl
