"""The run directory: one run at a time (a lock), writable checkpoints, a readable metrics log.

``claim(workdir)`` is called before anything is trained: it takes an exclusive ``flock``
on ``WORKDIR/.lock`` (the kernel drops it when the process dies, even by SIGKILL, so a
stale lock never blocks), checks that ``checkpoints/`` accepts a file, and repairs a
``metrics.jsonl`` whose last line was torn by a kill mid-write. Process 0 only: other
processes of a multi-host run share its workdir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

import jax

LOCK_NAME = ".lock"


class WorkdirError(RuntimeError):
    """The workdir cannot be used by this run; the message names the path and the fix."""


class WorkdirLock:
    """An exclusive, non-blocking ``flock`` on ``WORKDIR/.lock`` holding the owner's pid."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd = None

    def acquire(self) -> "WorkdirLock":
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"cannot create {self.path!r} ({e.strerror or e}); the workdir must be writable: "
                               f"fix its permissions or pass another --workdir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirError(
                f"workdir {os.path.dirname(self.path)!r} is in use by another run (pid {holder}, lock {self.path}); "
                f"wait for it to finish or stop it, or pass another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_writable(directory: str) -> None:
    """WorkdirError naming ``directory`` unless a file can be created in it, or (when it does
    not exist yet) in the directory that will hold it. Creates nothing that stays.

    Orbax would otherwise only fail at the first save, minutes in, with a TimeoutError.
    """
    target = directory
    while not os.path.exists(target) and os.path.dirname(target) != target:
        target = os.path.dirname(target)
    probe = os.path.join(target, f".write-test-{os.getpid()}")
    try:
        if not os.path.isdir(target):
            raise NotADirectoryError(f"{target!r} is not a directory")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(
            f"cannot write checkpoints to {directory!r} ({e.strerror or e}); fix its permissions or free space, "
            f"or pass another --workdir"
        ) from None


def repair_metrics(workdir: str, log=print) -> None:
    """Drops a torn last line of ``WORKDIR/metrics.jsonl`` (a kill mid-write) with a warning.

    A damaged line anywhere else is not a torn write: WorkdirError names the file and line.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    body = [ln for ln in lines if ln.strip()]
    for i, line in enumerate(body):
        try:
            json.loads(line)
        except ValueError:
            if i != len(body) - 1:
                raise WorkdirError(
                    f"{path} line {i + 1} is not JSON ({line[:80]!r}); fix or delete that line (or the file) "
                    f"and run again"
                ) from None
            log(f"warning: dropped a torn last line of {path} ({line[:80]!r}), left by an interrupted run")
            with open(path, "wb") as f:
                f.writelines(ln + b"\n" for ln in body[:-1])


def has_record(workdir: str, step: int, key: str) -> bool:
    """Whether ``WORKDIR/metrics.jsonl`` already holds a record of ``step`` with ``key``."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if record.get("step") == step and key in record:
                    return True
    return False


def claim(workdir: str, log=print) -> WorkdirLock:
    """Locks ``workdir`` (WorkdirError if another run holds it), checks ``checkpoints/`` is
    writable and repairs a torn metrics log. Release the returned lock when the run ends."""
    lock = WorkdirLock(workdir).acquire()
    try:
        check_writable(os.path.join(workdir, "checkpoints"))
        repair_metrics(workdir, log)
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def claimed(workdir: str, log=print):
    """``claim`` on process 0 for the duration of the block (other processes share its workdir)."""
    lock = claim(workdir, log) if jax.process_index() == 0 else None
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
