"""Checkpoints record the label space and the router/MoE layout; loading with other ones is an error
(GemCheckpointer after the model is built, resolve_gem_mapping before), unless ADOPT_CHECKPOINT_LAYOUT."""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import os

import pytest
import torch
from detectron2.config import get_cfg
from torch import nn

from gem_d2.config import add_gem_config
from gem_d2.data import register_voc_dataset
from gem_d2.engine import GemCheckpointer, MappingMismatchError, resolve_gem_mapping
from gem_d2.engine.checkpoint_records import CheckpointLayoutError, read_checkpoint_records

CLASSES = {"lsa_train": ["cat", "dog"], "lsb_train": ["car"]}


@pytest.fixture
def datasets(registered_names, tmp_path):
    for name, classes in CLASSES.items():
        register_voc_dataset(name, str(tmp_path / name), "train", classes)
        registered_names.append(name)
    return registered_names


def _cfg(out, train=("lsa_train", "lsb_train"), router="gem", num_experts=2, layers=("decoder.0",), mapping=True):
    cfg = add_gem_config(get_cfg())
    cfg.OUTPUT_DIR = str(out)
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TEST = ()
    g = cfg.MODEL.GEM
    g.ROUTER, g.NUM_EXPERTS, g.MOE_LAYERS = router, num_experts, list(layers)
    if mapping and router == "gem":
        g.UNITS, g.MAPPING = ["lsa_train", "lsb_train"], [[0], [1]]
    return cfg


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def _saved(tmp_path, **kwargs):
    cfg = _cfg(tmp_path / "trained", **kwargs)
    GemCheckpointer.from_config(cfg, _model(0)).save("model_final", iteration=5)
    return os.path.join(cfg.OUTPUT_DIR, "model_final.pth")


def test_checkpoint_records_the_label_space_and_the_layout(tmp_path, datasets):
    path = _saved(tmp_path)
    data = torch.load(path, weights_only=True)
    assert data["gem_label_space"] == {"datasets": ["lsa_train", "lsb_train"], "classes": [["cat", "dog"], ["car"]]}
    assert data["gem_router"] == "gem" and data["gem_mapping"]["num_experts"] == 2
    rec = read_checkpoint_records(path)
    assert rec.layout == {"router": "gem", "num_experts": 2, "moe_layers": ["decoder.0"]} and rec.iteration == 5
    no_space = _cfg(tmp_path / "nospace", train=())  # a config without a label space records none
    GemCheckpointer.from_config(no_space, _model(0)).save("model_final")
    assert "gem_label_space" not in torch.load(os.path.join(no_space.OUTPUT_DIR, "model_final.pth"),
                                               weights_only=True)


def test_reordered_train_is_an_error_naming_both_unless_adopted(tmp_path, datasets):
    path = _saved(tmp_path)
    cfg = _cfg(tmp_path / "eval", train=("lsb_train", "lsa_train"))
    both = r"\['lsb_train', 'lsa_train'\] vs \['lsa_train', 'lsb_train'\]"
    with pytest.raises(CheckpointLayoutError, match=both):
        GemCheckpointer.from_config(cfg, _model(1), save_dir="").load(path)
    cfg.MODEL.WEIGHTS = path
    with pytest.raises(CheckpointLayoutError, match=both + r"(.|\n)*ADOPT_CHECKPOINT_LAYOUT"):
        resolve_gem_mapping(cfg, eval_only=True)

    cfg.MODEL.GEM.ADOPT_CHECKPOINT_LAYOUT = True
    cfg.freeze()
    resolve_gem_mapping(cfg, eval_only=True)
    assert cfg.DATASETS.TRAIN == ("lsa_train", "lsb_train") and cfg.is_frozen()
    model = _model(1)
    GemCheckpointer.from_config(cfg, model, save_dir="").load(path)
    assert torch.equal(model[0].weight, _model(0)[0].weight)


def test_a_changed_class_list_is_always_an_error(tmp_path, datasets, registered_names):
    path = _saved(tmp_path)
    register_voc_dataset("lsb_train", str(tmp_path / "lsb"), "train", ["car", "bus"])  # same name, other classes
    for adopt in (False, True):
        cfg = _cfg(tmp_path / f"eval{adopt}")
        cfg.MODEL.WEIGHTS = path
        cfg.MODEL.GEM.ADOPT_CHECKPOINT_LAYOUT = adopt
        with pytest.raises(CheckpointLayoutError, match=r"classes of lsb_train: \['car', 'bus'\] vs \['car'\]"):
            resolve_gem_mapping(cfg, eval_only=True)
        with pytest.raises(CheckpointLayoutError, match="classes of lsb_train"):
            GemCheckpointer.from_config(cfg, _model(1), save_dir="").load(path)


@pytest.mark.parametrize("change", [{"router": "topk"}, {"num_experts": 4}, {"layers": ("decoder.0", "decoder.1")}])
def test_another_router_or_moe_layout_is_an_error_unless_adopted(tmp_path, datasets, change):
    path = _saved(tmp_path)
    cfg = _cfg(tmp_path / "eval", **change)
    key = {"router": "ROUTER: 'topk' vs 'gem'", "num_experts": "NUM_EXPERTS: 4 vs 2",
           "layers": r"MOE_LAYERS: \['decoder.0', 'decoder.1'\] vs \['decoder.0'\]"}[next(iter(change))]
    with pytest.raises(CheckpointLayoutError, match=key):  # before: a warning, MoE layers left random
        GemCheckpointer.from_config(cfg, _model(1), save_dir="").load(path)
    cfg.MODEL.WEIGHTS = path
    with pytest.raises(CheckpointLayoutError, match=key):
        resolve_gem_mapping(cfg, eval_only=True)
    cfg.MODEL.GEM.ADOPT_CHECKPOINT_LAYOUT = True
    resolve_gem_mapping(cfg, eval_only=True)
    g = cfg.MODEL.GEM
    assert (g.ROUTER, g.NUM_EXPERTS, list(g.MOE_LAYERS), g.MAPPING) == ("gem", 2, ["decoder.0"], [[0], [1]])
    GemCheckpointer.from_config(cfg, _model(1), save_dir="").load(path)


def test_dense_models_compare_no_router(tmp_path, datasets):
    path = _saved(tmp_path, layers=(), mapping=False)  # no MoE layer: the router shapes nothing
    cfg = _cfg(tmp_path / "eval", router="topk", layers=())
    GemCheckpointer.from_config(cfg, _model(1), save_dir="").load(path)


def test_load_checkpoint_mapping_still_takes_expert_count_but_not_the_router(tmp_path, datasets):
    path = _saved(tmp_path)
    cfg = _cfg(tmp_path / "eval", num_experts=4, mapping=False)
    cfg.MODEL.WEIGHTS = path
    cfg.MODEL.GEM.LOAD_CHECKPOINT_MAPPING = True
    resolve_gem_mapping(cfg, eval_only=True)
    assert cfg.MODEL.GEM.NUM_EXPERTS == 2 and cfg.MODEL.GEM.MAPPING == [[0], [1]]
    other = _cfg(tmp_path / "eval2", router="topk")
    other.MODEL.WEIGHTS = path
    other.MODEL.GEM.LOAD_CHECKPOINT_MAPPING = True
    with pytest.raises(CheckpointLayoutError, match="ROUTER"):
        resolve_gem_mapping(other, eval_only=True)


def test_weights_without_gem_records_load_as_before(tmp_path, datasets):
    backbone = tmp_path / "imagenet.pth"
    torch.save({"model": _model(3).state_dict()}, backbone)  # no gem keys (ImageNet / detectron2 weights)
    cfg = _cfg(tmp_path / "run", train=("lsb_train", "lsa_train"), router="topk", num_experts=4)
    cfg.MODEL.WEIGHTS = str(backbone)
    resolve_gem_mapping(cfg)
    model = _model(1)
    GemCheckpointer.from_config(cfg, model, save_dir="").load(str(backbone))
    assert torch.equal(model[0].weight, _model(3)[0].weight)


def test_a_mapping_mismatch_is_still_reported_as_such(tmp_path, datasets):
    path = _saved(tmp_path)
    cfg = _cfg(tmp_path / "eval")
    cfg.MODEL.GEM.MAPPING = [[1], [0]]
    with pytest.raises(MappingMismatchError, match=r"mapping: \[\[1\], \[0\]\] vs \[\[0\], \[1\]\]"):
        GemCheckpointer.from_config(cfg, _model(1), save_dir="").load(path)
