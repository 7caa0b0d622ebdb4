"""Runs tests/_sharding_worker.py in a fresh interpreter with XLA_FLAGS set before JAX starts."""

import json
import os
import subprocess
import sys

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sharding_worker.py")


def worker_env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(WORKER)), env.get("PYTHONPATH", "")])
    return env


def start(args, devices: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=worker_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, out_path, timeout: float = 1800) -> dict:
    log, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{log[-4000:]}"
    with open(out_path) as f:
        return json.load(f)
