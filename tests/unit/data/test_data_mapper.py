"""GemDatasetMapper: dataset_id, class block, unified gt_classes, difficult flags, empty and unreadable images."""
import pytest
import torch

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T

from gem_d2.data import GemDatasetMapper, ImageReadError, UnifiedLabelSpace, register_voc_dataset


@pytest.fixture
def two_datasets(tmp_path, write_voc, registered_names):
    """t_ma (3 classes) and t_mb (2 classes); t_mb has an image with two objects and an empty image."""
    write_voc(tmp_path / "a", "train", {"a0": {"size": (64, 48), "objects": [("z", 1, 1, 11, 11, 0)]}})
    write_voc(tmp_path / "b", "train", {
        "b0": {"size": (128, 96), "objects": [("q", 11, 21, 51, 61, 1), ("p", 1, 1, 33, 17, 0)]},
        "b1": {"size": (128, 96), "objects": []},
    })
    write_voc(tmp_path / "b", "test", {"b2": {"size": (128, 96), "objects": [("p", 2, 2, 20, 20, 0)]}})
    registered_names += ["t_ma_train", "t_mb_train", "t_mb_test"]
    register_voc_dataset("t_ma_train", tmp_path / "a", "train", ["x", "y", "z"])
    register_voc_dataset("t_mb_train", tmp_path / "b", "train", ["p", "q"])
    register_voc_dataset("t_mb_test", tmp_path / "b", "test", ["p", "q"])
    return tmp_path


def _mapper(data_cfg, is_train=True):
    cfg = data_cfg(train=["t_ma_train", "t_mb_train"], test=["t_mb_test"])
    return GemDatasetMapper(cfg, is_train)


def test_training_output(two_datasets, data_cfg):
    mapper = _mapper(data_cfg)
    b0, b1 = DatasetCatalog.get("t_mb_train")
    out = mapper(b0)
    assert out["dataset_id"] == 1 and out["dataset_name"] == "t_mb_train" and out["class_block"] == (3, 5)
    # short side 96 -> 64: scale 2/3 (the config's MIN_SIZE_TRAIN), CHW uint8 image
    assert tuple(out["image"].shape) == (3, 64, 85)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [4, 3]  # q = local 1 -> 3 + 1; p = local 0 -> 3
    assert inst.gt_difficult.tolist() == [True, False]
    expected = torch.tensor([[10, 20, 50, 60], [0, 0, 32, 16]], dtype=torch.float32)
    expected[:, 0::2] *= 85 / 128
    expected[:, 1::2] *= 64 / 96
    assert torch.allclose(inst.gt_boxes.tensor, expected, atol=1e-4)
    assert b0["annotations"][0]["category_id"] == 1  # the input record is not modified
    empty = mapper(b1)
    assert len(empty["instances"]) == 0 and empty["instances"].gt_classes.dtype == torch.int64
    assert empty["instances"].gt_difficult.dtype == torch.bool and empty["dataset_id"] == 1
    (a0,) = DatasetCatalog.get("t_ma_train")
    out_a = mapper(a0)
    assert out_a["dataset_id"] == 0 and out_a["class_block"] == (0, 3) and out_a["instances"].gt_classes.tolist() == [2]


def test_flip_keeps_classes_and_difficult_aligned(two_datasets):
    space = UnifiedLabelSpace(["t_ma_train", "t_mb_train"])
    mapper = GemDatasetMapper(True, augmentations=[T.RandomFlip(prob=1.0)], image_format="BGR", label_space=space)
    b0, _ = DatasetCatalog.get("t_mb_train")
    inst = mapper(b0)["instances"]
    assert inst.gt_classes.tolist() == [4, 3] and inst.gt_difficult.tolist() == [True, False]
    assert inst.gt_boxes.tensor.tolist() == [[78.0, 20.0, 118.0, 60.0], [96.0, 0.0, 128.0, 16.0]]  # x -> 128 - x


def test_test_mapper_sets_dataset_id_without_instances(two_datasets, data_cfg):
    mapper = _mapper(data_cfg, is_train=False)
    (b2,) = DatasetCatalog.get("t_mb_test")
    out = mapper(b2)
    assert out["dataset_id"] == 1 and out["class_block"] == (3, 5) and out["dataset_name"] == "t_mb_test"
    assert "instances" not in out and "annotations" not in out
    assert (out["height"], out["width"]) == (96, 128) and tuple(out["image"].shape) == (3, 64, 85)


def test_corrupt_and_missing_images_name_the_file(two_datasets, data_cfg):
    mapper = _mapper(data_cfg)
    (a0,) = DatasetCatalog.get("t_ma_train")
    (two_datasets / "a" / "JPEGImages" / "a0.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageReadError, match=r"cannot read image .*a/JPEGImages/a0\.jpg"):
        mapper(a0)
    (two_datasets / "a" / "JPEGImages" / "a0.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*a0\.jpg"):
        mapper(a0)


def test_bad_records(two_datasets, data_cfg):
    mapper = _mapper(data_cfg)
    (a0,) = DatasetCatalog.get("t_ma_train")
    with pytest.raises(ValueError, match="has no 'dataset_name'"):
        mapper({k: v for k, v in a0.items() if k != "dataset_name"})
    with pytest.raises(KeyError, match="'t_other' is not registered"):
        mapper(dict(a0, dataset_name="t_other"))
    bad = dict(a0, annotations=[dict(a0["annotations"][0], category_id=3)])
    with pytest.raises(ValueError, match=r"a0.jpg: category ids of dataset 't_ma_train' "
                                         r"must lie in \[0, 3\), got values in \[3, 3\]"):
        mapper(bad)
