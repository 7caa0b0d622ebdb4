"""The run directory: one run at a time (a lock), writable checkpoints, a readable metrics log.

A workdir is a local (or mounted) directory or a ``gs://bucket/path`` URL. ``normalize``
turns it into the one spelling every other module uses (an absolute local path, or the URL)
and refuses any other URL scheme before anything is written: orbax writes arrays through
tensorstore's ``gcs`` driver for ``gs://`` only. Files of the run go through ``join``,
``exists``, ``read_bytes``, ``write_bytes`` and ``open_append`` below, which use the local
filesystem or ``etils.epath`` (gcsfs) for a bucket.

``claim(workdir)`` is called before anything is trained. On a local workdir it takes an
exclusive ``flock`` on ``WORKDIR/.lock`` (the kernel drops it when the process dies, even by
SIGKILL, so a stale lock never blocks) and checks that ``checkpoints/`` accepts a file. A
bucket has no ``flock``: ``BucketLock`` creates the ``.lock`` object only if it does not exist
(a generation precondition), keeps it fresh from a thread, and takes over a lock whose
holder is dead (same host, no such pid) or silent for ``lease_s``. Either way a
``metrics.jsonl`` whose last line was torn by a kill mid-write is repaired. Process 0 only:
other processes of a multi-host run share its workdir.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import posixpath
import re
import socket
import threading
import time
import uuid

import jax

LOCK_NAME = ".lock"
# A bucket lock not refreshed for this long belongs to a dead run (its holder refreshes it
# every LEASE_S / 4 seconds); a run restarted on the holder's own host does not wait for it.
LEASE_S = 120.0
# A remote metrics log is re-uploaded at most this often between explicit syncs (GCS objects
# cannot be appended to: each upload rewrites the whole object).
SYNC_S = 60.0

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_ONE_SLASH = re.compile(r"^(gs|s3|az|hf|gcs|https?|file):/(?!/)", re.IGNORECASE)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")


class WorkdirError(RuntimeError):
    """The workdir cannot be used by this run; the message names the path and the fix."""


# ----------------------------------------------------------------------------------------
# Paths: one spelling per workdir, and the few file operations the run needs.


def normalize(workdir: str) -> str:
    """The workdir as every module uses it: an absolute local path, or ``gs://BUCKET[/PATH]``.

    ``file://PATH`` is the local PATH. Any other URL scheme, a ``gs://`` URL without a valid
    bucket name, a URL with one slash (``gs:/b``, which would become a local directory
    ``gs:``) and a ``gs://`` workdir without the packages that reach GCS raise WorkdirError
    naming the value and the fix. Nothing is created.
    """
    workdir = os.fspath(workdir)
    if not workdir:
        raise WorkdirError("the workdir is empty; pass --workdir=DIR (a local directory or gs://BUCKET/PATH)")
    m = _URL.match(workdir)
    if m is None:
        if _ONE_SLASH.match(workdir):
            raise WorkdirError(
                f"workdir {workdir!r} looks like a URL with a single slash after the scheme (it would "
                f"create a local directory {workdir.split('/')[0]!r}); write it with two, e.g. "
                f"gs://BUCKET/PATH"
            )
        return os.path.abspath(os.path.expanduser(workdir))
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file":
        return os.path.abspath("/" + rest.lstrip("/"))
    if scheme != "gs":
        raise WorkdirError(
            f"workdir {workdir!r}: {scheme}:// is not supported (orbax writes checkpoint arrays through tensorstore, "
            f"which reaches buckets for gs:// only); use gs://BUCKET/PATH, a local directory, or a directory where "
            f"the bucket is mounted (e.g. by its FUSE driver)"
        )
    bucket, _, path = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise WorkdirError(
            f"workdir {workdir!r}: {bucket!r} is not a GCS bucket name (lowercase letters, digits, "
            f"'-', '_' and '.'); write gs://BUCKET/PATH"
        )
    missing = [p for p in ("gcsfs", "google.cloud.storage") if not _importable(p)]
    if missing:
        raise WorkdirError(
            f"workdir {workdir!r} is on Google Cloud Storage, which needs {' and '.join(missing)}: "
            f"pip install 'sessa-jax[gcs]'"
        )
    path = posixpath.normpath("/" + path).strip("/")
    return f"gs://{bucket}/{path}" if path else f"gs://{bucket}"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def is_remote(path: str) -> bool:
    """Whether ``path`` (normalized) is a bucket URL rather than a local path."""
    return "://" in os.fspath(path)


def join(path: str, *parts: str) -> str:
    """``os.path.join`` for local paths, ``/``-joined for URLs."""
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def _epath(path: str):
    from etils import epath

    return epath.Path(path)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        return _epath(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file (a bucket object is replaced in one upload)."""
    if is_remote(path):
        _epath(path).write_bytes(data)
        return
    with open(path, "wb") as f:
        f.write(data)


def rename(src: str, dst: str) -> None:
    """Renames a file or directory (a bucket prefix is copied object by object, then deleted)."""
    if is_remote(src):
        _epath(src).rename(dst)
    else:
        os.replace(src, dst)


def local_dir(workdir: str) -> str:
    """A local directory for what must live on a local disk (W&B files, profiler traces, a
    tokenizer model): the workdir itself when it is local; for a bucket
    ``$XDG_CACHE_HOME/sessa_jax/gs/BUCKET/PATH`` (``~/.cache`` by default)."""
    if not is_remote(workdir):
        return workdir
    scheme, rest = workdir.split("://", 1)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "sessa_jax", scheme, *rest.split("/"))


class _RemoteAppend:
    """A text file opened for appending in a bucket: lines are kept in memory and the whole
    object is uploaded by ``sync`` (and by ``flush`` at most every ``sync_s`` seconds), unless
    this process has lost the workdir's lock."""

    def __init__(self, path: str, sync_s: float = SYNC_S):
        self.path, self.sync_s = path, sync_s
        self._text = read_bytes(path).decode() if exists(path) else ""
        self._dirty, self._last = False, time.monotonic()

    def write(self, text: str) -> None:
        self._text += text
        self._dirty = True

    def flush(self) -> None:
        if time.monotonic() - self._last >= self.sync_s:
            self.sync()

    def sync(self) -> None:
        lock = _HELD.get(posixpath.dirname(self.path))
        if lock is not None and lock.lost:  # another run owns the workdir now: leave its file alone
            return
        if self._dirty:
            write_bytes(self.path, self._text.encode())
            self._dirty, self._last = False, time.monotonic()

    def close(self) -> None:
        self.sync()


def open_append(path: str):
    """A text file object for appending lines to ``path`` with ``write``, ``flush``, ``sync``
    (make everything written so far durable: for a bucket, upload it) and ``close``."""
    if is_remote(path):
        return _RemoteAppend(path)
    f = open(path, "a")
    f.sync = f.flush
    return f


# ----------------------------------------------------------------------------------------
# Locks.


class WorkdirLock:
    """An exclusive, non-blocking ``flock`` on ``WORKDIR/.lock`` holding the owner's pid."""

    def __init__(self, workdir: str, log=print):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd = None

    def acquire(self) -> "WorkdirLock":
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(
                f"cannot create {self.path!r} ({e.strerror or e}); the workdir must be writable: "
                f"fix its permissions or pass another --workdir"
            ) from None
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

    def check(self) -> None:
        """Nothing to check: the kernel holds a ``flock`` until the process ends."""

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class BucketLock:
    """The lock of a ``gs://`` workdir: the object ``WORKDIR/.lock`` holding its holder's host,
    pid and a random token, created only if absent and replaced only at the generation this
    lock last saw (GCS preconditions make both atomic).

    A thread rewrites the object every ``lease_s / 4`` seconds. Another run takes the lock
    over only when the holder is dead: on the same host with no such pid, or not refreshed
    for ``lease_s`` seconds (judged by the bucket's ``updated`` time and this host's clock).
    If the object is replaced or deleted behind the holder's back, ``check`` raises.
    """

    def __init__(self, workdir: str, log=print, lease_s: float = LEASE_S, clock=time.time):
        self.url = join(workdir, LOCK_NAME)
        self.bucket, _, self.name = self.url[len("gs://") :].partition("/")
        self.log, self.lease_s, self.clock = log, lease_s, clock
        self.lost: str | None = None
        self._generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None  # one client (and credentials) for the lock's lifetime, used by one thread at a time
        self._body = json.dumps(dict(host=socket.gethostname(), pid=os.getpid(), token=uuid.uuid4().hex)).encode()

    def _bucket(self):
        if self._client is None:
            from google.cloud import storage

            self._client = storage.Client(project=None)  # object requests need no billing project
        return self._client.bucket(self.bucket)

    def _blob(self):
        return self._bucket().blob(self.name)

    def _put(self, if_generation_match: int) -> int:
        blob = self._blob()
        blob.upload_from_string(self._body, content_type="application/json", if_generation_match=if_generation_match)
        return blob.generation

    def acquire(self) -> "BucketLock":
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc

        try:
            for _ in range(3):  # a holder releasing between our two requests: try again
                try:
                    self._generation = self._put(if_generation_match=0)
                    break
                except gexc.PreconditionFailed:
                    self._generation = self._own_generation()  # a retried request whose first try landed
                    if self._generation is not None:
                        break
                    generation = self._stale_generation()
                    if generation is None:
                        continue
                    try:
                        self._generation = self._put(if_generation_match=generation)
                        break
                    except gexc.PreconditionFailed:  # another run took it over first
                        continue
            else:
                self._stale_generation()  # raises WorkdirError naming the holder
                raise WorkdirError(
                    f"could not take the lock {self.url}: it keeps changing; "
                    f"another run is starting in this workdir: pass another --workdir"
                )
        except gexc.NotFound as e:
            raise WorkdirError(
                f"cannot create {self.url}: the bucket gs://{self.bucket} does not exist or is not "
                f"visible ({_first_line(e)}); create it or pass another --workdir"
            ) from None
        except (gexc.Forbidden, gexc.Unauthorized) as e:
            raise WorkdirError(
                f"cannot create {self.url}: no permission ({_first_line(e)}); grant this account "
                f"storage.objects.create on gs://{self.bucket} or pass another --workdir"
            ) from None
        except auth_exc.DefaultCredentialsError as e:
            raise WorkdirError(
                f"cannot reach {self.url}: no Google Cloud credentials ({_first_line(e)}); run `gcloud "
                f"auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
            ) from None
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh_loop, name="sessa_jax workdir lock", daemon=True)
        self._thread.start()
        _HELD[os.path.dirname(self.url)] = self
        return self

    def _own_generation(self) -> int | None:
        """The lock object's generation if it holds this lock's body (token included), else None."""
        from google.api_core import exceptions as gexc

        blob = self._bucket().get_blob(self.name)
        try:
            if blob is not None and blob.download_as_bytes(if_generation_match=blob.generation) == self._body:
                return blob.generation
        except (gexc.PreconditionFailed, gexc.NotFound):  # replaced or deleted meanwhile: not ours
            pass
        return None

    def _stale_generation(self) -> int | None:
        """The generation of a dead holder's lock object (to replace), None if it is gone;
        WorkdirError naming the holder if it is alive."""
        blob = self._bucket().get_blob(self.name)
        if blob is None:
            return None
        try:
            holder = json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
            host, pid = str(holder["host"]), int(holder["pid"])
        except Exception:  # noqa: BLE001 - replaced meanwhile, or not a lock of ours: judged by its age alone
            host, pid = "?", -1
        age = self.clock() - blob.updated.timestamp()
        if host == socket.gethostname() and pid != os.getpid() and not _pid_alive(pid):
            self.log(f"taking over the lock {self.url} of a run that died (pid {pid} on this host)")
            return blob.generation
        if age > self.lease_s:
            self.log(f"taking over the lock {self.url} of pid {pid} on {host}: not refreshed for {age:.0f} s")
            return blob.generation
        raise WorkdirError(
            f"workdir {os.path.dirname(self.url)!r} is in use by another run (pid {pid} on host {host}, lock "
            f"{self.url}, refreshed {max(age, 0):.0f} s ago); wait for it to finish or stop it, or pass another "
            f"--workdir (a run that died on another host gives the lock up {self.lease_s:.0f} s after its last refresh)"
        )

    def _refresh_loop(self) -> None:
        from google.api_core import exceptions as gexc

        while not self._stop.wait(self.lease_s / 4):
            try:
                self._generation = self._put(if_generation_match=self._generation)
            except (gexc.PreconditionFailed, gexc.NotFound):
                try:
                    generation = self._own_generation()  # a retried refresh whose first try landed
                except Exception:  # noqa: BLE001 - cannot tell now: the next refresh asks again
                    continue
                if generation is not None:
                    self._generation = generation
                    continue
                self.lost = f"{self.url} was replaced or deleted by someone else"
                self.log(f"error: lost the workdir lock: {self.lost}; this run will stop at its next checkpoint")
                return
            except Exception:  # noqa: BLE001 - a transient network error: the next refresh tries again
                continue

    def check(self) -> None:
        """WorkdirError if the lock was lost (another run took over the workdir)."""
        if self.lost:
            raise WorkdirError(
                f"lost the lock of this workdir ({self.lost}): another run took it over; stopped "
                f"without saving so as not to overwrite its checkpoints"
            )

    def release(self) -> None:
        from google.api_core import exceptions as gexc

        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if _HELD.get(os.path.dirname(self.url)) is self:
            del _HELD[os.path.dirname(self.url)]
        if not self.lost:
            try:
                self._blob().delete(if_generation_match=self._generation)
            except (gexc.PreconditionFailed, gexc.NotFound):
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


_HELD: dict[str, BucketLock] = {}  # workdir -> the bucket lock this process holds on it


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def check_held(workdir: str) -> None:
    """WorkdirError if this process took ``workdir``'s bucket lock and has lost it since;
    called before every checkpoint save. Nothing for local workdirs or other processes."""
    lock = _HELD.get(workdir)
    if lock is not None:
        lock.check()


def make_lock(workdir: str, log=print):
    """The lock of a normalized workdir: ``BucketLock`` for a bucket, ``WorkdirLock`` otherwise."""
    return (BucketLock if is_remote(workdir) else WorkdirLock)(workdir, log=log)


# ----------------------------------------------------------------------------------------
# Checks and repairs before a run.


def check_writable(directory: str) -> None:
    """WorkdirError naming ``directory`` unless a file can be created in it, or (when it does
    not exist yet) in the directory that will hold it. Creates nothing that stays.

    Orbax would otherwise only fail at the first save, minutes in, with a TimeoutError.
    Local directories only: in a bucket, creating the lock object already proved it.
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
    path = join(workdir, "metrics.jsonl")
    if not exists(path):
        return
    lines = read_bytes(path).split(b"\n")
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
            write_bytes(path, b"".join(ln + b"\n" for ln in body[:-1]))


def has_record(workdir: str, step: int, key: str) -> bool:
    """Whether ``WORKDIR/metrics.jsonl`` already holds a record of ``step`` with ``key``."""
    path = join(workdir, "metrics.jsonl")
    if not exists(path):
        return False
    for line in read_bytes(path).decode().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("step") == step and key in record:
                return True
    return False


def claim(workdir: str, log=print):
    """Locks ``workdir`` (WorkdirError if another run holds it), checks ``checkpoints/`` is
    writable and repairs a torn metrics log. Release the returned lock when the run ends."""
    workdir = normalize(workdir)
    lock = make_lock(workdir, log).acquire()
    try:
        if not is_remote(workdir):
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
