"""Module fixtures built once per test session, also when pytest-xdist runs it in several worker
processes: the first worker to arrive builds the result in the session's shared temporary root,
the others wait on its lock and reuse it."""

from __future__ import annotations

import fcntl
import json
import pathlib
import shutil
from typing import Callable


def built_once(tmp_path_factory, name: str, build: Callable[[pathlib.Path], dict]) -> tuple[pathlib.Path, dict]:
    """(directory, record) of ``build(directory)``, run once per session for ``name``.

    ``build`` writes its files into the empty directory it gets and returns a JSON-serialisable
    record, which every caller gets back (read from the directory). The directory lives under the
    temporary root that xdist's workers share (the parent of each worker's own base temp); a
    build that raises leaves no record, so the next caller builds again and sees the error too."""
    root = tmp_path_factory.getbasetemp()
    if root.name.startswith("popen-gw"):  # an xdist worker: its siblings share the parent
        root = root.parent
    folder, record = root / f"shared-{name}", root / f"shared-{name}.json"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not record.exists():
                shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
                folder.mkdir()
                result = build(folder)
                record.write_text(json.dumps(result))
            return folder, json.loads(record.read_text())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
