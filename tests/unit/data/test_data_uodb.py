"""Every UODB dataset registered against a small fixture tree in the real layout (jpg, png and COCO JSON).

Expected values come from the UODB reference code (docs/design/data.md), written out here independently of
gem_d2.data.uodb: folder, class count, first/last class, train/test split names, image extension and the
value the reference loader subtracts from the XML coordinates.
"""
import json
import os

import pytest

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.structures import BoxMode

from gem_d2.data import UnifiedLabelSpace, datasets_root, register_uodb, summarize_datasets, uodb_dataset_names

# key: (folder, n classes, first class, last class, train split, test split, ext, coordinate offset)
EXPECTED = {
    "kitti": ("KITTI", 3, "pedestrian", "car", "train", "val", ".jpg", 1),
    "widerface": ("WiderFace", 1, "face", "face", "train", "val", ".jpg", 0),
    "lisa": ("LISA", 4, "warning", "stop", "train", "test", ".png", 0),
    "dota": ("DOTA", 15, "plane", "helicopter", "train", "val", ".jpg", 0),
    "watercolor": ("watercolor", 20, "aeroplane", "tvmonitor", "train", "test", ".jpg", 1),
    "clipart": ("clipart", 20, "aeroplane", "tvmonitor", "train", "test", ".jpg", 1),
    "comic": ("comic", 20, "aeroplane", "tvmonitor", "train", "test", ".jpg", 1),
    "kitchen": ("Kitchen", 11, "coca_cola_glass_bottle", "red_bull", "train", "test", ".png", 1),
    "deeplesion": ("DeepLesion", 1, "lesion", "lesion", "trainval", "test", ".png", 0),
}


def _objects(first, last):
    # (name as written, xmin, ymin, xmax, ymax, difficult); the unknown one must be dropped
    return [(first.upper() + " ", 11, 21, 31, 41, None), ("mystery_thing", 2, 2, 9, 9, 0), (last, 5, 6, 40, 30, 1)]


@pytest.fixture(scope="module")
def uodb_root(tmp_path_factory, write_voc):
    """A UODB tree with 1 image per split of every dataset; all of UODB is registered under it meanwhile."""
    root = tmp_path_factory.mktemp("uodb")
    for key, (folder, _, first, last, train, test, ext, _) in EXPECTED.items():
        for split in (train, test):
            image = {"ext": ext, "objects": _objects(first, last)}
            write_voc(root / folder, split, {f"{key}_{split}_1": image})
    for year, splits in (("VOC2007", ("trainval", "test")), ("VOC2012", ("trainval",))):
        for split in splits:
            write_voc(root / year, split, {f"{year}_{split}": {"objects": _objects("aeroplane", "tvmonitor")}})
    coco = root / "coco"
    os.makedirs(coco / "images" / "val2014")
    os.makedirs(coco / "annotations")
    from PIL import Image
    for split, image_id in (("valminusminival", 7), ("minival", 8)):
        file_name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.new("RGB", (64, 48)).save(coco / "images" / "val2014" / file_name)
        cats = [{"id": c["id"], "name": c["name"], "supercategory": ""} for c in COCO_CATEGORIES if c["isthing"]]
        anns = [{"id": 1, "image_id": image_id, "category_id": 1, "bbox": [3, 4, 10, 20], "area": 200, "iscrowd": 0},
                {"id": 2, "image_id": image_id, "category_id": 90, "bbox": [30, 5, 8, 9], "area": 72, "iscrowd": 0}]
        data = {"images": [{"id": image_id, "file_name": file_name, "height": 48, "width": 64}],
                "annotations": anns, "categories": cats}
        (coco / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    register_uodb(str(root))
    yield root
    register_uodb(datasets_root())


def test_all_eleven_datasets_have_a_train_and_a_test_split():
    names = uodb_dataset_names()
    assert len(names) == 22
    assert set(uodb_dataset_names("train")) == {
        "uodb_kitti_train", "uodb_widerface_train", "uodb_voc_trainval", "uodb_lisa_train", "uodb_dota_train",
        "uodb_coco_valminusminival", "uodb_watercolor_train", "uodb_clipart_train", "uodb_comic_train",
        "uodb_kitchen_train", "uodb_deeplesion_trainval"}
    assert set(uodb_dataset_names("test")) == {
        "uodb_kitti_val", "uodb_widerface_val", "uodb_voc_test", "uodb_lisa_test", "uodb_dota_val",
        "uodb_coco_minival", "uodb_watercolor_test", "uodb_clipart_test", "uodb_comic_test", "uodb_kitchen_test",
        "uodb_deeplesion_test"}
    assert set(names) <= set(DatasetCatalog.list())  # registered at import


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_voc_layout_datasets(uodb_root, key):
    folder, n_classes, first, last, train, test, ext, offset = EXPECTED[key]
    for split in (train, test):
        name = f"uodb_{key}_{split}"
        meta = MetadataCatalog.get(name)
        assert len(meta.thing_classes) == n_classes
        assert (meta.thing_classes[0], meta.thing_classes[-1]) == (first, last)
        assert (meta.evaluator_type, meta.year, meta.split, meta.domain) == ("gem_uodb", 2007, split, f"uodb_{key}")
        assert meta.dirname == os.path.join(str(uodb_root), folder)
        (record,) = DatasetCatalog.get(name)
        assert record["file_name"] == os.path.join(str(uodb_root), folder, "JPEGImages", f"{key}_{split}_1{ext}")
        assert record["dataset_name"] == name
        got = [(a["bbox"], a["category_id"], a["difficult"]) for a in record["annotations"]]
        assert got == [([11.0 - offset, 21.0 - offset, 31.0 - offset, 41.0 - offset], 0, 0),
                       ([5.0 - offset, 6.0 - offset, 40.0 - offset, 30.0 - offset], n_classes - 1, 1)]
        assert meta.load_stats.dropped_unknown == {"mystery_thing": 1}


def test_voc_0712_trainval_and_voc07_test(uodb_root):
    records = DatasetCatalog.get("uodb_voc_trainval")
    assert [r["image_id"] for r in records] == ["VOC2007/VOC2007_trainval", "VOC2012/VOC2012_trainval"]
    assert records[1]["file_name"] == os.path.join(str(uodb_root), "VOC2012", "JPEGImages", "VOC2012_trainval.jpg")
    for r in records:
        assert [(a["bbox"], a["category_id"]) for a in r["annotations"]] == [([10.0, 20.0, 30.0, 40.0], 0),
                                                                           ([4.0, 5.0, 39.0, 29.0], 19)]
    (test,) = DatasetCatalog.get("uodb_voc_test")
    assert test["image_id"] == "VOC2007_test"
    assert MetadataCatalog.get("uodb_voc_test").dirname == os.path.join(str(uodb_root), "VOC2007")
    assert MetadataCatalog.get("uodb_voc_trainval").load_stats.dropped_unknown == {"mystery_thing": 2}


def test_coco_json_datasets(uodb_root):
    for split, image_id in (("valminusminival", 7), ("minival", 8)):
        name = f"uodb_coco_{split}"
        (record,) = DatasetCatalog.get(name)
        meta = MetadataCatalog.get(name)
        assert len(meta.thing_classes) == 80 and meta.thing_classes[0] == "person"
        assert meta.thing_classes[-1] == "toothbrush" and meta.evaluator_type == "gem_uodb"
        assert record["image_id"] == image_id and record["dataset_name"] == name
        assert record["file_name"] == os.path.join(str(uodb_root), "coco", "images", "val2014",
                                                   f"COCO_val2014_{image_id:012d}.jpg")
        # COCO ids 1 (person) and 90 (toothbrush) -> contiguous 0 and 79; boxes stay XYWH
        assert [(a["bbox"], a["bbox_mode"], a["category_id"]) for a in record["annotations"]] == [
            ([3, 4, 10, 20], BoxMode.XYWH_ABS, 0), ([30, 5, 8, 9], BoxMode.XYWH_ABS, 79)]


def test_all_uodb_label_space_blocks(uodb_root):
    space = UnifiedLabelSpace(uodb_dataset_names("train"))
    sizes = {"kitti": 3, "widerface": 1, "voc": 20, "lisa": 4, "dota": 15, "coco": 80, "watercolor": 20,
             "clipart": 20, "comic": 20, "kitchen": 11, "deeplesion": 1}
    assert space.num_classes == sum(sizes.values()) == 195
    for name in uodb_dataset_names("test"):
        key = name.split("_")[1]
        start, stop = space.block_of(name)
        assert stop - start == sizes[key]
    assert "mystery_thing: 1" in summarize_datasets(["uodb_kitti_train"])


def test_missing_root_fails_only_when_read(uodb_root, tmp_path):
    register_uodb(str(tmp_path / "nowhere"))
    try:
        with pytest.raises(FileNotFoundError, match=r"nowhere/KITTI/ImageSets/Main/train\.txt"):
            DatasetCatalog.get("uodb_kitti_train")
        with pytest.raises(FileNotFoundError, match=r"nowhere/coco/annotations/instances_minival2014\.json"):
            DatasetCatalog.get("uodb_coco_minival")
    finally:
        register_uodb(str(uodb_root))
