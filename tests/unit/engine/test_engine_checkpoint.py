"""GemCheckpointer (GEM keys, atomic writes, mapping checks) and resolve_gem_mapping (single process)."""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from torch import nn

import gem_d2.engine.planning
from gem_d2.config import add_gem_config
from gem_d2.engine import GemCheckpointer, MappingMismatchError, read_checkpoint_mapping, resolve_gem_mapping
from gem_d2.engine.checkpoint_records import CheckpointLayoutError
from gem_d2.planner.mapping import GemMapping
from gem_d2.utils.files import atomic_write


def _cfg(tmp_path, units=("synth_a_train", "synth_b_train"), mapping=((0,), (1,)), num_experts=2):
    cfg = get_cfg()
    add_gem_config(cfg)
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.MODEL.GEM.UNITS = list(units)
    cfg.MODEL.GEM.MAPPING = [list(m) for m in mapping]
    cfg.MODEL.GEM.NUM_EXPERTS = num_experts
    cfg.MODEL.GEM.MOE_LAYERS = ["decoder.0"]
    return cfg


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def _tmp_files(directory):
    return [f for f in os.listdir(directory) if f.endswith(".tmp") or ".tmp." in f]


def test_checkpoint_holds_mapping_and_plain_detectron2_loads_it(tmp_path):
    cfg = _cfg(tmp_path)
    model = _model(0)
    GemCheckpointer.from_config(cfg, model).save("model_final", iteration=7)
    path = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    data = torch.load(path, map_location="cpu", weights_only=True)  # only tensors and plain containers
    assert data["iteration"] == 7
    assert data["gem_mapping"] == {"units": ["synth_a_train", "synth_b_train"], "mapping": [[0], [1]],
                                   "mapping_weights": [[1.0], [1.0]], "num_experts": 2, "moe_layers": ["decoder.0"]}
    assert data["gem_router"] == "gem"
    assert read_checkpoint_mapping(path) == GemMapping.from_cfg(cfg)
    with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")) as f:
        assert f.read() == "model_final.pth"

    other = _model(1)
    extra = DetectionCheckpointer(other).load(path)  # a plain detectron2 codebase after `import gem_d2`
    assert extra["gem_mapping"]["mapping"] == [[0], [1]] and extra["iteration"] == 7
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    model = _model(0)
    ckpt = GemCheckpointer.from_config(cfg, model)
    ckpt.save("model_0000001", iteration=1)
    path = os.path.join(cfg.OUTPUT_DIR, "model_0000001.pth")
    with open(path, "rb") as f:
        before = f.read()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)  # a partial file on disk, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save("model_0000001", iteration=2)  # overwriting the same name
    with pytest.raises(OSError, match="disk full"):
        ckpt.save("model_0000002", iteration=2)  # a new name
    with open(path, "rb") as f:
        assert f.read() == before
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_0000002.pth"))
    assert _tmp_files(cfg.OUTPUT_DIR) == []
    assert ckpt.get_checkpoint_file() == path  # last_checkpoint not moved to the failed one
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["iteration"] == 1


def test_atomic_write_failure_keeps_old_text(tmp_path):
    target = tmp_path / "last_checkpoint"
    target.write_text("model_0000004.pth")

    def partial(f):
        f.write("model_00")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(target), partial, binary=False)
    assert target.read_text() == "model_0000004.pth"
    assert _tmp_files(tmp_path) == []


def test_loading_a_checkpoint_with_another_mapping_is_an_error_naming_both(tmp_path):
    cfg_a = _cfg(tmp_path)
    GemCheckpointer.from_config(cfg_a, _model(0)).save("model_final", iteration=3)
    path = os.path.join(cfg_a.OUTPUT_DIR, "model_final.pth")

    cfg_b = _cfg(tmp_path, mapping=((1,), (0,)))
    with pytest.raises(MappingMismatchError, match=r"mapping: \[\[1\], \[0\]\] vs \[\[0\], \[1\]\]"):
        GemCheckpointer.from_config(cfg_b, _model(1), save_dir="").load(path)
    cfg_c = _cfg(tmp_path, num_experts=4)
    with pytest.raises(CheckpointLayoutError, match="NUM_EXPERTS: 4 vs 2"):
        GemCheckpointer.from_config(cfg_c, _model(1), save_dir="").load(path)

    # the same check before the model is built (tools/train_net.py's setup)
    cfg_b.MODEL.WEIGHTS = path
    with pytest.raises(MappingMismatchError, match="LOAD_CHECKPOINT_MAPPING"):
        resolve_gem_mapping(cfg_b)


def test_load_checkpoint_mapping_takes_the_checkpoints_mapping_into_the_config(tmp_path):
    cfg_a = _cfg(tmp_path)
    GemCheckpointer.from_config(cfg_a, _model(0)).save("model_final", iteration=3)
    path = os.path.join(cfg_a.OUTPUT_DIR, "model_final.pth")

    cfg = _cfg(tmp_path / "run2", mapping=((1,), (1,)), num_experts=4)
    cfg.MODEL.WEIGHTS = path
    cfg.MODEL.GEM.LOAD_CHECKPOINT_MAPPING = True
    cfg.freeze()
    resolve_gem_mapping(cfg)
    assert cfg.is_frozen()
    assert cfg.MODEL.GEM.MAPPING == [[0], [1]] and cfg.MODEL.GEM.NUM_EXPERTS == 2
    written = get_cfg()
    add_gem_config(written)
    written.merge_from_file(os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
    assert written.MODEL.GEM.MAPPING == [[0], [1]]
    model = _model(1)
    GemCheckpointer.from_config(cfg, model, save_dir="").load(path)  # now consistent: loads
    assert torch.equal(model[0].weight, _model(0)[0].weight)


def test_resume_with_an_empty_config_mapping_takes_the_last_checkpoints(tmp_path):
    cfg_a = _cfg(tmp_path)
    GemCheckpointer.from_config(cfg_a, _model(0)).save("model_0000009", iteration=9)
    cfg = _cfg(tmp_path, units=(), mapping=())
    cfg.OUTPUT_DIR = cfg_a.OUTPUT_DIR
    resolve_gem_mapping(cfg, resume=True)  # would otherwise plan: the planner is not called
    assert cfg.MODEL.GEM.UNITS == ["synth_a_train", "synth_b_train"] and cfg.MODEL.GEM.MAPPING == [[0], [1]]


def test_empty_mapping_runs_the_planner_and_writes_the_resolved_config(tmp_path, monkeypatch):
    calls = []

    def plan_from_cfg(cfg, output_dir):
        calls.append(output_dir)
        return "plan", GemMapping.create(["synth_a_train", "synth_b_train"], [[1], [0]], num_experts=2,
                                         moe_layers=["decoder.0"])

    monkeypatch.setattr(gem_d2.engine.planning, "plan_from_cfg", plan_from_cfg)
    cfg = _cfg(tmp_path, units=(), mapping=())
    resolve_gem_mapping(cfg)
    assert calls == [os.path.join(cfg.OUTPUT_DIR, "plan")]
    assert cfg.MODEL.GEM.MAPPING == [[1], [0]]
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml")) as f:
        text = f.read()
    assert "synth_b_train" in text
    assert _tmp_files(cfg.OUTPUT_DIR) == []

    eval_cfg = _cfg(tmp_path / "eval", units=(), mapping=())
    with pytest.raises(ValueError, match="--eval-only .* holds no GEM mapping"):
        resolve_gem_mapping(eval_cfg, eval_only=True)
    assert len(calls) == 1


def test_invalid_mapping_in_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"MAPPING: unit 'synth_b_train' = \[5\].*NUM_EXPERTS=2"):
        resolve_gem_mapping(_cfg(tmp_path, mapping=((0,), (5,))))
    with pytest.raises(ValueError, match="UNITS has 2 entries but MODEL.GEM.MAPPING has 1"):
        resolve_gem_mapping(_cfg(tmp_path, mapping=((0,),)))
