"""atomic_write: the target keeps its old content on failure; Ctrl-C waits for the file to be in place."""
import os
import signal
import time

import pytest

from gem_d2.utils.files import atomic_write, atomic_write_text


@pytest.fixture
def python_ctrl_c():
    """Python's own SIGINT handler, as in a foreground process (a background job may start with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_failure_keeps_previous_content_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(str(path), "old")

    def broken(f):
        f.write(b"half")
        raise ValueError("disk full")

    with pytest.raises(ValueError, match="disk full"):
        atomic_write(str(path), broken)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_ctrl_c_during_the_write_is_raised_after_the_file_is_complete(tmp_path, python_ctrl_c):
    path = tmp_path / "a.bin"

    def interrupted_midway(f):
        f.write(b"first half,")
        os.kill(os.getpid(), signal.SIGINT)  # delivered to this (main) thread while writing
        f.write(b" second half")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), interrupted_midway)
    assert path.read_bytes() == b"first half, second half"
    assert os.listdir(tmp_path) == ["a.bin"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_outside_a_write_is_not_held_back(tmp_path, python_ctrl_c):
    atomic_write_text(str(tmp_path / "a.txt"), "x")
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler runs here at the latest (a pending signal interrupts the sleep)
