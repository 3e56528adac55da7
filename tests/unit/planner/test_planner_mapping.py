"""GemMapping: YAML round-trip into MODEL.GEM.UNITS/MAPPING/MAPPING_WEIGHTS (merge_from_file and _BASE_) and
validation against a config."""
import dataclasses

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
import pytest
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog

from gem_d2.config import add_gem_config
from gem_d2.planner import GemMapping

DATASETS = ("plan_a_train", "plan_b_train", "plan_c_train")


def make_cfg(**gem):
    cfg = get_cfg()
    add_gem_config(cfg)
    cfg.DATASETS.TRAIN = DATASETS
    cfg.MODEL.GEM.NUM_EXPERTS = 4
    for k, v in gem.items():
        setattr(cfg.MODEL.GEM, k, v)
    return cfg


def sample_mapping(k=1):
    experts = [[0], [3], [1]] if k == 1 else [[0, 2], [1, 3], [0, 3]]
    weights = None if k == 1 else [[0.25, 0.75], [0.5, 0.5], [0.123456789, 0.876543211]]
    return GemMapping.create(DATASETS, experts, weights, num_experts=4)


@pytest.mark.parametrize("k", [1, 2])
def test_yaml_round_trip_through_merge_from_file(tmp_path, k):
    mapping = sample_mapping(k)
    path = tmp_path / "plan.yaml"
    mapping.save(str(path), header="test plan")
    cfg = make_cfg(NUM_EXPERTS=8)
    cfg.merge_from_file(str(path))
    assert list(cfg.MODEL.GEM.UNITS) == list(DATASETS)
    assert [list(r) for r in cfg.MODEL.GEM.MAPPING] == [list(r) for r in mapping.experts]
    assert cfg.MODEL.GEM.NUM_EXPERTS == 4 and cfg.MODEL.GEM.EXPERTS_PER_UNIT == k
    back = GemMapping.from_cfg(cfg)
    assert back.units == mapping.units and back.experts == mapping.experts
    for got, want in zip(back.weights, mapping.weights):
        assert got == pytest.approx(want, abs=1e-6)
    assert GemMapping.load(str(path)) == dataclasses.replace(back, moe_layers=())  # the sample has no layers
    back.validate_cfg(cfg)


def test_fragment_works_as_base(tmp_path):
    sample_mapping().save(str(tmp_path / "plan.yaml"))
    (tmp_path / "train.yaml").write_text('_BASE_: "plan.yaml"\nSOLVER:\n  MAX_ITER: 7\n')
    cfg = make_cfg()
    cfg.merge_from_file(str(tmp_path / "train.yaml"))
    assert cfg.SOLVER.MAX_ITER == 7
    assert [list(r) for r in cfg.MODEL.GEM.MAPPING] == [[0], [3], [1]]


def test_to_cfg_and_empty_weights_are_uniform():
    cfg = make_cfg(EXPERTS_PER_UNIT=2)
    sample_mapping(2).to_cfg(cfg)
    assert cfg.MODEL.GEM.MAPPING_WEIGHTS[2] == [0.123457, 0.876543]
    cfg.MODEL.GEM.MAPPING_WEIGHTS = []
    assert GemMapping.from_cfg(cfg).weights == ((0.5, 0.5),) * 3


@pytest.mark.parametrize("change, pattern", [
    (lambda c, m: None, None),
    (lambda c, m: setattr(c.DATASETS, "TRAIN", DATASETS[:2]),
     r"unit 'plan_c_train' is neither a dataset of DATASETS.TRAIN"),
    (lambda c, m: setattr(c.DATASETS, "TRAIN", DATASETS + ("plan_d_train",)),
     r"no unit for the training dataset\(s\) \['plan_d_train'\]"),
    (lambda c, m: setattr(c.MODEL.GEM, "NUM_EXPERTS", 3), r"indexes 4 experts but MODEL.GEM.NUM_EXPERTS=3"),
    (lambda c, m: setattr(c.MODEL.GEM, "EXPERTS_PER_UNIT", 2), r"has 1 experts \[0\] but MODEL.GEM.EXPERTS_PER_UNIT=2"),
    (lambda c, m: setattr(c.MODEL.GEM.PLANNER, "LEVEL", "image"), r"PLANNER.LEVEL='image'"),
    (lambda c, m: setattr(c.MODEL.GEM.PLANNER, "LEVEL", "dataset") or setattr(c.DATASETS, "TRAIN", ("plan_a",)),
     r"unit 'plan_a_train' is neither a dataset"),
])
def test_validate(change, pattern):
    cfg, mapping = make_cfg(), sample_mapping()
    change(cfg, mapping)
    if pattern is None:
        mapping.validate_cfg(cfg)
    else:
        with pytest.raises(ValueError, match=pattern):
            mapping.validate_cfg(cfg)


def test_validate_rejects_bad_rows():
    cfg = make_cfg(EXPERTS_PER_UNIT=2)
    with pytest.raises(ValueError, match=r"lists an expert twice: \[1, 1\]"):
        GemMapping.create(DATASETS, [[0, 2], [1, 1], [0, 3]], num_experts=4).validate_cfg(cfg)
    with pytest.raises(ValueError, match=r"MAPPING_WEIGHTS: unit 'plan_a_train' has weights \[0.2, 0.2\]"):
        GemMapping.create(DATASETS, [[0, 2], [1, 3], [0, 3]], [[0.2, 0.2], [0.5, 0.5], [0.5, 0.5]], 4).validate_cfg(cfg)
    with pytest.raises(ValueError, match=r"repeated names"):
        GemMapping.create(["plan_a_train"] * 2 + ["plan_c_train"], [[0, 1]] * 3, num_experts=4).validate_cfg(cfg)
    with pytest.raises(ValueError, match=r"MAPPING is empty"):
        GemMapping.create([], []).validate_cfg(cfg)
    cfg.MODEL.GEM.MAPPING = [[0, 1]]
    cfg.MODEL.GEM.UNITS = list(DATASETS)
    with pytest.raises(ValueError, match=r"UNITS has 3 entries but MODEL.GEM.MAPPING has 1"):
        GemMapping.from_cfg(cfg)


@pytest.fixture
def class_metadata():
    MetadataCatalog.get("plan_a_train").set(thing_classes=["car", "person"])
    yield
    MetadataCatalog.remove("plan_a_train")


def test_validate_class_level_units(class_metadata):
    cfg = make_cfg()
    cfg.MODEL.GEM.PLANNER.LEVEL = "class"
    cfg.DATASETS.TRAIN = ("plan_a_train",)
    ok = GemMapping.create(["plan_a_train/car", "plan_a_train/person"], [[0], [1]], num_experts=4)
    ok.validate_cfg(cfg)
    with pytest.raises(ValueError, match=r"class 'bus' is not one of plan_a_train's classes"):
        GemMapping.create(["plan_a_train/bus"], [[0]], num_experts=4).validate_cfg(cfg)
    GemMapping.create(["plan_a_train", "plan_a_train/car"], [[0], [1]], num_experts=4).validate_cfg(cfg)  # dataset row
    with pytest.raises(ValueError, match=r"unit 'plan_b_train/car' is neither a dataset"):
        GemMapping.create(["plan_a_train/car", "plan_b_train/car"], [[0], [1]], num_experts=4).validate_cfg(cfg)
