"""GemDatasetMapper: dataset_id, class block, unified gt_classes, difficult flags, empty and unreadable images;
DINO's training augmentation (branch frequencies, sizes, boxes)."""
import numpy as np
import pytest
import torch

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T

from gem_d2.data import GemDatasetMapper, ImageReadError, UnifiedLabelSpace, register_voc_dataset
from gem_d2.data.mapper import build_train_augmentation


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


# ------------------------------------------------------------------------------------------ DINO augmentation

MULTI_SCALE = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)


class _ShapeInput:
    """An AugInput stand-in that tracks only the image size (no pixels are resized): augmentations read
    ``image.shape``; each applied transform is logged as (name, height, width) after it."""

    def __init__(self, h, w):
        self.log = []
        self._resize(h, w)

    def _resize(self, h, w):
        self.image = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), (h, w, 3), (0, 0, 0))

    def transform(self, tfm):
        h, w = self.image.shape[:2]
        for t in getattr(tfm, "transforms", [tfm]):
            if isinstance(t, T.ResizeTransform):
                h, w = t.new_h, t.new_w
            elif isinstance(t, T.CropTransform):
                h, w = t.h, t.w
            self.log.append((type(t).__name__, h, w))
        self._resize(h, w)


def _dino_cfg(data_cfg, **overrides):
    return data_cfg(**{"INPUT.MIN_SIZE_TRAIN": MULTI_SCALE, "INPUT.MAX_SIZE_TRAIN": 1333,
                       "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice", "INPUT.RANDOM_FLIP": "horizontal",
                       "INPUT.CROP_BRANCH.PROB": 0.5, **overrides})


def test_dino_augmentation_branch_frequencies_and_sizes(data_cfg):
    """Flip, then half of the time resize only, else resize to 400/500/600 -> crop [384, 600] -> resize."""
    augs = T.AugmentationList(build_train_augmentation(_dino_cfg(data_cfg)))
    np.random.seed(0)
    n, h0, w0 = 4000, 480, 640
    crops, flips, first_short, crop_h, crop_w = 0, 0, [], [], []
    for _ in range(n):
        inp = _ShapeInput(h0, w0)
        augs(inp)
        names = [name for name, _, _ in inp.log]
        flips += names[0] == "HFlipTransform"
        assert names[0] in ("HFlipTransform", "NoOpTransform")
        (_, h, w) = inp.log[-1]
        assert names[-1] == "ResizeTransform" and min(h, w) in MULTI_SCALE and max(h, w) <= 1333
        if "CropTransform" in names:
            crops += 1
            assert names[1:] == ["ResizeTransform", "CropTransform", "ResizeTransform"]
            (_, h1, w1), (_, ch, cw) = inp.log[1], inp.log[2]
            first_short.append(min(h1, w1))
            assert first_short[-1] in (400, 500, 600) and abs(w1 / h1 - w0 / h0) < 0.01
            assert 384 <= ch <= min(600, h1) and 384 <= cw <= min(600, w1)
            crop_h.append(ch)
            crop_w.append(cw)
            # the final resize starts from the crop: its aspect ratio is kept
            assert abs(w / h - cw / ch) < 0.02
        else:
            assert names[1:] == ["ResizeTransform"] and abs(w / h - w0 / h0) < 0.01
    print(f"crop branch {crops / n:.4f}, flip {flips / n:.4f}, first short side "
          f"{ {s: first_short.count(s) / crops for s in (400, 500, 600)} }, crop h [{min(crop_h)}, {max(crop_h)}], "
          f"w [{min(crop_w)}, {max(crop_w)}]")
    assert abs(crops / n - 0.5) < 0.03 and abs(flips / n - 0.5) < 0.03  # 4 sigma at n = 4000
    for s in (400, 500, 600):
        assert abs(first_short.count(s) / crops - 1 / 3) < 0.04
    # the crop sizes cover their range: h in [384, min(600, 400..600)], w in [384, 600]
    assert min(crop_h) == 384 and max(crop_h) == 600 and min(crop_w) == 384 and max(crop_w) == 600


@pytest.mark.parametrize("prob, expected", [(0.0, ["RandomFlip", "ResizeShortestEdge"]),
                                            (1.0, ["RandomFlip", "ResizeShortestEdge", "RandomCrop",
                                                   "ResizeShortestEdge"]),
                                            (0.3, ["RandomFlip", "RandomBranch"])])
def test_dino_augmentation_structure_and_errors(data_cfg, prob, expected):
    augs = build_train_augmentation(_dino_cfg(data_cfg, **{"INPUT.CROP_BRANCH.PROB": prob}))
    assert [type(a).__name__ for a in augs] == expected
    if prob == 0.3:
        assert augs[1].prob == 0.3
    with pytest.raises(ValueError, match="INPUT.CROP is not used"):
        build_train_augmentation(_dino_cfg(data_cfg, **{"INPUT.CROP.ENABLED": True}))
    with pytest.raises(ValueError, match="CROP_BRANCH.SIZE"):
        build_train_augmentation(_dino_cfg(data_cfg, **{"INPUT.CROP_BRANCH.SIZE": (600, 384)}))
    with pytest.raises(ValueError, match="CROP_BRANCH.PROB"):
        build_train_augmentation(_dino_cfg(data_cfg, **{"INPUT.CROP_BRANCH.PROB": 1.5}))


def test_crop_branch_boxes_follow_the_image(tmp_path, write_voc, registered_names, data_cfg):
    """Through the mapper with the crop branch always on, a red object painted at its box stays inside the
    mapped box (the crop may cut it; boxes are clipped to the crop)."""
    from PIL import Image, ImageDraw

    write_voc(tmp_path / "r", "train", {"r0": {"size": (320, 240), "objects": [("p", 60, 50, 220, 170, 0)],
                                               "ext": ".png"}})
    image = Image.new("RGB", (320, 240), (0, 0, 0))
    ImageDraw.Draw(image).rectangle([60, 50, 219, 169], fill=(255, 0, 0))
    image.save(tmp_path / "r" / "JPEGImages" / "r0.png")
    registered_names.append("t_red_train")
    register_voc_dataset("t_red_train", tmp_path / "r", "train", ["p"])
    cfg = data_cfg(train=["t_red_train"], **{"INPUT.MIN_SIZE_TRAIN": (96, 128), "INPUT.MAX_SIZE_TRAIN": 400,
                                             "INPUT.RANDOM_FLIP": "horizontal", "INPUT.CROP_BRANCH.PROB": 1.0})
    mapper = GemDatasetMapper(cfg, True)
    (r0,) = DatasetCatalog.get("t_red_train")
    np.random.seed(1)
    checked = 0
    for _ in range(20):
        out = mapper(r0)
        img = out["image"].numpy()
        red = (img[2] > 128) & (img[1] < 100)  # INPUT.FORMAT BGR
        if not len(out["instances"]):
            assert not red.any()  # the crop missed the object
            continue
        ys, xs = np.nonzero(red)
        x0, y0, x1, y1 = out["instances"].gt_boxes.tensor[0].tolist()
        assert abs(xs.min() - x0) <= 1.5 and abs(ys.min() - y0) <= 1.5
        assert abs(xs.max() + 1 - x1) <= 1.5 and abs(ys.max() + 1 - y1) <= 1.5
        checked += 1
    assert checked >= 10
