"""Writing files so that a crash never leaves them half-written: :func:`atomic_write`, :func:`atomic_write_text`."""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from typing import Any, Callable, Iterator

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = True) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then ``os.replace`` it onto ``path``.

    On any failure the temporary file is removed and ``path`` keeps its previous content. Ctrl-C
    during the write is held back until the file is in place (a ``KeyboardInterrupt`` raised inside a
    library's writer, e.g. ``torch.save``, can surface as an unrelated error from its cleanup).
    """
    with _sigint_deferred():
        _atomic_write(path, write, binary)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold SIGINT back inside the block and raise ``KeyboardInterrupt`` after it if one arrived.

    Only the main thread can install signal handlers; elsewhere (and under a non-default handler
    someone else installed) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _atomic_write(path: str, write: Callable[[Any], None], binary: bool) -> None:
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
