"""How ``sessa-train`` ends a run that failed after start-up: one ``error:`` line.

Problems of the user's data, devices, workdir, disk or checkpoints (``USER_ERRORS`` and any
``OSError``, also when wrapped by another library's exception) end in one line that names
the path or value and the fix; the full traceback goes to the run's log file
(``WORKDIR/train.log``, or a file in the temporary directory when the workdir cannot take
it) and the line says where. Anything else is a bug: its traceback is printed as well.
"""

from __future__ import annotations

import errno
import os
import tempfile
import traceback

from sessa_jax.sharding import MeshError
from sessa_jax.train.checkpoint import CheckpointError
from sessa_jax.train.config import ConfigError
from sessa_jax.train.loop import NonFiniteError
from sessa_jax.train.resume_guard import ResumeError
from sessa_jax.train.workdir import WorkdirError

# ValueError: data errors (an eval split smaller than a batch, shard seq_len mismatch);
# FileNotFoundError/PermissionError: missing corpus or ArrayRecord directory, unreadable files.
USER_ERRORS = (
    ConfigError,
    MeshError,
    ResumeError,
    CheckpointError,
    WorkdirError,
    NonFiniteError,
    FileNotFoundError,
    PermissionError,
    ValueError,
)

LOG_NAME = "train.log"

_FULL = (errno.ENOSPC, errno.EDQUOT)


def _chain(e: BaseException):
    """``e`` and the exceptions it was raised from or while handling, outermost first."""
    seen = []
    while e is not None and all(e is not s for s in seen):
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def os_error_of(e: BaseException) -> OSError | None:
    """The operating system's error behind ``e`` (``e`` itself or one in its chain) that
    carries an errno; None when there is none."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno is not None:
            return x
    return None


def _path_of(e: OSError) -> str | None:
    return os.fsdecode(e.filename) if e.filename is not None else None


def describe(e: BaseException) -> str:
    """One line: what failed, naming the path or value, and the fix."""
    os_err = os_error_of(e)
    text = " ".join(str(e).split())
    if os_err is None and any("No space left on device" in str(x) for x in _chain(e)):
        return (
            f"no space left on device ({text[:300]}); free space on the disk holding the workdir or pass "
            f"a --workdir on another disk, then run again (it resumes from the last checkpoint)"
        )
    if os_err is None:
        if isinstance(e, USER_ERRORS):
            return text
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}"
    path = _path_of(os_err)
    where = f" {path!r}" if path else ""
    reason = os_err.strerror or str(os_err)
    if os_err.errno in _FULL:
        return (
            f"no space left to write{where} ({reason}); free space on that disk or pass a --workdir on "
            f"another disk, then run again (it resumes from the last complete checkpoint)"
        )
    if os_err.errno == errno.EROFS:
        return f"cannot write{where}: read-only file system; pass a --workdir on a writable disk"
    if os_err.errno in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied for{where} ({reason}); make it writable for this user (the run creates "
            f"files there) or pass another --workdir"
        )
    if os_err is e and os_err.strerror is None:  # raised by this package with its own message
        return text
    if path and isinstance(os_err, FileNotFoundError):
        return f"{path!r} does not exist ({reason}); check the path in the config or --workdir"
    return f"{reason}{':' if where else ''}{where} ({type(os_err).__name__}); fix that path or pass another --workdir"


def is_user_error(e: BaseException) -> bool:
    """A problem of the run's inputs or environment (no traceback on the console), not a bug."""
    return (
        isinstance(e, USER_ERRORS)
        or os_error_of(e) is not None
        or any("No space left on device" in str(x) for x in _chain(e))
    )


def log_name(process_index: int = 0) -> str:
    """``train.log`` for process 0, ``train.process<i>.log`` for the others of a multi-host run."""
    return LOG_NAME if process_index == 0 else f"train.process{process_index}.log"


class RunLog:
    """The run's log function: prints each line and appends it to ``WORKDIR/train.log``
    once the workdir exists. Logging never stops a run: a failed write (a full disk)
    turns the file off and the failure surfaces where the run writes its own files."""

    def __init__(self, workdir: str, echo=print):
        self.path, self.echo, self._f, self._off = os.path.join(workdir, LOG_NAME), echo, None, False

    def __call__(self, line: str) -> None:
        self.echo(line)
        if self._off:
            return
        try:
            if self._f is None:
                if not os.path.isdir(os.path.dirname(self.path) or "."):
                    return
                self._f = open(self.path, "a")
            self._f.write(f"{line}\n")
            self._f.flush()
        except OSError:
            self._off = True

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None


def save_traceback(e: BaseException, workdir: str | None, process_index: int = 0) -> str | None:
    """Appends ``e``'s full traceback to the run's log file (``log_name``, where the workdir
    exists and accepts it), else to a new file in the temporary directory; returns the path
    written, or None when neither could be written."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    candidates = []
    if workdir and os.path.isdir(workdir):
        candidates.append(os.path.join(workdir, log_name(process_index)))
    candidates.append(None)
    for path in candidates:
        try:
            if path is None:
                fd, path = tempfile.mkstemp(prefix="sessa-train-", suffix=".log")
                f = os.fdopen(fd, "w")
            else:
                f = open(path, "a")
            with f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


def report_failure(e: BaseException, workdir: str | None, stderr, process_index: int = 0) -> int:
    """Writes the failure of a started run to ``stderr``: a bug's traceback, then one
    ``error:`` line naming the cause, the fix and the file holding the full traceback.
    Returns the exit status (2: the run's inputs or environment, 1: a bug)."""
    user = is_user_error(e)
    if not user:
        traceback.print_exception(type(e), e, e.__traceback__, file=stderr)
    saved = save_traceback(e, workdir, process_index)
    tail = f" (full traceback in {saved})" if saved else " (the traceback could not be saved: no writable place)"
    if not user:
        tail = f"; this looks like a bug in sessa-jax, please report it with the traceback{tail}"
    if saved is None and user:
        traceback.print_exception(type(e), e, e.__traceback__, file=stderr)
    print(f"error: {describe(e)}{tail}", file=stderr)
    return 2 if user else 1
