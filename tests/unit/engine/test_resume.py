"""--resume skips an unreadable newest checkpoint: the checkpointer and the mapping resolution pick the same file."""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import logging
import os

import torch
from detectron2.config import get_cfg
from torch import nn

from gem_d2.config import add_gem_config
from gem_d2.engine import GemCheckpointer, checkpoint_to_load, resolve_gem_mapping
from gem_d2.engine.resume import resume_checkpoint


def _cfg(out, mapping=((0,), (1,))):
    cfg = add_gem_config(get_cfg())
    cfg.OUTPUT_DIR = str(out)
    g = cfg.MODEL.GEM
    g.NUM_EXPERTS, g.MOE_LAYERS = 2, ["decoder.0"]
    g.UNITS = ["synth_a_train", "synth_b_train"] if mapping else []
    g.MAPPING = [list(m) for m in mapping]
    return cfg


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4))


def _run_with_two_checkpoints(tmp_path):
    cfg = _cfg(tmp_path / "out")
    for it in (1, 3):
        GemCheckpointer.from_config(cfg, _model(it)).save(f"model_{it:07d}", iteration=it)
    return cfg, os.path.join(cfg.OUTPUT_DIR, "model_0000001.pth"), os.path.join(cfg.OUTPUT_DIR, "model_0000003.pth")


def _truncate(path, size=200):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_resume_skips_a_truncated_newest_checkpoint(tmp_path, caplog):
    cfg, older, newest = _run_with_two_checkpoints(tmp_path)
    assert checkpoint_to_load(cfg, resume=True) == newest
    _truncate(newest)
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(cfg.OUTPUT_DIR) == older
    assert newest in caplog.text and "truncated or corrupt" in caplog.text  # names the path and the problem
    assert checkpoint_to_load(cfg, resume=True) == older  # the mapping is read from the same file

    model = _model(0)
    ckpt = GemCheckpointer.from_config(cfg, model)
    assert ckpt.has_checkpoint() and ckpt.get_checkpoint_file() == older
    extra = ckpt.resume_or_load("", resume=True)
    assert extra["iteration"] == 1 and torch.equal(model[0].weight, _model(1)[0].weight)


def test_resume_skips_a_corrupt_checkpoint_and_resolves_its_mapping_from_the_readable_one(tmp_path):
    cfg, older, newest = _run_with_two_checkpoints(tmp_path)
    size = os.path.getsize(newest)
    with open(newest, "r+b") as f:  # garbage over the second half, same size
        f.seek(size // 2)
        f.write(b"\xff" * (size - size // 2))
    resumed = _cfg(cfg.OUTPUT_DIR, mapping=())
    resolve_gem_mapping(resumed, resume=True)  # an empty mapping is taken from the checkpoint resume loads
    assert resumed.MODEL.GEM.MAPPING == [[0], [1]]
    assert GemCheckpointer.from_config(cfg, _model(0)).get_checkpoint_file() == older


def test_resume_starts_fresh_when_no_checkpoint_is_readable(tmp_path, caplog):
    cfg, older, newest = _run_with_two_checkpoints(tmp_path)
    _truncate(older)
    _truncate(newest)
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(cfg.OUTPUT_DIR) == ""
    assert "starting fresh" in caplog.text
    cfg.MODEL.WEIGHTS = ""
    assert checkpoint_to_load(cfg, resume=True) == ""
    model = _model(0)
    ckpt = GemCheckpointer.from_config(cfg, model)
    assert not ckpt.has_checkpoint()
    ckpt.resume_or_load("", resume=True)  # nothing loaded: the model keeps its initialisation
    assert torch.equal(model[0].weight, _model(0)[0].weight)


def test_resume_prefers_model_final_then_the_highest_iteration(tmp_path):
    cfg, older, newest = _run_with_two_checkpoints(tmp_path)
    GemCheckpointer.from_config(cfg, _model(9)).save("model_final", iteration=9)
    GemCheckpointer.from_config(cfg, _model(4)).save("model_0000004", iteration=4)  # tagged last
    _truncate(os.path.join(cfg.OUTPUT_DIR, "model_0000004.pth"))
    assert resume_checkpoint(cfg.OUTPUT_DIR) == os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    os.unlink(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    assert resume_checkpoint(cfg.OUTPUT_DIR) == newest
    assert resume_checkpoint(str(tmp_path / "empty")) == ""  # no last_checkpoint: nothing to resume
