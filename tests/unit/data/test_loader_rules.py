"""One set of input rules for the VOC and COCO readers: bad boxes dropped or clipped and counted, paths stay
inside their root, malformed files and duplicate ids are errors naming the file and the entry."""
import json
import logging
import os

import pytest

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode

from gem_d2.data import DatasetFormatError, load_voc_instances, register_coco_dataset, summarize_datasets
from gem_d2.data.coco import load_coco_instances, resolve_inside
from gem_d2.data.voc import VocLoadStats, validate_box

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------------------
# validate_box, the shared rule


@pytest.mark.parametrize("box, inclusive, expected, counter", [
    ([1, 2, 10, 20], True, [1, 2, 10, 20], None),
    ([NAN, 2, 10, 20], True, None, "dropped_nonfinite"),
    ([1, 2, INF, 20], False, None, "dropped_nonfinite"),
    ([1, -INF, 10, 20], True, None, "dropped_nonfinite"),
    ([5, 2, 5, 20], True, None, "dropped_degenerate"),  # zero width
    ([1, 9, 10, 2], False, None, "dropped_degenerate"),  # negative height
    ([-5, -1, 70, 30], True, [0, 0, 63, 30], "clipped"),  # VOC: the image is [0, 63] x [0, 47]
    ([-5, -1, 70, 30], False, [0, 0, 64, 30], "clipped"),  # COCO: the image is [0, 64] x [0, 48]
    ([80, 60, 90, 70], True, None, "dropped_degenerate"),  # entirely outside: empty after clipping
    ([0, 0, 64, 48], False, [0, 0, 64, 48], None),  # the whole image, continuous coordinates
])
def test_validate_box(box, inclusive, expected, counter):
    stats = VocLoadStats()
    assert validate_box(box, 64, 48, stats, pixel_inclusive=inclusive) == expected
    counts = {k: getattr(stats, k) for k in ("dropped_nonfinite", "dropped_degenerate", "clipped")}
    assert counts == {k: int(k == counter) for k in counts}
    assert stats.boxes == 0  # the caller's counter


# ---------------------------------------------------------------------------------------------------------
# VOC


def test_voc_nan_and_inf_boxes_are_dropped_and_counted(tmp_path, write_voc, caplog):
    write_voc(tmp_path, "train", {"a": {"size": (64, 48), "objects": [
        ("cat", NAN, 2, 10, 20, 0), ("cat", 2, 2, INF, 20, 0), ("dog", 2, -INF, 10, 20, 0),
        ("dog", 3, 3, 12, 12, 0), ("cat", -3, 0, 70, 30, 0), ("cat", 9, 9, 5, 20, 0)]}})
    with caplog.at_level(logging.WARNING):
        records, stats = load_voc_instances(str(tmp_path), "train", ["cat", "dog"])
    assert [a["bbox"] for a in records[0]["annotations"]] == [[2.0, 2.0, 11.0, 11.0], [0.0, 0.0, 63.0, 29.0]]
    assert (stats.boxes, stats.dropped_nonfinite, stats.dropped_degenerate, stats.clipped) == (2, 3, 1, 1)
    assert "dropped 3 boxes with a NaN or infinite coordinate" in caplog.text


@pytest.mark.parametrize("size", ["<width>nan</width><height>48</height>", "<width>64</width><height>inf</height>"])
def test_voc_non_finite_image_size_names_the_file(tmp_path, write_voc, size):
    write_voc(tmp_path, "train", {"a": {}})
    (tmp_path / "Annotations" / "a.xml").write_text(f"<annotation><size>{size}</size></annotation>")
    with pytest.raises(DatasetFormatError, match=r"Annotations/a\.xml:1: <size> is not finite"):
        load_voc_instances(str(tmp_path), "train", ["cat"])


def test_voc_duplicate_ids_in_a_split_are_rejected(tmp_path, write_voc):
    write_voc(tmp_path, "train", {"a": {}, "b": {}})
    with open(tmp_path / "ImageSets" / "Main" / "train.txt", "a") as f:
        f.write("\na\n")
    with pytest.raises(DatasetFormatError, match=r"train\.txt: image id 'a' is listed twice \(lines 1 and 4\)"):
        load_voc_instances(str(tmp_path), "train", ["cat"])


@pytest.mark.parametrize("image_id", ["../a", "sub/a", ".."])
def test_voc_ids_must_not_leave_the_root(tmp_path, write_voc, image_id):
    write_voc(tmp_path, "train", {"a": {}})
    (tmp_path / "ImageSets" / "Main" / "bad.txt").write_text(f"a\n{image_id}\n")
    with pytest.raises(DatasetFormatError, match=rf"bad\.txt, line 2: image id '{image_id}' is not a plain file"):
        load_voc_instances(str(tmp_path), "bad", ["cat"])


# ---------------------------------------------------------------------------------------------------------
# COCO


def _coco(tmp_path, annotations=None, images=None, categories=None, name="instances.json", raw=None):
    """Write a COCO JSON under tmp_path; returns (json path, image root). Images are not read by the loaders."""
    root = tmp_path / "images"
    if images is None:
        images = [{"id": 1, "file_name": "a.jpg", "height": 48, "width": 64},
                  {"id": 2, "file_name": "sub/b.jpg", "height": 48, "width": 64}]
    if categories is None:
        categories = [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}]
    if annotations is None:
        annotations = [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 20], "iscrowd": 0},
                       {"id": 11, "image_id": 2, "category_id": 1, "bbox": [5.5, 6, 7, 8]}]
    path = tmp_path / name
    path.write_text(raw if raw is not None else json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return str(path), str(root)


def test_coco_records_match_detectron2_on_a_valid_file(tmp_path):
    json_file, root = _coco(tmp_path)
    records, stats, classes, id_map = load_coco_instances(json_file, root)
    assert classes == ["dog", "cat"] and id_map == {1: 0, 3: 1}
    reference = load_coco_json(json_file, root, "t_coco_reference")
    MetadataCatalog.remove("t_coco_reference")
    assert records == reference
    assert records[1]["file_name"] == os.path.join(root, "sub/b.jpg")
    assert (stats.images, stats.boxes, stats.clipped, stats.loaded) == (2, 2, 0, True)


def test_coco_bad_boxes_are_dropped_clipped_and_counted(tmp_path, caplog):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [NAN, 2, 10, 20]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 2, INF, 20]},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 2, 0, 20]},  # zero width
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, -3]},  # negative height
            {"id": 5, "image_id": 1, "category_id": 3, "bbox": [-4, 40, 10, 20]},  # -> [0, 40, 6, 8]
            {"id": 6, "image_id": 1, "category_id": 3, "bbox": [70, 10, 5, 5]},  # outside: empty after clipping
            {"id": 7, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1},
            {"id": 8, "image_id": 99, "category_id": 3, "bbox": [1, 1, 5, 5]}]  # no such image
    json_file, root = _coco(tmp_path, annotations=anns)
    with caplog.at_level(logging.WARNING):
        records, stats, _, _ = load_coco_instances(json_file, root, "t")
    assert [(a["bbox"], a["category_id"]) for a in records[0]["annotations"]] == [([0.0, 40.0, 6.0, 8.0], 1)]
    assert records[1]["annotations"] == [{"bbox": [1.0, 1.0, 5.0, 5.0], "bbox_mode": BoxMode.XYWH_ABS,
                                          "category_id": 1, "iscrowd": 1}]
    assert (stats.boxes, stats.dropped_nonfinite, stats.dropped_degenerate, stats.clipped) == (2, 2, 3, 1)
    assert (stats.dropped_no_image, stats.difficult) == (1, 1)
    assert "dropped 2 boxes with a NaN or infinite coordinate" in caplog.text
    assert "1 annotations whose image_id is not in the file" in caplog.text


def test_coco_json_nan_literal_is_a_dropped_box(tmp_path):
    text = ('{"images": [{"id": 1, "file_name": "a.jpg", "height": 48, "width": 64}], "categories": '
            '[{"id": 1, "name": "cat"}], "annotations": [{"id": 1, "image_id": 1, "category_id": 1, '
            '"bbox": [NaN, 1, 2, 3]}, {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, Infinity, 3]}]}')
    json_file, root = _coco(tmp_path, images=[{"id": 1, "file_name": "a.jpg"}], raw=text)
    records, stats, _, _ = load_coco_instances(json_file, root)
    assert records[0]["annotations"] == [] and stats.dropped_nonfinite == 2


@pytest.mark.parametrize("file_name", ["../a.jpg", "sub/../../a.jpg", "/etc/passwd", ".", ""])
def test_coco_file_names_must_stay_in_the_image_root(tmp_path, file_name):
    images = [{"id": 1, "file_name": "a.jpg", "height": 48, "width": 64},
              {"id": 7, "file_name": file_name, "height": 48, "width": 64}]
    json_file, root = _coco(tmp_path, images=images, annotations=[])
    with pytest.raises(DatasetFormatError, match=r"instances\.json: image id 7 \(images\[1\]\): '?file_name"):
        load_coco_instances(json_file, root)


def test_coco_absolute_path_inside_the_root_is_fine(tmp_path):
    root = tmp_path / "images"
    images = [{"id": 1, "file_name": str(root / "a.jpg"), "height": 48, "width": 64}]
    json_file, root = _coco(tmp_path, images=images, annotations=[])
    (records, *_) = load_coco_instances(json_file, root)
    assert records[0]["file_name"] == os.path.join(root, "a.jpg")
    assert resolve_inside(root, "x/../y.jpg") == os.path.join(root, "x/../y.jpg")
    assert resolve_inside(root, "x/../../y.jpg") is None


def test_coco_malformed_json_names_the_file(tmp_path):
    json_file, root = _coco(tmp_path, raw='{"images": [}')
    with pytest.raises(DatasetFormatError, match=r"malformed JSON in .*instances\.json: .*line 1 column"):
        load_coco_instances(json_file, root)


@pytest.mark.parametrize("ann, message", [
    ({"id": 5, "image_id": 1, "category_id": 1}, r"annotation id 5 \(annotations\[0\]\): no 'bbox'"),
    ({"id": 5, "image_id": 1, "category_id": 1, "bbox": "1 2 3 4"}, r"annotation id 5 .*'bbox' must be 4 numbers"),
    ({"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}, r"'bbox' must be 4 numbers"),
    ({"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, "2", 3, 4]}, r"'bbox' must be 4 numbers"),
    ({"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, None, 3, 4]}, r"'bbox' must be 4 numbers"),
    ({"id": 5, "image_id": 1, "category_id": 1, "bbox": [True, 2, 3, 4]}, r"'bbox' must be 4 numbers"),
    ({"id": 5, "image_id": 1, "category_id": "1", "bbox": [1, 2, 3, 4]}, r"category_id '1' is not an id"),
    ({"id": 5, "image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4]}, r"category_id 2 is not an id of .*\[1, 3\]"),
    ({"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 2}, r"'iscrowd' must be 0 or 1"),
    ({"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "ignore": 1}, r"'ignore' is not supported"),
    ({"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}, r"annotations\[0\] has no integer or string 'id'"),
    ([1, 2], r"annotations\[0\] is a list"),
])
def test_coco_bad_annotations_name_the_file_and_the_annotation(tmp_path, ann, message):
    json_file, root = _coco(tmp_path, annotations=[ann])
    with pytest.raises(DatasetFormatError, match=r"instances\.json: .*" + message):
        load_coco_instances(json_file, root)


@pytest.mark.parametrize("images, message", [
    ({"id": 1}, r"'images' is a dict, expected a list"),
    ([{"file_name": "a.jpg", "height": 48, "width": 64}], r"images\[0\] has no integer or string 'id'"),
    ([{"id": 1, "file_name": "a.jpg", "height": "48", "width": 64}], r"image id 1 .*'height' must be a positive"),
    ([{"id": 1, "file_name": "a.jpg", "height": 48, "width": 0}], r"'width' must be a positive integer"),
    ([{"id": 1, "file_name": "a.jpg", "height": 48.5, "width": 64}], r"'height' must be a positive integer"),
    ([{"id": 1, "file_name": 3, "height": 48, "width": 64}], r"'file_name' must be a non-empty string"),
])
def test_coco_bad_images_name_the_file_and_the_image(tmp_path, images, message):
    json_file, root = _coco(tmp_path, images=images, annotations=[])
    with pytest.raises(DatasetFormatError, match=r"instances\.json: .*" + message):
        load_coco_instances(json_file, root)


def test_coco_bad_top_level_and_categories(tmp_path):
    json_file, root = _coco(tmp_path, raw="[1, 2]")
    with pytest.raises(DatasetFormatError, match=r"instances\.json: the top level is a list"):
        load_coco_instances(json_file, root)
    json_file, root = _coco(tmp_path, raw='{"images": []}')
    with pytest.raises(DatasetFormatError, match=r"instances\.json: no 'categories' list"):
        load_coco_instances(json_file, root)
    for cats, message in (([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], r"duplicate category id 1"),
                          ([{"id": "1", "name": "a"}], r"categories\[0\] must be an object with an integer 'id'"),
                          ([], r"'categories' is empty")):
        json_file, root = _coco(tmp_path, categories=cats, annotations=[])
        with pytest.raises(DatasetFormatError, match=r"instances\.json: " + message):
            load_coco_instances(json_file, root)


def test_coco_duplicate_image_ids_are_rejected(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "height": 48, "width": 64},
              {"id": 1, "file_name": "b.jpg", "height": 48, "width": 64}]
    json_file, root = _coco(tmp_path, images=images, annotations=[])
    message = r"instances\.json: duplicate image id 1 \(images\[0\] and images\[1\]\)"
    with pytest.raises(DatasetFormatError, match=message):
        load_coco_instances(json_file, root)


def test_coco_duplicate_annotation_ids_are_named_as_such(tmp_path, registered_names):
    anns = [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 20]},
            {"id": 10, "image_id": 2, "category_id": 1, "bbox": [1, 2, 10, 20]}]
    json_file, root = _coco(tmp_path, annotations=anns)
    message = r"instances\.json: duplicate annotation id 10 \(annotations\[0\] and annotations\[1\]\)"
    with pytest.raises(DatasetFormatError, match=message):
        load_coco_instances(json_file, root)
    # through the registered dataset: the same message, not a category mismatch
    registered_names.append("t_dupann_train")
    register_coco_dataset("t_dupann_train", json_file, root, class_names=["dog", "cat"])
    with pytest.raises(DatasetFormatError, match=message):
        DatasetCatalog.get("t_dupann_train")
    # COCO 2014 minival files repeat annotation ids; detectron2 accepts them there, and so do we
    json_file, root = _coco(tmp_path, annotations=anns, name="instances_minival2014.json")
    records, stats, _, _ = load_coco_instances(json_file, root)
    assert stats.boxes == 2


def test_coco_load_stats_in_metadata_and_summary(tmp_path, registered_names):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [NAN, 2, 10, 20]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [60, 2, 10, 20]},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [1, 2, 0, 20]},
            {"id": 4, "image_id": 99, "category_id": 1, "bbox": [1, 2, 10, 20]}]
    json_file, root = _coco(tmp_path, annotations=anns)
    registered_names.append("t_cstats_train")
    register_coco_dataset("t_cstats_train", json_file, root)
    meta = MetadataCatalog.get("t_cstats_train")
    assert not meta.load_stats.loaded and meta.json_file == json_file and meta.image_root == root
    records = DatasetCatalog.get("t_cstats_train")
    assert records[0]["dataset_name"] == "t_cstats_train"
    assert meta.thing_classes == ["dog", "cat"] and meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1}
    st = meta.load_stats
    assert (st.loaded, st.images, st.boxes, st.dropped_nonfinite, st.clipped, st.dropped_degenerate) == (
        True, 2, 1, 1, 1, 1)
    assert st.dropped_no_image == 1
    header, _, row = summarize_datasets(["t_cstats_train"]).splitlines()
    assert [c.strip() for c in header.strip("|").split("|")][5:] == [
        "dropped unknown", "clipped", "dropped degenerate", "dropped non-finite", "dropped no image"]
    assert [c.strip() for c in row.strip("|").split("|")][1:] == ["2", "1", "0", "2", "0", "1", "1", "1", "1"]
