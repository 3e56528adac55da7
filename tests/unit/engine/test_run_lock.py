"""OutputDirLock: one run per OUTPUT_DIR; the second fails at once naming the first; death releases the lock."""
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from gem_d2.engine import run_lock
from gem_d2.engine.run_lock import LOCK_FILE_NAME, OutputDirLock, OutputDirLockedError, read_lock_holder

# The child takes the lock through the package (importing gem_d2 takes a few seconds; WAIT_S covers it).
CHILD = r"""
import sys
from gem_d2.engine.run_lock import OutputDirLock
lock = OutputDirLock(sys.argv[2], command=["train_net.py", "--tag", "child-run"])
lock.acquire()
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the parent closes stdin
lock.release()
"""
WAIT_S = 180  # upper bound of every wait on the child (a loaded machine can take a minute to import torch)


def _start_holder(output_dir):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, run_lock.__file__, str(output_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "locked":
        proc.kill()
        raise AssertionError(f"the child did not take the lock: {line!r} {proc.stderr.read()}")
    return proc


def test_second_lock_in_the_same_process_fails_then_works_after_release(tmp_path):
    out = tmp_path / "run"
    with OutputDirLock(out, command=["first", "cmd"]) as first:
        assert first.held and (out / LOCK_FILE_NAME).is_file()
        info = read_lock_holder(out)
        assert (info["pid"], info["host"], info["command"]) == (os.getpid(), socket.gethostname(), "first cmd")
        assert info["output_dir"] == str(out) and info["started"]
        with pytest.raises(OutputDirLockedError) as e:
            OutputDirLock(out).acquire()
        message = str(e.value)
        assert f"OUTPUT_DIR {out} is in use by another run: pid {os.getpid()} on host {socket.gethostname()}" in message
        assert "running since" in message and "(command: first cmd)" in message
    assert not first.held and read_lock_holder(out) is None  # released: details cleared
    with OutputDirLock(out):
        pass


def test_second_process_fails_at_once_naming_the_first(tmp_path):
    out = tmp_path / "run"
    holder = _start_holder(out)
    try:
        start = time.monotonic()
        with pytest.raises(OutputDirLockedError) as e:
            OutputDirLock(out).acquire()
        assert time.monotonic() - start < 5  # non-blocking: no waiting for the holder
        message = str(e.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "train_net.py --tag child-run" in message and str(out) in message
    finally:
        holder.stdin.close()
        holder.wait(WAIT_S)
    assert holder.returncode == 0
    with OutputDirLock(out) as lock:  # the first has exited: free again
        assert read_lock_holder(out)["pid"] == os.getpid() and lock.held


def test_a_killed_holder_leaves_a_stale_file_that_does_not_block(tmp_path):
    out = tmp_path / "run"
    holder = _start_holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(WAIT_S)
    holder.stdin.close()
    stale = json.loads((out / LOCK_FILE_NAME).read_text())
    assert stale["pid"] == holder.pid  # the file still names the dead run...
    with OutputDirLock(out):  # ...but the kernel released its flock
        assert read_lock_holder(out)["pid"] == os.getpid()


def test_bad_use(tmp_path):
    with pytest.raises(ValueError, match="output_dir is empty"):
        OutputDirLock("")
    lock = OutputDirLock(tmp_path).acquire()
    with pytest.raises(RuntimeError, match="already held by this object"):
        lock.acquire()
    lock.release()
    lock.release()  # a second release is a no-op
    (tmp_path / LOCK_FILE_NAME).write_text("not json")
    assert read_lock_holder(tmp_path) is None and read_lock_holder(tmp_path / "missing") is None
