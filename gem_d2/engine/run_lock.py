"""One run per OUTPUT_DIR at a time: an exclusive, non-blocking ``flock`` on ``OUTPUT_DIR/.run.lock``.

Two runs writing checkpoints, ``last_checkpoint``, metrics and ``config.yaml`` into one folder silently
mix their files (and a ``--resume`` then continues the wrong one). :class:`OutputDirLock` makes the
second run fail at once with an error naming the first (pid, host, command, start time) and the folder.

The lock is the kernel's ``flock`` on the open file, not the file's existence: it is released when the
holder releases it, exits, or is killed (even with SIGKILL), so a lock file left behind by a dead run
never blocks the next one. The file itself stays (removing it could let two runs lock two different
files); it holds the current holder's details as JSON, for people and for the error message.

``flock`` works between processes of one machine, and on network file systems whose lock manager
supports it (NFSv4, Lustre with ``flock``); take the lock in one process per run (the launcher on
machine rank 0), not in every worker. Only the Python standard library is used here.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import time
from datetime import datetime
from typing import Optional, Sequence

__all__ = ["LOCK_FILE_NAME", "OutputDirLock", "OutputDirLockedError", "read_lock_holder"]

LOCK_FILE_NAME = ".run.lock"


class OutputDirLockedError(RuntimeError):
    """Another live process holds the lock of this OUTPUT_DIR (the message names it and the folder)."""


def read_lock_holder(output_dir: str) -> Optional[dict]:
    """The details the last holder wrote into ``<output_dir>/.run.lock`` (None: no file or no details).

    The file may describe a run that has ended: only a failed :meth:`OutputDirLock.acquire` shows that
    the holder is alive.
    """
    try:
        with open(os.path.join(os.fspath(output_dir), LOCK_FILE_NAME), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _describe(info: Optional[dict]) -> str:
    if not info:
        return "a process that has not written its details yet"
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, running since {info.get('started', '?')} "
            f"(command: {info.get('command', '?')})")


class OutputDirLock:
    """Exclusive lock of one output folder; use as a context manager or call :meth:`acquire`/:meth:`release`.

    Args:
        output_dir: the run's OUTPUT_DIR (created if missing).
        command: the command line to record; default ``sys.argv`` (shell-quoted).

    ``acquire`` raises :class:`OutputDirLockedError` at once (it never waits) when another process holds
    the lock, even another lock object of the same process. On success it writes ``{"pid", "host",
    "started", "command", "output_dir"}`` into the lock file. ``release`` empties the file and unlocks;
    process exit or death unlocks too.
    """

    def __init__(self, output_dir: str, command: Optional[Sequence[str]] = None):
        if not output_dir:
            raise ValueError("OutputDirLock: output_dir is empty (set OUTPUT_DIR)")
        self.output_dir = os.path.abspath(os.fspath(output_dir))
        self.path = os.path.join(self.output_dir, LOCK_FILE_NAME)
        argv = list(sys.argv if command is None else command)
        self.command = shlex.join(str(a) for a in argv) if argv else os.path.basename(sys.executable)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> OutputDirLock:
        """Take the lock or raise :class:`OutputDirLockedError` naming the holder; returns ``self``."""
        import fcntl

        if self._fd is not None:
            raise RuntimeError(f"OutputDirLock({self.output_dir}) is already held by this object")
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = self._holder_details()
            raise OutputDirLockedError(
                f"OUTPUT_DIR {self.output_dir} is in use by another run: {_describe(holder)}. Only one run may "
                f"write into an output folder at a time (lock file {self.path}). Wait for that run to end or stop "
                f"it, or choose another OUTPUT_DIR.") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": self.command, "output_dir": self.output_dir}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info, indent=1) + "\n").encode("utf-8"), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing the only descriptor releases the lock
            raise
        self._fd = fd
        return self

    def _holder_details(self, wait_s: float = 1.0) -> Optional[dict]:
        """The holder's details; a holder that has just locked gets up to ``wait_s`` to write them."""
        deadline = time.monotonic() + wait_s
        while True:
            info = read_lock_holder(self.output_dir)
            if info or time.monotonic() >= deadline:
                return info
            time.sleep(0.05)

    def release(self) -> None:
        """Empty the lock file and unlock (no-op when not held)."""
        if self._fd is None:
            return
        import fcntl

        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
