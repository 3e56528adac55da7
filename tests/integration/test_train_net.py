"""tools/train_net.py end to end in subprocesses: kill during training, --resume, --eval-only.

A tiny GEM-DINO (1+1 layers, hidden 32, 96 px, 2 experts, GEM mapping given in the config) on two
of the generated domains. The first run is SIGKILLed once a checkpoint exists; ``--resume`` must
continue from the iteration after it; ``--eval-only`` on the final checkpoint, with a config whose
mapping is empty (it comes from the checkpoint), must reproduce the training run's table.
"""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from gem_d2.data import synthetic

pytestmark = pytest.mark.slow

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
CONFIG = os.path.join(REPO, "tests", "tiny_gem_dino.yaml")  # the conftest tiny_config
TRAIN = ("synth_photo_train", "synth_medical_train")
TEST = ("synth_photo_test", "synth_medical_test")
MAPPING = ["MODEL.GEM.UNITS", str(list(TRAIN)), "MODEL.GEM.MAPPING", "[[0], [1]]"]


def _opts(synth_root, output_dir):
    return ["OUTPUT_DIR", output_dir, "DATASETS.SYNTH.ROOT", synth_root, "DATASETS.TRAIN", str(TRAIN),
            "DATASETS.TEST", str(TEST), "SOLVER.STEPS", "(1000,)"]


def _cmd(*extra):
    return [sys.executable, TRAIN_NET, "--config-file", CONFIG, *extra]


def _run(cmd, log, timeout=240):
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    with open(log) as f:
        text = f.read()
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{text[-4000:]}"
    return text


@pytest.fixture(scope="module")
def resumed_run(small_synth, tmp_path_factory):
    root = synthetic.registered_synthetic_root()
    work = tmp_path_factory.mktemp("train_net")
    out = str(work / "out")
    opts = _opts(root, out) + MAPPING + ["SOLVER.CHECKPOINT_PERIOD", "1"]

    # 1) train "forever", kill -9 as soon as a checkpoint is tagged
    log1 = work / "run1.log"
    with open(log1, "w") as f:
        proc = subprocess.Popen(_cmd(*opts, "SOLVER.MAX_ITER", "500"), cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    tag = os.path.join(out, "last_checkpoint")
    deadline = time.time() + 240
    try:
        while not os.path.isfile(tag):
            if proc.poll() is not None:
                pytest.fail(f"training exited with {proc.returncode} before a checkpoint:\n{log1.read_text()[-4000:]}")
            if time.time() > deadline:
                pytest.fail(f"no checkpoint after 240 s:\n{log1.read_text()[-4000:]}")
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not os.path.exists(os.path.join(out, "model_final.pth"))
    with open(tag) as f:
        last = os.path.join(out, f.read().strip())
    killed_at = torch.load(last, weights_only=True)["iteration"]

    # 2) resume with a schedule 2 iterations longer than the checkpoint
    max_iter = killed_at + 3
    text = _run(_cmd("--resume", *opts, "SOLVER.MAX_ITER", str(max_iter)), work / "run2.log")
    return {"out": out, "root": root, "work": work, "killed_at": killed_at, "max_iter": max_iter, "log": text,
            "checkpoint": last}


def test_kill_and_resume_continues_from_the_last_checkpoint(resumed_run):
    r = resumed_run
    assert f"Starting training from iteration {r['killed_at'] + 1}" in r["log"]
    assert re.search(r"Loading trainer from .*" + re.escape(os.path.basename(r["checkpoint"])), r["log"])
    final = torch.load(os.path.join(r["out"], "model_final.pth"), weights_only=True)
    assert final["iteration"] == r["max_iter"] - 1
    assert final["gem_mapping"]["mapping"] == [[0], [1]] and final["gem_mapping"]["units"] == list(TRAIN)
    assert final["trainer"]["_trainer"]["optimizer"]["state"], "optimizer state is saved for --resume"
    with open(os.path.join(r["out"], "metrics.json")) as f:
        iterations = [json.loads(line)["iteration"] for line in f if line.strip()]
    assert max(iterations) == r["max_iter"]  # the final evaluation is logged at max_iter
    for name in ("results_table.md", "results.json", "training_curves.png", "config.yaml", "routing_stats.json"):
        assert os.path.isfile(os.path.join(r["out"], name)), name
    assert not [f for f in os.listdir(r["out"]) if ".tmp" in f]


def test_eval_only_reproduces_the_table_with_the_checkpoints_mapping(resumed_run):
    r = resumed_run
    out = str(r["work"] / "eval")
    weights = os.path.join(r["out"], "model_final.pth")
    text = _run(_cmd("--eval-only", *_opts(r["root"], out), "MODEL.WEIGHTS", weights), r["work"] / "eval.log")
    assert "GEM mapping from checkpoint" in text
    with open(os.path.join(r["out"], "results.json")) as f:
        trained = json.load(f)
    with open(os.path.join(out, "results.json")) as f:
        evaluated = json.load(f)
    assert evaluated == trained
    with open(os.path.join(r["out"], "results_table.md")) as a, open(os.path.join(out, "results_table.md")) as b:
        assert a.read() == b.read()


def test_model_final_loads_in_plain_detectron2(resumed_run):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from gem_d2.config import add_gem_config

    cfg = add_gem_config(get_cfg())
    cfg.merge_from_file(os.path.join(resumed_run["out"], "config.yaml"))  # the resolved config of the run
    model = build_model(cfg)
    path = os.path.join(resumed_run["out"], "model_final.pth")
    extra = DetectionCheckpointer(model).load(path)
    assert extra["gem_mapping"]["mapping"] == [[0], [1]] and extra["gem_router"] == "gem"
    saved = torch.load(path, weights_only=True)["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name



def test_demo_tool_draws_detections_with_a_known_dataset_and_with_auto_routing(resumed_run, tmp_path):
    """tools/demo.py on the run's config and final checkpoint: one PNG per input, both routing modes."""
    r = resumed_run
    images = sorted(glob.glob(os.path.join(r["root"], "photo", "JPEGImages", "*test*")))[:2]
    assert images
    demo = os.path.join(REPO, "tools", "demo.py")
    base = ["--config-file", os.path.join(r["out"], "config.yaml"), "--input", *images]
    weights = ["MODEL.WEIGHTS", os.path.join(r["out"], "model_final.pth"), "DATASETS.SYNTH.ROOT", r["root"]]
    for mode, out in ((["--dataset", "synth_photo_test"], "known"), (["--auto"], "auto")):
        target = tmp_path / out
        res = subprocess.run([sys.executable, demo, *base, "--output", str(target), *mode, *weights],
                             capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stdout + res.stderr
        assert sorted(p.name for p in target.iterdir()) == sorted(
            os.path.splitext(os.path.basename(i))[0] + ".png" for i in images)
        assert res.stdout.count(" detections as synth_") == len(images)
    bad = subprocess.run([sys.executable, demo, *base[:2], "--input", "/nonexistent/*.jpg", "--output",
                          str(tmp_path / "x"), "--auto", *weights], capture_output=True, text=True, timeout=240)
    assert bad.returncode != 0 and "matches no file" in bad.stderr
