"""The command-line tools in subprocesses: Ctrl-C ends tools/train_net.py with one line and status 130, and
tools/plan_experts.py and tools/run_demo.py refuse an output folder another run holds."""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import os
import signal
import subprocess
import sys
import time

import pytest

from gem_d2.data import synthetic
from gem_d2.engine.run_lock import OutputDirLock
from gem_d2.utils.safe_load import is_readable_checkpoint

pytestmark = pytest.mark.slow

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TRAIN = ("synth_photo_train", "synth_medical_train")


def _opts(out):
    return ["OUTPUT_DIR", str(out), "DATASETS.SYNTH.ROOT", synthetic.registered_synthetic_root(),
            "DATASETS.TRAIN", str(TRAIN), "DATASETS.TEST", "('synth_photo_test',)", "MODEL.GEM.UNITS",
            str(list(TRAIN)), "MODEL.GEM.MAPPING", "[[0], [1]]"]


def test_ctrl_c_during_training_prints_one_line_and_exits_130(small_synth, tiny_config, tmp_path):
    out = tmp_path / "out"
    # a checkpoint every iteration (~100 MB each): MAX_ITER bounds the disk used if the interrupt were ignored
    cmd = [sys.executable, "tools/train_net.py", "--config-file", tiny_config, *_opts(out), "SOLVER.MAX_ITER", "100",
           "SOLVER.CHECKPOINT_PERIOD", "1"]
    # Python's Ctrl-C handling in the child even when this test runs as a background job (SIGINT ignored, inherited)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while not (out / "last_checkpoint").is_file():
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.time() < deadline, "no checkpoint after 240 s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr[-4000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted; OUTPUT_DIR keeps the last complete checkpoint {out}{os.sep}model_"), last
    assert is_readable_checkpoint(last.rsplit(" ", 1)[1])
    assert not (out / "results.json").exists()  # no final evaluation of an interrupted run
    assert not [n for n in os.listdir(out) if ".tmp" in n]


@pytest.mark.parametrize("tool", ["plan_experts", "run_demo"])
def test_tools_refuse_an_output_folder_in_use(small_synth, tiny_config, tmp_path, tool):
    out = tmp_path / "out"
    args = ["--output", str(out)] if tool == "plan_experts" else []
    cmd = [sys.executable, f"tools/{tool}.py", "--config-file", tiny_config, *args, *_opts(out)]
    with OutputDirLock(str(out)):
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode != 0
    assert "OutputDirLockedError" in res.stderr and f"OUTPUT_DIR {out} is in use by another run" in res.stderr
    assert sorted(os.listdir(out)) == [".run.lock"]
