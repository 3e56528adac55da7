"""The VOC-layout reader: UODB parsing rules, registration, and every bad input's error or counted skip."""
import logging
import os

import pytest

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from gem_d2.data import (
    DatasetFormatError,
    UnifiedLabelSpace,
    load_voc_instances,
    register_voc_dataset,
    summarize_datasets,
)

CLASSES = ["cat", "dog"]


def _load(root, split="train", classes=CLASSES, **kw):
    return load_voc_instances(str(root), split, classes, dataset_name="t", **kw)


def test_boxes_classes_difficult_and_unknown(tmp_path, write_voc):
    write_voc(tmp_path, "train", {
        "a": {"size": (64, 48), "objects": [(" Cat ", 11, 21, 31, 41, None), ("DOG", 1, 1, 64, 48, 1),
                                            ("zebra", 5, 5, 9, 9, 0), ("Zebra", 6, 6, 9, 9, 0),
                                            ("cow", 2, 2, 8, 8, 1)]},
        "b": {"size": (50, 40), "ext": ".png", "objects": []},
    })
    records, stats = _load(tmp_path)
    assert [r["image_id"] for r in records] == ["a", "b"]
    a, b = records
    assert a["file_name"] == os.path.join(str(tmp_path), "JPEGImages", "a.jpg")
    assert b["file_name"].endswith("b.png")  # extension detected per image
    assert (a["height"], a["width"], b["height"], b["width"]) == (48, 64, 40, 50)
    assert a["dataset_name"] == "t"
    # 1-based -> 0-based on all four coordinates; names lower-cased and stripped
    assert [(x["bbox"], x["category_id"], x["difficult"]) for x in a["annotations"]] == [
        ([10.0, 20.0, 30.0, 40.0], 0, 0), ([0.0, 0.0, 63.0, 47.0], 1, 1)]
    assert all(x["bbox_mode"] == BoxMode.XYXY_ABS for x in a["annotations"])
    assert b["annotations"] == []
    assert stats.dropped_unknown == {"zebra": 2, "cow": 1} and stats.num_dropped_unknown == 3
    assert (stats.images, stats.boxes, stats.difficult, stats.clipped, stats.dropped_degenerate) == (2, 2, 1, 0, 0)


def test_size_from_image_header_and_fixed_extension(tmp_path, write_voc):
    write_voc(tmp_path, "val", {"x": {"size": (37, 23), "ext": ".png", "xml_size": False,
                                      "objects": [("dog", 3, 4, 10, 12, 0)]}})
    (records, _), = [_load(tmp_path, "val", image_ext="png")]
    assert (records[0]["height"], records[0]["width"]) == (23, 37)
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/x\.jpg.*val\.txt"):
        _load(tmp_path, "val", image_ext=".jpg")


def test_coordinate_offset_zero_reads_boxes_as_written(tmp_path, write_voc):
    write_voc(tmp_path, "train", {"a": {"objects": [("cat", 4, 5, 20, 30, 0)]}})
    records, _ = _load(tmp_path, coordinate_offset=0.0)
    assert records[0]["annotations"][0]["bbox"] == [4.0, 5.0, 20.0, 30.0]


def test_out_of_bounds_boxes_are_clipped_and_counted(tmp_path, write_voc, caplog):
    write_voc(tmp_path, "train", {"a": {"size": (64, 48), "objects": [
        ("cat", -3, 0, 70, 30, 0),  # -> [-4, -1, 69, 29] clipped to [0, 0, 63, 29]
        ("dog", 10, 10, 20, 20, 0)]}})
    with caplog.at_level(logging.WARNING):
        records, stats = _load(tmp_path)
    assert [x["bbox"] for x in records[0]["annotations"]] == [[0.0, 0.0, 63.0, 29.0], [9.0, 9.0, 19.0, 19.0]]
    assert stats.clipped == 1 and stats.boxes == 2
    assert "clipped 1 boxes" in caplog.text


def test_empty_or_inverted_boxes_are_dropped_and_counted(tmp_path, write_voc, caplog):
    write_voc(tmp_path, "train", {"a": {"size": (64, 48), "objects": [
        ("cat", 10, 10, 10, 30, 0),  # zero width
        ("cat", 30, 10, 20, 30, 0),  # xmin > xmax
        ("dog", 80, 60, 90, 70, 0),  # entirely outside: empty after clipping
        ("dog", 2, 2, 12, 12, 0)]}})
    with caplog.at_level(logging.WARNING):
        records, stats = _load(tmp_path)
    assert [x["bbox"] for x in records[0]["annotations"]] == [[1.0, 1.0, 11.0, 11.0]]
    assert stats.dropped_degenerate == 3 and stats.boxes == 1
    assert "dropped 3 boxes that were empty" in caplog.text


def test_missing_image_names_the_file(tmp_path, write_voc):
    write_voc(tmp_path, "train", {"a": {}, "b": {}})
    os.remove(tmp_path / "JPEGImages" / "b.jpg")
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/b\.jpg or b\.png.*train\.txt"):
        _load(tmp_path)


def test_missing_annotation_names_the_file(tmp_path, write_voc):
    write_voc(tmp_path, "train", {"a": {}})
    os.remove(tmp_path / "Annotations" / "a.xml")
    with pytest.raises(FileNotFoundError, match=r"Annotations/a\.xml"):
        _load(tmp_path)


def test_malformed_xml_names_the_file(tmp_path, write_voc):
    write_voc(tmp_path, "train", {"a": {}, "b": {}})
    (tmp_path / "Annotations" / "b.xml").write_text("<annotation><object><name>cat</name>")
    with pytest.raises(DatasetFormatError, match=r"Annotations/b\.xml:1: malformed XML"):
        _load(tmp_path)


@pytest.mark.parametrize("obj_xml, message", [
    ("<object><name>cat</name></object>", r"b\.xml:1: object #0 \('cat'\) has no <bndbox>"),
    ("<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>x9</xmax><ymax>5</ymax></bndbox></object>",
     r"b\.xml:1: object #0 \('cat'\) <xmax> is not a number: 'x9'"),
    ("<object><bndbox><xmin>1</xmin></bndbox></object>", r"b\.xml:1: object #0 has no <name>"),
    ("<object><name>cat</name><difficult>maybe</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
     "<ymax>5</ymax></bndbox></object>", r"b\.xml:1: object #0 <difficult> is not 0/1"),
])
def test_bad_fields_name_the_file(tmp_path, write_voc, obj_xml, message):
    write_voc(tmp_path, "train", {"b": {}})
    (tmp_path / "Annotations" / "b.xml").write_text(
        f"<annotation><size><width>64</width><height>48</height></size>{obj_xml}</annotation>")
    with pytest.raises(DatasetFormatError, match=message):
        _load(tmp_path)


def test_empty_and_missing_split_files(tmp_path, write_voc):
    write_voc(tmp_path, "train", {"a": {}})
    (tmp_path / "ImageSets" / "Main" / "empty.txt").write_text("\n  \n")
    with pytest.raises(DatasetFormatError, match=r"split file .*ImageSets/Main/empty\.txt is empty"):
        _load(tmp_path, "empty")
    with pytest.raises(FileNotFoundError, match=r"split file not found: .*ImageSets/Main/nope\.txt"):
        _load(tmp_path, "nope")


def test_corrupt_image_without_xml_size_names_the_file(tmp_path, write_voc):
    write_voc(tmp_path, "train", {"a": {"xml_size": False}})
    (tmp_path / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetFormatError, match=r"cannot read the size of image .*JPEGImages/a\.jpg"):
        _load(tmp_path)


def test_register_voc_dataset_is_lazy_and_sets_metadata(tmp_path, write_voc, registered_names):
    registered_names += ["t_pets_train", "t_pets_test"]
    root = tmp_path / "pets"
    register_voc_dataset("t_pets_train", root, "train", ["Cat", "dog"])  # nothing exists yet: lazy
    write_voc(root, "train", {"a": {"objects": [("cat", 2, 2, 9, 9, 0), ("horse", 1, 1, 5, 5, 0)]}})
    write_voc(root, "test", {"t": {"objects": [("dog", 2, 2, 9, 9, 1)]}})
    register_voc_dataset("t_pets_test", str(root), "test", ["cat", "dog"], image_ext=".jpg")
    meta = MetadataCatalog.get("t_pets_train")
    assert meta.thing_classes == ["cat", "dog"] and meta.evaluator_type == "gem_uodb"
    assert (meta.dirname, meta.split, meta.year, meta.image_ext, meta.domain) == (str(root), "train", 2007, "auto",
                                                                                  "t_pets")
    assert MetadataCatalog.get("t_pets_test").image_ext == ".jpg"
    assert not meta.load_stats.loaded
    records = DatasetCatalog.get("t_pets_train")
    assert records[0]["dataset_name"] == "t_pets_train"
    assert meta.load_stats.loaded and meta.load_stats.dropped_unknown == {"horse": 1}
    table = summarize_datasets(["t_pets_train", "t_pets_test"])
    assert "1 (horse: 1)" in table and "t_pets_test" in table
    # train and test splits share one label block through their domain
    space = UnifiedLabelSpace(["t_pets_train"])
    assert space.dataset_index("t_pets_test") == 0
    # re-registration under another root replaces the old entry (no "already registered" error)
    register_voc_dataset("t_pets_train", tmp_path / "elsewhere", "train", ["cat", "dog"])
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        DatasetCatalog.get("t_pets_train")


@pytest.mark.parametrize("classes", [[], ["cat", "Cat"], ["cat", " "]])
def test_register_rejects_bad_class_lists(tmp_path, classes):
    with pytest.raises(ValueError, match="class_names"):
        register_voc_dataset("t_bad_classes", tmp_path, "train", classes)


def test_register_rejects_bad_image_ext(tmp_path):
    with pytest.raises(ValueError, match="image_ext"):
        register_voc_dataset("t_bad_ext", tmp_path, "train", ["cat"], image_ext=".")
