"""Documents of a text corpus: the files under a path (or the built-in corpus, the Python
standard library's own sources), each read whole as one document of bytes."""

from __future__ import annotations

import os
import sysconfig

import numpy as np


class UnreadableFileError(ValueError):
    """A corpus file exists but cannot be read; names it and the fix."""


def builtin_corpus_dir() -> str:
    """Directory of the Python standard library sources: text that exists everywhere."""
    return sysconfig.get_paths()["stdlib"]


def list_files(path: str, builtin_suffix: str = ".py") -> list[str]:
    """Sorted readable files under ``path``; clear errors for missing or empty paths."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"data.text.path={path!r} does not exist; pass an existing text file or directory, "
            f"or set data.text.path='' to use the built-in corpus (Python standard library sources)"
        )
    if os.path.isfile(path):
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")) and d != "site-packages")
        files.extend(os.path.join(root, n) for n in names if not n.startswith("."))
    files.sort()
    if not files:
        raise FileNotFoundError(f"data.text.path={path!r} is a directory with no files; point it at text files")
    return files


def iter_documents(path: str, max_bytes: int):
    """Each file is one document of bytes (uint8 array), read one file at a time.

    A user ``path`` is read whole: more than ``max_bytes`` bytes of text (0 = no cap) is a
    ValueError naming the size and the keys to change. The built-in corpus (``path`` "")
    is capped instead: its first ``max_bytes`` bytes in sorted file order.
    """
    builtin = not path
    files = list_files(builtin_corpus_dir() if builtin else path)
    if builtin:
        files = [f for f in files if f.endswith(".py")]
    total, any_read = 0, False
    for i, name in enumerate(files):
        try:
            with open(name, "rb") as f:
                data = f.read(max_bytes - total if builtin and max_bytes else -1)
        except OSError as e:  # skipping it would train on a corpus other than the one named
            raise UnreadableFileError(
                f"data.text.path={path!r}: {name!r} cannot be read ({e.strerror or e}); fix its permissions "
                f"or remove it from the corpus directory (every file under the path is read)"
            ) from e
        if not data or b"\0" in data[:1024]:  # empty or binary
            continue
        any_read = True
        yield np.frombuffer(data, np.uint8)
        total += len(data)
        if builtin and max_bytes and total >= max_bytes:
            break
        if max_bytes and total > max_bytes:
            rest = sum(os.path.getsize(f) for f in files[i + 1 :])
            raise ValueError(
                f"data.text.path={path!r} holds more than data.text.max_bytes={max_bytes} bytes of text ({total} "
                f"in its first {i + 1} of {len(files)} files, up to {total + rest} in all); reading part of it "
                f"would drop the rest silently. Set data.text.max_bytes=0 (no cap) or >= {total + rest}, or pack "
                f"it once with `python -m sessa_jax.data.text prepare --input {path} --output DIR --seq_len T` "
                f"and set data.text.arrayrecord_dir=DIR"
            )
    if not any_read:
        raise ValueError(f"data.text.path={path!r} holds no readable text files (all empty or binary)")


def read_documents(path: str, max_bytes: int) -> list[np.ndarray]:
    """All documents of ``iter_documents`` in a list."""
    return list(iter_documents(path, max_bytes))
