"""Workdirs in a bucket: training into gs://, SIGKILL, bit-identical resume from the bucket,
the bucket lock, and URL schemes that are refused before anything is written.

Everything runs against a GCS emulator started here on 127.0.0.1 (tests/support/gcs_emulator.py);
nothing reaches a real network.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sessa_jax.train import checkpoint as ckpt
from sessa_jax.train import loop
from sessa_jax.train import workdir as wd
from sessa_jax.train.config import load_config
from sessa_jax.train.metrics import read_jsonl
from tests.support.gcs_emulator import UNSET, Emulator, EmulatorUnavailable, client_env
from tests.support.processes import TIMEOUT_S, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUCKET = "bucket"
STEPS, EVERY = 16, 4
ARGS = [f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "train.progress=False", "checkpoint.async_save=True"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator with an empty bucket, and this process's environment pointed at it."""
    for module in ("gcsfs", "google.cloud.storage"):  # looked up, not imported: the environment is not set yet
        if not wd._importable(module):
            pytest.skip(f"gs:// workdirs need {module}: pip install -e '.[test]'")
    root = str(tmp_path_factory.mktemp("gcs"))
    emulator = Emulator(root)
    try:
        emulator.start()
    except EmulatorUnavailable as e:
        pytest.skip(f"no GCS emulator: {e}")
    env = client_env(emulator.url, root)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in UNSET:
            mp.delenv(k, raising=False)
        import fsspec
        import gcsfs.core

        # fsspec read its FSSPEC_* settings at import, and gcsfs may have chosen its gRPC
        # variant at import: set both for this process explicitly.
        mp.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
        fsspec.filesystem("gcs").clear_instance_cache()
        emulator.create_bucket(BUCKET)
        try:
            yield dict(env=env, url=emulator.url)
        finally:
            emulator.stop()


def _objects(prefix: str) -> list[str]:
    from google.cloud import storage

    return [b.name for b in storage.Client().list_blobs(BUCKET, prefix=prefix)]


def _committed_steps(run: str) -> list[int]:
    """Steps of gs://bucket/RUN/checkpoints that orbax has finished (its commit marker)."""
    pattern = re.compile(rf"^{re.escape(run)}/checkpoints/(\d+)/commit_success\.txt$")
    return sorted(int(m.group(1)) for m in map(pattern.match, _objects(f"{run}/checkpoints/")) if m)


def _start(gcs, cwd, workdir, step_delay_s=None):
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    # Every program goes to the compilation cache, however fast it compiled: the test sees it in the bucket.
    env.update(
        gcs["env"],
        JAX_PLATFORMS="cpu",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
    )
    # tests/support/slow_train.py is train.py sleeping step_delay_s after each step.
    script = (
        [os.path.join(REPO, "train.py")]
        if step_delay_s is None
        else [os.path.join(REPO, "tests", "support", "slow_train.py"), str(step_delay_s)]
    )
    cmd = [sys.executable, *script, "--config=tiny", f"--workdir={workdir}", *[f"--config.{a}" for a in ARGS]]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(path):
    return {r["step"]: r["loss"] for r in read_jsonl(path) if "loss" in r}


def test_sigkill_then_resume_from_a_bucket_is_bit_identical(gcs, tmp_path):
    reference = str(tmp_path / "reference")
    loop.train(load_config("tiny", ARGS), reference, log=lambda s: None)

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    url = f"gs://{BUCKET}/run"
    proc = _start(gcs, cwd, url, step_delay_s=0.25)
    try:
        wait_for(proc, lambda: bool(_committed_steps("run")))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    n = _committed_steps("run")[-1]
    assert EVERY <= n < STEPS
    assert "run/.lock" in _objects("run/")  # left behind by the killed run
    data = json.loads(wd.read_bytes(f"{url}/checkpoints/{n}/data/process_0-of-1.json"))
    assert data == {"examples": n * 8, "batch_size": 8}  # data.batch_size=8 in tiny

    proc = _start(gcs, cwd, url)
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, out
    assert f"taking over the lock {url}/.lock of a run that died (pid" in out
    assert f"resumed from {url}/checkpoints at step {n}" in out
    assert f"workdir {url}" in out and f"compilation cache {url}/compilation_cache" in out
    assert _objects("run/compilation_cache/")  # JAX wrote its cache entries to the bucket
    assert os.listdir(cwd) == []  # nothing local: no ./gs: directory
    assert "run/.lock" not in _objects("run/")  # released at the end

    ref, got = _losses(os.path.join(reference, "metrics.jsonl")), _losses(f"{url}/metrics.jsonl")
    assert sorted(got) == list(range(1, STEPS + 1))  # no step missing or logged twice
    assert [got[s] for s in range(1, STEPS + 1)] == [ref[s] for s in range(1, STEPS + 1)]  # bit-identical
    ref_params = ckpt.restore_params(os.path.join(reference, "checkpoints"))
    got_params = ckpt.restore_params(f"{url}/checkpoints")
    for a, b in zip(jax.tree_util.tree_leaves(ref_params), jax.tree_util.tree_leaves(got_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(name.startswith("run/tb/") for name in _objects("run/tb/"))  # TensorBoard events in the bucket


def test_bucket_lock_refuses_a_live_holder_and_takes_over_a_silent_one(gcs):
    url = f"gs://{BUCKET}/locks"
    logs = []
    first = wd.BucketLock(url, log=logs.append, lease_s=0.4).acquire()
    try:
        with pytest.raises(wd.WorkdirError, match=rf"in use by another run \(pid {os.getpid()} on host "):
            wd.BucketLock(url).acquire()
        # A holder silent for longer than the lease is dead: seen from a clock far ahead.
        second = wd.BucketLock(url, log=logs.append, clock=lambda: time.time() + 3600).acquire()
        assert any("not refreshed for" in s for s in logs)
        _wait_lost(first)  # its next refresh finds the object replaced
        with pytest.raises(wd.WorkdirError, match="lost the lock"):
            first.check()
        first.release()  # does not delete the second holder's lock
        assert "locks/.lock" in _objects("locks/")
        second.release()
        assert "locks/.lock" not in _objects("locks/")
    finally:
        first.release()


def _wait_lost(lock):
    deadline = time.monotonic() + 120
    while lock.lost is None:
        assert time.monotonic() < deadline, "the holder never noticed that it lost the lock"
        time.sleep(0.05)


def test_a_run_whose_bucket_lock_was_replaced_saves_no_checkpoint(gcs):
    url = f"gs://{BUCKET}/replaced"
    with wd.BucketLock(url, lease_s=0.4) as lock:
        wd.check_held(url)  # held: saving is allowed
        log = wd.open_append(f"{url}/metrics.jsonl")
        log.write('{"step": 1}\n')
        log.sync()
        wd.write_bytes(f"{url}/.lock", b'{"host": "elsewhere", "pid": 1, "token": "y"}')  # another run's lock
        _wait_lost(lock)
        with pytest.raises(wd.WorkdirError, match="lost the lock of this workdir"):
            wd.check_held(url)  # what checkpoint.save calls before writing anything
        log.write('{"step": 2}\n')
        log.close()  # uploads nothing more: the workdir is another run's now
        assert wd.read_bytes(f"{url}/metrics.jsonl") == b'{"step": 1}\n'
    assert wd.read_bytes(f"{url}/.lock").startswith(b'{"host": "elsewhere"')  # release left the new lock alone


def test_bucket_lock_of_a_dead_pid_on_this_host_is_taken_at_once(gcs):
    url = f"gs://{BUCKET}/dead"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    wd.write_bytes(f"{url}/.lock", json.dumps(dict(host=socket.gethostname(), pid=dead_pid, token="x")).encode())
    logs = []
    with wd.BucketLock(url, log=logs.append):  # fresh (not past its lease), but its pid is gone
        assert logs == [f"taking over the lock {url}/.lock of a run that died (pid {dead_pid} on this host)"]
        holder = json.loads(wd.read_bytes(f"{url}/.lock"))
        assert holder["pid"] == os.getpid()


@pytest.mark.parametrize(
    "workdir, match",
    [
        ("s3://bucket/run", r"s3:// is not supported"),
        ("az://container/run", r"az:// is not supported"),
        ("gs:/bucket/run", r"single slash"),
        ("gs://Bucket/run", r"not a GCS bucket name"),
    ],
)
def test_an_unsupported_workdir_url_is_refused_before_anything_is_written(tmp_path, monkeypatch, workdir, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(wd.WorkdirError, match=match):
        loop.train(load_config("tiny", ARGS), workdir, log=lambda s: None)
    assert os.listdir(tmp_path) == []


def test_a_fitted_tokenizer_is_kept_in_the_bucket_and_read_from_a_local_copy(gcs):
    from sessa_jax.data.tokenizers import ensure_tokenizer

    cfg = load_config("text_bpe", ["data.text.max_bytes=100000", "data.tokenizer.vocab_size=400"])
    url = f"gs://{BUCKET}/tok"
    logs = []
    local = ensure_tokenizer(cfg, url, log=logs.append).data.tokenizer.path
    assert local == os.path.join(wd.local_dir(url), "tokenizer.model") and not wd.is_remote(local)
    with open(local, "rb") as f:
        fitted = f.read()
    assert wd.read_bytes(f"{url}/tokenizer.model") == fitted
    os.remove(local)  # a resume on another machine: no local copy
    assert ensure_tokenizer(cfg, url, log=logs.append).data.tokenizer.path == local
    with open(local, "rb") as f:
        assert f.read() == fitted
    assert sum("fitting a sentencepiece" in s for s in logs) == 1  # fitted once, then taken from the bucket


def test_renaming_a_step_in_a_bucket_moves_every_object_under_it(gcs):
    """What a restore does to a damaged step (``<step>.damaged``), on a bucket prefix."""
    root = f"gs://{BUCKET}/mv/checkpoints"
    for name in ("5/params/a", "5/params/d/b", "5/meta/c", "6/params/a"):
        wd.write_bytes(f"{root}/{name}", name.encode())
    wd.rename(f"{root}/5", f"{root}/5.damaged")
    assert sorted(_objects("mv/")) == [
        f"mv/checkpoints/5.damaged/{n}" for n in ("meta/c", "params/a", "params/d/b")
    ] + ["mv/checkpoints/6/params/a"]
    assert wd.read_bytes(f"{root}/5.damaged/params/d/b") == b"5/params/d/b"
    assert not wd.exists(f"{root}/5") and wd.isdir(f"{root}/5.damaged")


def test_a_missing_bucket_is_named_before_training(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(wd.WorkdirError, match=r"the bucket gs://no-such-bucket does not exist"):
        loop.train(load_config("tiny", ARGS), "gs://no-such-bucket/run", log=lambda s: None)
    assert os.listdir(tmp_path) == []


def test_a_lock_request_that_landed_but_whose_answer_was_lost_keeps_the_lock(gcs):
    """GCS clients retry a request whose answer was lost; the retry then fails its precondition
    on the lock's own write. The lock recognises its token instead of calling itself taken."""
    from google.cloud import storage

    url = f"gs://{BUCKET}/retried"
    lock = wd.BucketLock(url, lease_s=0.4)
    wd.write_bytes(f"{url}/.lock", lock._body)  # the create landed, its answer was lost
    with lock:
        landed = storage.Client().bucket(BUCKET).get_blob("retried/.lock").generation
        assert lock._generation == landed
        wd.write_bytes(f"{url}/.lock", lock._body)  # a refresh landed twice: the object moved past its generation
        moved = storage.Client().bucket(BUCKET).get_blob("retried/.lock").generation
        deadline = time.monotonic() + 120
        while lock.lost is None and lock._generation < moved:  # the next refresh finds its own body
            assert time.monotonic() < deadline, "the lock never refreshed"
            time.sleep(0.05)
        assert lock.lost is None
        lock.check()
    assert "retried/.lock" not in _objects("retried/")
