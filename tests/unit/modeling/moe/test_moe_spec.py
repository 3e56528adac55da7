"""moe_spec_from_cfg: MODEL.GEM.* -> MoESpec, the stored mapping's validation, class-level units."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

import gem_d2  # noqa: F401  (shims before detectron2)
from gem_d2.config import add_gem_config
from gem_d2.modeling.moe import moe_spec_from_cfg
from gem_d2.modeling.moe.context import RoutingContext
from gem_d2.modeling.moe.layer import build_ffn

DATASETS = ["moe_test_cars", "moe_test_faces", "moe_test_art"]
CLASSES = {"moe_test_cars": ["car", "van"], "moe_test_faces": ["face"], "moe_test_art": ["person", "dog", "cat"]}


@pytest.fixture(scope="module", autouse=True)
def metadata():
    for name, classes in CLASSES.items():
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, list)  # never loaded: only the classes are read
        MetadataCatalog.get(name).thing_classes = classes


def gem_cfg(router="gem", **gem):
    cfg = add_gem_config(get_cfg())
    cfg.DATASETS.TRAIN = tuple(DATASETS)
    cfg.MODEL.GEM.ROUTER = router
    cfg.MODEL.GEM.NUM_EXPERTS = 4
    cfg.MODEL.GEM.UNITS = ["moe_test_art", "moe_test_cars", "moe_test_faces"]
    cfg.MODEL.GEM.MAPPING = [[3], [0], [1]]
    for key, value in gem.items():
        cfg.MODEL.GEM[key] = value
    return cfg


def test_empty_moe_layers_gives_no_spec():
    cfg = gem_cfg(MOE_LAYERS=[])
    assert moe_spec_from_cfg(cfg, DATASETS) is None


def test_dataset_level_gem_spec_and_layer_built_from_it():
    cfg = gem_cfg(MOE_LAYERS=["encoder.5", "decoder.0"])
    spec = moe_spec_from_cfg(cfg, list(cfg.DATASETS.TRAIN))
    assert list(spec.layers) == ["encoder.5", "decoder.0"] and spec.num_experts == 4 and spec.router == "gem"
    assert spec.num_datasets == 3
    assert spec.router_kwargs["tables"].unit_of_dataset == [1, 2, 0]  # DATASETS.TRAIN order -> UNITS rows
    assert spec.router_kwargs["tables"].index == [[3], [0], [1]]
    layer = build_ffn("decoder.0", 8, 16, 0.0, "relu", spec)
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 2]))
    layer(torch.randn(2, 3, 8), ctx)
    want = torch.zeros(3, 4)
    want[0, 0] = 3  # cars -> expert 0
    want[2, 3] = 3  # art -> expert 3
    assert torch.equal(ctx.stats["decoder.0/tokens_per_expert"], want)


@pytest.mark.parametrize("gem,match", [
    (dict(MAPPING=[], UNITS=[]), "MAPPING is empty.*run the planner"),
    (dict(MAPPING=[[3], [0], [4]]), r"expert id 4 .*NUM_EXPERTS=4"),
    (dict(UNITS=["moe_test_art", "moe_test_cars"]), "UNITS has 2 entries but MODEL.GEM.MAPPING has 3"),
    (dict(UNITS=["moe_test_art", "moe_test_cars", "coco"]), r"unit 'coco' is neither a dataset of DATASETS.TRAIN"),
    (dict(UNITS=["moe_test_art", "moe_test_cars", "moe_test_cars"]), "UNITS has repeated names"),
    (dict(MAPPING=[[3, 1], [0, 2], [1, 2]]), "EXPERTS_PER_UNIT=1: the mapping is stale"),
    (dict(MOE_LAYERS=["decoder.6"]), r"index must be < MODEL.DINO.DEC_LAYERS=6"),
    (dict(MOE_LAYERS=["neck.0"]), "expected 'encoder.<i>' or 'decoder.<i>'"),
    (dict(MOE_LAYERS=["decoder.0", "decoder.0"]), "repeats a layer"),
    (dict(PLANNER=None), "PLANNER.LEVEL='group'"),
])
def test_bad_configs_raise_clear_errors(gem, match):
    if "PLANNER" in gem:
        cfg = gem_cfg()
        cfg.MODEL.GEM.PLANNER.LEVEL = "group"
    else:
        cfg = gem_cfg(**gem)
    with pytest.raises(ValueError, match=match):
        moe_spec_from_cfg(cfg, DATASETS)


def test_missing_dataset_and_unknown_router():
    cfg = gem_cfg()
    with pytest.raises(ValueError, match=r"no unit for the training dataset\(s\) \['moe_test_new'\]"):
        moe_spec_from_cfg(cfg, DATASETS + ["moe_test_new"])
    with pytest.raises(KeyError, match="MODEL.GEM.ROUTER='switch' is not a registered router"):
        moe_spec_from_cfg(gem_cfg(router="switch"), DATASETS)


def test_class_level_units_build_unit_of_class_and_modal_dataset_rows():
    cfg = gem_cfg(
        UNITS=["moe_test_cars/car", "moe_test_cars/van", "moe_test_faces/face", "moe_test_art/person",
               "moe_test_art/dog", "moe_test_art/cat", "moe_test_faces"],
        MAPPING=[[0], [1], [2], [3], [1], [1], [0]])
    cfg.MODEL.GEM.PLANNER.LEVEL = "class"
    kw = moe_spec_from_cfg(cfg, DATASETS).router_kwargs
    # unified classes: car, van | face | person, dog, cat
    assert kw["tables"].unit_of_class == [0, 1, 2, 3, 4, 5]
    # cars: classes' rows [0] and [1] tie -> first class (car, row 0); faces: its plain-name row 6;
    # art: expert 1 is used by 2 of 3 classes -> the dog row (first class with it)
    assert kw["tables"].unit_of_dataset == [0, 6, 4]

    layer = build_ffn("decoder.0", 8, 16, 0.0, "relu", moe_spec_from_cfg(cfg, DATASETS))
    labels = torch.tensor([[0, 1, -1], [3, 5, 4]])  # -1: unknown -> dataset row
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 2]), query_labels=labels)
    layer(torch.randn(2, 3, 8), ctx)
    assert ctx.stats["decoder.0/tokens_per_expert"].tolist() == [[2, 1, 0, 0], [0, 0, 0, 0], [0, 2, 0, 1]]


def test_class_level_bad_unit_names():
    cfg = gem_cfg(UNITS=["moe_test_cars/car", "moe_test_cars/truck", "moe_test_faces/face"])
    cfg.MODEL.GEM.PLANNER.LEVEL = "class"
    with pytest.raises(ValueError, match=r"class 'truck' is not one of moe_test_cars's classes"):
        moe_spec_from_cfg(cfg, DATASETS[:2])
    cfg.MODEL.GEM.UNITS = ["moe_test_cars/car", "moe_test_cars/van", "moe_test_faces/face"]
    with pytest.raises(ValueError, match=r"no unit for the training dataset\(s\) \['moe_test_art'\]"):
        moe_spec_from_cfg(cfg, DATASETS)
    cfg.MODEL.GEM.UNITS = ["moe_test_cars/car", "bogus/van", "moe_test_faces/face"]
    with pytest.raises(ValueError, match=r"unit 'bogus/van' is neither a dataset"):
        moe_spec_from_cfg(cfg, DATASETS[:2])


def test_baseline_router_kwargs_from_cfg():
    cfg = gem_cfg(router="topk")
    cfg.MODEL.GEM.TOPK.K = 2
    cfg.MODEL.GEM.TOPK.Z_LOSS_COEF = 0.001
    assert moe_spec_from_cfg(cfg, DATASETS).router_kwargs == dict(k=2, capacity_factor=1.25, balance_coef=0.01,
                                                                  z_loss_coef=0.001)
    cfg.MODEL.GEM.ROUTER = "damex"  # never GEM's plan nor the dataset index: an explicit hand-written map
    with pytest.raises(ValueError, match="DAMEX.DATASET_TO_EXPERT"):
        moe_spec_from_cfg(cfg, DATASETS)
    cfg.MODEL.GEM.DAMEX.DATASET_TO_EXPERT = [["moe_test_art", 2], ["moe_test_cars", 0], ["moe_test_faces", 0]]
    kwargs = moe_spec_from_cfg(cfg, DATASETS).router_kwargs
    assert kwargs["dataset_to_expert"] == [0, 0, 2] and kwargs["num_moe_layers"] == 3
    assert kwargs["gate_noise"] == 1.0 and kwargs["batch_prioritized"] is True
    cfg.MODEL.GEM.DAMEX.DATASET_TO_EXPERT = []
    for router, key in [("softmoe", "slots_per_expert"), ("remoe", "target_k"), ("moepp", "num_constant")]:
        cfg.MODEL.GEM.ROUTER = router
        spec = moe_spec_from_cfg(cfg, DATASETS)
        assert key in spec.router_kwargs
        layer = build_ffn("decoder.0", 8, 16, 0.0, "relu", spec)
        out = layer(torch.randn(2, 3, 8), RoutingContext(dataset_ids=torch.tensor([0, 1])))
        assert out.shape == (2, 3, 8)
    cfg.MODEL.GEM.ROUTER = "dense"
    assert moe_spec_from_cfg(cfg, DATASETS).router_kwargs == {}
    assert moe_spec_from_cfg(cfg, 3).num_datasets == 3  # an int stands for DATASETS.TRAIN
    with pytest.raises(ValueError, match="2 datasets given but DATASETS.TRAIN has 3"):
        moe_spec_from_cfg(cfg, 2)
