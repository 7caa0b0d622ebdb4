"""Runs tests/support/sharding_worker.py in a fresh interpreter with XLA_FLAGS set before JAX starts."""

import json
import os
import subprocess
import sys

from tests.support.processes import TIMEOUT_S

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "sharding_worker.py")
REPO = os.path.dirname(os.path.dirname(HERE))


def worker_env(devices: int) -> dict:
    """This environment with ``devices`` fake CPU devices and the checkout first on PYTHONPATH."""
    # The inherited flags stay (make test's optimization level, which the workers' compiles take
    # most of their time in); the device count comes last, so it wins over any inherited one.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    return env


def start(args, devices: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, WORKER, *map(str, args)],
        env=worker_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, out_path, timeout: float = TIMEOUT_S) -> dict:
    log, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{log[-4000:]}"
    with open(out_path) as f:
        return json.load(f)
