"""Writing files so that a crash never leaves them half-written: :func:`atomic_write`, :func:`atomic_write_text`."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = True) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then ``os.replace`` it onto ``path``.

    On any failure the temporary file is removed and ``path`` keeps its previous content.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable; not possible on every platform/filesystem
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` with :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
