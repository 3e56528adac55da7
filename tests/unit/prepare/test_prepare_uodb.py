"""tools/prepare_uodb.py and gem_d2.prepare: tiny fixtures in each original format, written here, are
converted and read back through the registered ``uodb_*`` datasets; malformed sources, interruption,
re-runs and ``--check`` are exercised on them."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from gem_d2 import prepare as prep
from gem_d2.data.uodb import COCO_CLASSES, VOC_CLASSES, register_uodb
from gem_d2.prepare import SourceFormatError
from gem_d2.prepare import cli as prepare_cli
from gem_d2.prepare.deeplesion import window_to_uint8
from gem_d2.prepare.dota import clip_polygon, patch_starts, polygon_area
from gem_d2.prepare.lisa import lisa_class
from gem_d2.prepare.splits import hash_split

ROOT = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------- fixtures in the original formats


def _image(path, width, height, value=90, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (height, width) if mode == "L" else (height, width, 3)
    arr = np.full(shape, value, np.uint8)
    arr[: height // 2] = 200  # two flat bands: tiny files, still a real image
    Image.fromarray(arr).save(path)


def _text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _voc_xml(objects, width, height):
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
        f"<xmax>{c}</xmax><ymax>{e}</ymax></bndbox></object>" for n, a, b, c, e, d in objects)
    return (f"<annotation><folder>x</folder><filename>x</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{objs}</annotation>")


def make_kitti(src):
    k = src / "KITTI"
    labels = {
        "000000": "Car 0.00 0 -1.5 10.00 5.00 40.00 40.00 1.5 1.6 3.9 1.0 1.7 20.0 -1.5\n"
                  "Van 0.00 0 -1.5 42.00 2.00 60.00 40.00 1.5 1.6 3.9 1.0 1.7 20.0 -1.5\n"
                  "DontCare -1 -1 -10 1.00 1.00 5.00 5.00 -1 -1 -1 -1000 -1000 -1000 -10\n",
        "000001": "Pedestrian 0.00 3 0.2 4.00 4.00 14.00 44.00 1.7 0.6 0.8 2.0 1.6 10.0 0.1\n"
                  "Tram 0.00 0 0.2 20.00 4.00 50.00 30.00 3.0 2.5 15.0 2.0 1.6 30.0 0.1\n",
        "000002": "Cyclist 0.00 0 0.2 30.00 10.00 50.00 45.00 1.7 0.6 1.8 2.0 1.6 10.0 0.1\n"
                  "Person_sitting 0.00 0 0.2 2.00 1.00 12.00 40.00 1.2 0.6 0.8 2.0 1.6 10.0 0.1\n",
    }
    for i, text in labels.items():
        _text(k / "training" / "label_2" / f"{i}.txt", text)
        _image(k / "training" / "image_2" / f"{i}.png", 64, 48)
    _text(k / "ImageSets" / "train.txt", "000000\n000002\n")
    _text(k / "ImageSets" / "val.txt", "000001\n")


def make_widerface(src):
    w = src / "WiderFace"
    _text(w / "wider_face_split" / "wider_face_train_bbx_gt.txt",
          "0--Parade/0_Parade_a_1.jpg\n2\n3 4 10 12 0 0 0 0 0 0 \n20 5 0 8 0 0 0 0 0 0 \n"
          "0--Parade/0_Parade_b_2.jpg\n0\n0 0 0 0 0 0 0 0 0 0 \n"
          "1--Handshaking/1_Hand_c_3.jpg\n1\n30 20 40 30 0 0 0 1 0 0 \n")
    _text(w / "wider_face_split" / "wider_face_val_bbx_gt.txt", "2--Demo/2_Demo_d_4.jpg\n1\n1 2 5 6 1 0 0 0 0 0 \n")
    for split, rel in (("train", "0--Parade/0_Parade_a_1.jpg"), ("train", "0--Parade/0_Parade_b_2.jpg"),
                       ("train", "1--Handshaking/1_Hand_c_3.jpg"), ("val", "2--Demo/2_Demo_d_4.jpg")):
        _image(w / f"WIDER_{split}" / "images" / rel, 60, 40)


def _voc_folder(root, ids_by_split, objects_by_id, ext=".jpg"):
    for image_id, objs in objects_by_id.items():
        _text(root / "Annotations" / f"{image_id}.xml", _voc_xml(objs, 50, 40))
        _image(root / "JPEGImages" / f"{image_id}{ext}", 50, 40)
    for split, ids in ids_by_split.items():
        _text(root / "ImageSets" / "Main" / f"{split}.txt", "".join(i + "\n" for i in ids))


def make_voc(src):
    d = src / "VOCdevkit"
    _voc_folder(d / "VOC2007", {"trainval": ["000005", "000007"], "train": ["000005"], "test": ["000001"]},
                {"000005": [("chair", 2, 3, 20, 30, 0), ("Person", 5, 5, 10, 10, 1)],
                 "000007": [("car", 1, 1, 50, 40, 0)], "000001": [("dog", 10, 10, 30, 30, 0)]})
    _voc_folder(d / "VOC2012", {"trainval": ["2008_000002"]}, {"2008_000002": [("tvmonitor", 3, 4, 30, 20, 0)]})


def make_art(src, key):
    _voc_folder(src / key, {"train": [f"{key}1"], "test": [f"{key}2"]},
                {f"{key}1": [("bicycle", 2, 2, 20, 20, 0)], f"{key}2": [("person", 3, 3, 30, 30, 0)]})


LISA_HEADER = ("Filename;Annotation tag;Upper left corner X;Upper left corner Y;Lower right corner X;"
               "Lower right corner Y;Origin file;Origin frame number;Origin track;Origin track frame number\n")


def make_lisa(src):
    lisa = src / "LISA"
    rows = [("clipA/stop_1.png", "stop", 5, 6, 20, 22), ("clipA/stop_1.png", "yield", 30, 5, 40, 15),
            ("clipA/sl_2.png", "speedLimit35", 2, 2, 12, 14), ("clipB/w_3.png", "curveLeft", 10, 10, 30, 30),
            ("clipC/nt_4.png", "noLeftTurn", 1, 1, 9, 9), ("clipD/r_5.png", "rampSpeedAdvisory45", 4, 4, 14, 14)]
    _text(lisa / "allAnnotations.csv",
          LISA_HEADER + "".join(f"{f};{t};{a};{b};{c};{d};x.avi;1;x.avi;1\n" for f, t, a, b, c, d in rows))
    for f in sorted({r[0] for r in rows}):
        _image(lisa / f, 48, 32)


def make_dota(src):
    d = src / "DOTA"
    # train scene 1000 x 900 -> patch starts x [0, 200], y [0, 100]: four 800 px patches
    _text(d / "train" / "labelTxt" / "P0001.txt",
          "imagesource:GoogleEarth\ngsd:0.15\n"
          "10 10 60 10 60 40 10 40 plane 0\n"            # in every patch that covers (10..60, 10..40)
          "700 300 900 300 900 340 700 340 ship 0\n"     # 50% inside the x=0 patches -> difficult there
          "799 500 801 500 801 510 799 510 small-vehicle 0\n"  # 1 px leftovers in the x=0 patches
          "100 600 140 600 140 640 100 640 container-crane 0\n")  # DOTA v1.5 class: dropped
    _image(d / "train" / "images" / "P0001.png", 1000, 900)
    _text(d / "val" / "labelTxt" / "P0002.txt", "5 5 25 5 25 25 5 25 harbor 0\n")
    _image(d / "val" / "images" / "P0002.png", 300, 200)


def make_coco(src):
    c = src / "coco"
    cats = [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(COCO_CLASSES)]

    def write(name, images, anns):
        _text(c / "annotations" / name, json.dumps({"images": images, "annotations": anns, "categories": cats}))

    ims = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 64, "height": 48} for i in (42, 73, 74)]
    for im in ims:
        _image(c / "val2014" / im["file_name"], 64, 48)
    write("instances_valminusminival2014.json", ims[:2],
          [{"id": 1, "image_id": 42, "category_id": 1, "bbox": [2, 3, 10, 20], "area": 200, "iscrowd": 0},
           {"id": 2, "image_id": 73, "category_id": 3, "bbox": [5, 5, 30, 30], "area": 900, "iscrowd": 0}])
    write("instances_minival2014.json", ims[2:],
          [{"id": 3, "image_id": 74, "category_id": 18, "bbox": [1, 1, 20, 20], "area": 400, "iscrowd": 0}])


def make_kitchen(src):
    k = src / "GMU_Kitchens"
    for scene in (1, 2, 3, 4, 5):
        sdir = k / f"gmu_scene_{scene:03d}"
        _text(sdir / "Annotations" / "rgb_1.xml",
              _voc_xml([("red_bull", 11, 21, 31, 41, 0), ("not_a_product", 1, 1, 5, 5, 0)], 64, 48))
        _image(sdir / "Images" / "rgb_1.png", 64, 48)


def make_deeplesion(src):
    d = src / "DeepLesion"
    header = ("File_name,Patient_index,Study_index,Series_ID,Key_slice_index,Measurement_coordinates,Bounding_boxes,"
              "Lesion_diameters_Pixel_,Normalized_lesion_location,Coarse_lesion_type,Possibly_noisy,Slice_range,"
              "Spacing_mm_px_,Image_size,DICOM_windows,Patient_gender,Patient_age,Train_Val_Test\n")
    rows = [("000001_01_01_109.png", "10.5, 12.0, 30.25, 28.0", 0, 1), ("000001_01_01_109.png", "5, 5, 9, 9", 1, 1),
            ("000002_01_01_020.png", "1, 2, 20, 21", 0, 2), ("000003_02_01_007.png", "3, 3, 13, 13", 0, 3)]
    _text(d / "DL_info.csv", header + "".join(
        f'{f},1,1,1,1,"1, 2, 3, 4","{b}","5, 6","0.1, 0.2, 0.3",-1,{n},"1, 2","0.8, 0.8, 5","32, 32",'
        f'"-175, 275",M,50,{s}\n' for f, b, n, s in rows))
    for f in sorted({r[0] for r in rows}):
        series, sl = f.rsplit("_", 1)
        (d / "Images_png" / series).mkdir(parents=True, exist_ok=True)
        raw = np.full((32, 32), 32768 - 1024, np.uint16)  # -1024 HU
        raw[:, 16:] = 32768 + 3071  # 3071 HU
        Image.fromarray(raw).save(d / "Images_png" / series / sl)


MAKERS = {"kitti": make_kitti, "widerface": make_widerface, "voc": make_voc, "lisa": make_lisa, "dota": make_dota,
          "coco": make_coco, "watercolor": lambda s: make_art(s, "watercolor"),
          "clipart": lambda s: make_art(s, "clipart"), "comic": lambda s: make_art(s, "comic"),
          "kitchen": make_kitchen, "deeplesion": make_deeplesion}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every fixture converted once into ``out``; the UODB datasets registered there."""
    base = tmp_path_factory.mktemp("uodb")
    src, out = base / "src", base / "out"
    for make in MAKERS.values():
        make(src)
    reports = prep.prepare(["all"], str(src), str(out), progress=False)
    register_uodb(str(out))
    yield src, out, {r.key: r for r in reports}
    register_uodb()  # back to the default root for the test modules that follow


def _load(name):
    recs = DatasetCatalog.get(name)
    return {r["image_id"]: [(a["category_id"], [round(v, 3) for v in a["bbox"]], a.get("difficult", a.get("iscrowd")))
                            for a in r["annotations"]] for r in recs}


# --------------------------------------------------------------------------- conversion, read back by the loader


def test_kitti_merges_and_hard_flag(converted):
    assert _load("uodb_kitti_train") == {
        "000000": [(2, [10, 5, 40, 40], 0), (2, [42, 2, 60, 40], 0)],   # Car, Van -> car; DontCare dropped
        "000002": [(1, [30, 10, 50, 45], 0), (0, [2, 1, 12, 40], 0)],   # Cyclist; Person_sitting -> pedestrian
    }
    assert _load("uodb_kitti_val") == {"000001": [(0, [4, 4, 14, 44], 1)]}  # occlusion 3 -> difficult; Tram dropped
    assert converted[2]["kitti"].dropped == {"KITTI type DontCare": 1, "KITTI type Tram": 1}
    assert Image.open(converted[1] / "KITTI" / "JPEGImages" / "000000.jpg").format == "JPEG"


def test_widerface_boxes_invalid_and_zero_size(converted):
    assert _load("uodb_widerface_train") == {"0_Parade_a_1": [(0, [3, 4, 13, 16], 0)],
                                             "1_Hand_c_3": [(0, [30, 20, 59, 39], 1)]}  # clipped to 59x39; invalid
    assert _load("uodb_widerface_val") == {"2_Demo_d_4": [(0, [1, 2, 6, 8], 0)]}
    dropped = converted[2]["widerface"].dropped
    assert dropped["WiderFace box with zero width or height"] == 1 and dropped["image left without boxes"] == 1


def test_voc_kept_as_is(converted):
    cls = VOC_CLASSES.index
    assert _load("uodb_voc_trainval") == {  # the loader prefixes ids with the folder when a split has several
        "VOC2007/000005": [(cls("chair"), [1, 2, 19, 29], 0), (cls("person"), [4, 4, 9, 9], 1)],
        "VOC2007/000007": [(cls("car"), [0, 0, 49, 39], 0)],
        "VOC2012/2008_000002": [(cls("tvmonitor"), [2, 3, 29, 19], 0)]}
    assert _load("uodb_voc_test") == {"000001": [(cls("dog"), [9, 9, 29, 29], 0)]}
    out = converted[1]
    assert (out / "VOC2007" / "ImageSets" / "Main" / "train.txt").read_text() == "000005\n"
    src_xml = converted[0] / "VOCdevkit" / "VOC2007" / "Annotations" / "000005.xml"
    assert (out / "VOC2007" / "Annotations" / "000005.xml").read_bytes() == src_xml.read_bytes()


@pytest.mark.parametrize("key", ["watercolor", "clipart", "comic"])
def test_art_sets(converted, key):
    assert _load(f"uodb_{key}_train") == {f"{key}1": [(VOC_CLASSES.index("bicycle"), [1, 1, 19, 19], 0)]}
    assert _load(f"uodb_{key}_test") == {f"{key}2": [(VOC_CLASSES.index("person"), [2, 2, 29, 29], 0)]}


def test_lisa_mapping_and_clip_split(converted):
    recs = {**_load("uodb_lisa_train"), **_load("uodb_lisa_test")}
    # classes: warning 0, noturn 1, speedlimit 2, stop 3; yield dropped
    assert recs == {"clipA__stop_1": [(3, [5, 6, 20, 22], 0)], "clipA__sl_2": [(2, [2, 2, 12, 14], 0)],
                    "clipB__w_3": [(0, [10, 10, 30, 30], 0)], "clipC__nt_4": [(1, [1, 1, 9, 9], 0)],
                    "clipD__r_5": [(0, [4, 4, 14, 14], 0)]}
    test = set(_load("uodb_lisa_test"))
    assert test and len(test) < 5
    assert {"clipA__stop_1", "clipA__sl_2"} <= test or not ({"clipA__stop_1", "clipA__sl_2"} & test)  # clip kept whole
    assert converted[2]["lisa"].dropped["LISA tag yield"] == 1


def test_dota_patches(converted):
    from gem_d2.data.uodb import DOTA_CLASSES

    c = DOTA_CLASSES.index
    train = _load("uodb_dota_train")
    assert sorted(train) == ["P0001__0_0", "P0001__0_100", "P0001__200_0", "P0001__200_100"]
    assert train["P0001__0_0"] == [(c("plane"), [10, 10, 60, 40], 0), (c("ship"), [700, 300, 799, 340], 1)]
    assert train["P0001__200_0"] == [(c("ship"), [500, 300, 700, 340], 0),  # whole: its own difficulty
                                     (c("small-vehicle"), [599, 500, 601, 510], 0)]
    assert train["P0001__0_100"] == [(c("ship"), [700, 200, 799, 240], 1)]
    assert train["P0001__200_100"] == [(c("ship"), [500, 200, 700, 240], 0),
                                       (c("small-vehicle"), [599, 400, 601, 410], 0)]
    assert _load("uodb_dota_val") == {"P0002__0_0": [(c("harbor"), [5, 5, 25, 25], 0)]}
    dropped = converted[2]["dota"].dropped
    assert dropped["DOTA class container-crane"] == 1 and dropped["DOTA leftover under 2 px after cropping"] == 2
    with Image.open(converted[1] / "DOTA" / "JPEGImages" / "P0001__200_100.jpg") as im:
        assert im.size == (800, 800)


def test_coco_kept_as_json(converted):
    assert _load("uodb_coco_valminusminival") == {42: [(0, [2, 3, 10, 20], 0)], 73: [(2, [5, 5, 30, 30], 0)]}
    assert _load("uodb_coco_minival") == {74: [(17, [1, 1, 20, 20], 0)]}
    assert (converted[1] / "coco" / "images" / "val2014" / "COCO_val2014_000000000074.jpg").is_file()


def test_kitchen_scene_split(converted):
    red_bull = 10
    assert _load("uodb_kitchen_train") == {f"gmu_scene_00{s}_rgb_1": [(red_bull, [10, 20, 30, 40], 0)]
                                           for s in (1, 3)}
    assert sorted(_load("uodb_kitchen_test")) == [f"gmu_scene_00{s}_rgb_1" for s in (2, 4, 5)]
    assert converted[2]["kitchen"].dropped["class not in the UODB list: not_a_product"] == 5


def test_deeplesion_windowing_and_splits(converted):
    assert _load("uodb_deeplesion_trainval") == {
        "000001_01_01_109": [(0, [10.5, 12.0, 30.25, 28.0], 0), (0, [5, 5, 9, 9], 1)],  # noisy -> difficult
        "000002_01_01_020": [(0, [1, 2, 20, 21], 0)]}
    assert _load("uodb_deeplesion_test") == {"000003_02_01_007": [(0, [3, 3, 13, 13], 0)]}
    with Image.open(converted[1] / "DeepLesion" / "JPEGImages" / "000001_01_01_109.png") as im:
        assert im.mode == "L"
        arr = np.asarray(im)
    assert arr[0, 0] == 0 and arr[0, 31] == 255


def test_summary_lists_every_split(converted):
    text = prep.format_reports(list(converted[2].values()))
    for key, split in (("kitti", "train"), ("voc", "trainval"), ("coco", "minival"), ("deeplesion", "test")):
        assert any(line.split()[:2] == [key, split] for line in text.splitlines())
    assert "kitti dropped: KITTI type DontCare: 1" in text


def test_check_passes_on_fresh_tree(converted):
    results = prep.check(["all"], str(converted[1]))
    assert [r.problems for r in results] == [[]] * 11
    assert all(r.has_manifest for r in results)
    assert results[0].report.splits["train"].boxes == 4


# --------------------------------------------------------------------------- helpers


def test_helpers():
    assert patch_starts(1000) == [0, 200] and patch_starts(800) == [0] and patch_starts(2000) == [0, 600, 1200]
    square = [(0, 0), (10, 0), (10, 10), (0, 10)]
    assert polygon_area(clip_polygon(square, 5, -1, 20, 20)) == pytest.approx(50)
    assert clip_polygon(square, 20, 20, 30, 30) == []
    assert lisa_class("speedLimit25") == "speedlimit" and lisa_class("yield") is None
    assert lisa_class("rampSpeedAdvisory50") == "warning" and lisa_class("noRightTurn") == "noturn"
    raw = np.array([[32768 - 2000, 32768 - 1024, 32768 + 1023.5, 32768 + 3071, 65535]], np.float64)
    assert window_to_uint8(raw).tolist() == [[0, 0, 128, 255, 255]]
    sizes = {f"g{i}": 10 for i in range(10)}
    test = hash_split(sizes, 0.2, "s")
    assert len(test) == 2 and test == hash_split(dict(reversed(list(sizes.items()))), 0.2, "s")
    assert hash_split({"a": 1, "b": 1}, 0.01, "s") and not hash_split({"a": 5}, 0.5, "s")


# --------------------------------------------------------------------------- malformed sources


def _write_bad(src, key):
    """Make one fixture of ``key`` malformed; returns (file, line) the error must name."""
    if key == "kitti":
        f = src / "KITTI" / "training" / "label_2" / "000001.txt"
        f.write_text(f.read_text() + "Car 0.00 0 -1.5 10.00 5.00 40.00\n")
        return f, 3
    if key == "widerface":
        f = src / "WiderFace" / "wider_face_split" / "wider_face_val_bbx_gt.txt"
        f.write_text("2--Demo/2_Demo_d_4.jpg\none\n1 2 5 6 1 0 0 0 0 0\n")
        return f, 2
    if key == "voc":
        f = src / "VOCdevkit" / "VOC2007" / "Annotations" / "000007.xml"
        f.write_text("<annotation>\n<object>\n<name>car</name>\n</annotation>\n")
        return f, 4
    if key == "lisa":
        f = src / "LISA" / "allAnnotations.csv"
        f.write_text(LISA_HEADER + "clipA/stop_1.png;stop;5;6;20;22;x;1;x;1\nclipA/stop_1.png;stop;a;6;20;22;x;1;x;1\n")
        return f, 3
    if key == "dota":
        f = src / "DOTA" / "val" / "labelTxt" / "P0002.txt"
        f.write_text("5 5 25 5 25 25 5 25 harbor 0\n5 5 25 5 25 25 harbor\n")
        return f, 2
    if key == "kitchen":
        f = src / "GMU_Kitchens" / "gmu_scene_003" / "Annotations" / "rgb_1.xml"
        f.write_text("<annotation>\n<object><name>red_bull</name>\n<bndbox><xmin>1</xmin></bndbox></object>\n"
                     "</annotation>\n")
        return f, 3
    if key == "deeplesion":
        f = src / "DeepLesion" / "DL_info.csv"
        lines = f.read_text().splitlines(keepends=True)
        f.write_text("".join(lines[:3]) + lines[3].rsplit(",", 1)[0] + ",4\n")
        return f, 4
    if key == "coco":
        f = src / "coco" / "annotations" / "instances_minival2014.json"
        f.write_text('{"images": [\n{"id": 1,}\n]}')
        return f, 2
    raise AssertionError(key)


@pytest.mark.parametrize("key", ["kitti", "widerface", "voc", "lisa", "dota", "kitchen", "deeplesion", "coco"])
def test_malformed_source_names_file_and_line(tmp_path, key):
    MAKERS[key](tmp_path / "src")
    bad, line = _write_bad(tmp_path / "src", key)
    with pytest.raises(SourceFormatError) as e:
        prep.prepare([key], str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    assert f"{bad}:{line}:" in str(e.value)
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []  # no staging folder, no dataset folder


def test_missing_source_says_what_is_expected(tmp_path):
    with pytest.raises(prep.MissingSourceError, match="DL_info.csv"):
        prep.prepare(["deeplesion"], str(tmp_path), str(tmp_path / "out"), progress=False)


# --------------------------------------------------------------------------- atomicity, re-runs, --check


def test_interrupted_conversion_leaves_nothing_half_written(tmp_path, monkeypatch):
    from gem_d2.prepare import tree

    src, out = tmp_path / "src", tmp_path / "out"
    make_kitchen(src)
    first = prep.prepare(["kitchen"], str(src), str(out), progress=False)[0]
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    (src / "GMU_Kitchens" / "gmu_scene_001" / "Images" / "rgb_1.png").touch()  # source changed: must re-convert
    calls = {"n": 0}
    real_add = tree.VocTreeWriter.add

    def failing_add(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the dataset
        return real_add(self, *a, **kw)

    monkeypatch.setattr(tree.VocTreeWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(["kitchen"], str(src), str(out), progress=False)
    assert calls["n"] == 3
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # old complete tree untouched
    monkeypatch.setattr(tree.VocTreeWriter, "add", real_add)
    again = prep.prepare(["kitchen"], str(src), str(out), progress=False)[0]
    assert not again.skipped and again.splits["test"].images == first.splits["test"].images


def test_first_conversion_interrupted_leaves_no_folder(tmp_path, monkeypatch):
    from gem_d2.prepare import deeplesion

    make_deeplesion(tmp_path / "src")
    real = deeplesion.window_to_uint8
    calls = []

    def boom(raw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(raw)

    monkeypatch.setattr(deeplesion, "window_to_uint8", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prep.prepare(["deeplesion"], str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_rerun_skips_until_source_or_options_change(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_kitchen(src)
    assert not prep.prepare(["kitchen"], str(src), str(out), progress=False)[0].skipped
    xml = out / "Kitchen" / "Annotations" / "gmu_scene_001_rgb_1.xml"
    stamp = xml.stat().st_mtime_ns
    second = prep.prepare(["kitchen"], str(src), str(out), progress=False)[0]
    assert second.skipped and second.splits["train"].images == 2 and xml.stat().st_mtime_ns == stamp
    third = prep.prepare(["kitchen"], str(src), str(out), progress=False, kitchen_test_scenes=(1,))[0]
    assert not third.skipped and third.splits["test"].images == 1
    src_xml = src / "GMU_Kitchens" / "gmu_scene_002" / "Annotations" / "rgb_1.xml"
    src_xml.write_text(src_xml.read_text().replace("<xmin>11</xmin>", "<xmin>12</xmin>"))
    assert not prep.prepare(["kitchen"], str(src), str(out), progress=False, kitchen_test_scenes=(1,))[0].skipped


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_kitchen(src)
    (out / "Kitchen").mkdir(parents=True)
    (out / "Kitchen" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--force"):
        prep.prepare(["kitchen"], str(src), str(out), progress=False)
    assert (out / "Kitchen" / "mine.txt").is_file()
    prep.prepare(["kitchen"], str(src), str(out), progress=False, force=True)
    assert not (out / "Kitchen" / "mine.txt").exists()


def _cli():
    return prepare_cli


def test_cli_convert_then_check_finds_planted_problems(tmp_path, capsys):
    cli = _cli()
    src, out = tmp_path / "src", tmp_path / "out"
    make_kitti(src)
    make_coco(src)
    assert cli.main(["--source", str(src), "--output", str(out), "--no-progress", "--link", "copy", "kitti",
                     "coco"]) == 0
    assert "kitti" in capsys.readouterr().out
    assert cli.main(["--output", str(out), "--check", "kitti", "coco"]) == 0

    (out / "KITTI" / "JPEGImages" / "000002.jpg").unlink()                     # missing image
    (out / "KITTI" / "JPEGImages" / "000001.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # unreadable
    xml = out / "KITTI" / "Annotations" / "000000.xml"
    xml.write_text(xml.read_text().replace("<xmax>41</xmax>", "<xmax>900</xmax>"))  # out of bounds
    ann = out / "coco" / "annotations" / "instances_minival2014.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = [50, 40, 30, 30]
    ann.write_text(json.dumps(data))
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file())
    assert cli.main(["--output", str(out), "--check", "kitti", "coco"]) == 1
    text = capsys.readouterr().out
    assert f"{out / 'KITTI' / 'JPEGImages' / '000002.jpg'}: missing image" in text
    assert f"{out / 'KITTI' / 'JPEGImages' / '000001.jpg'}: unreadable image" in text
    assert f"{xml}: object #0 (car): box out of bounds for a 64x48 image" in text
    assert "annotations[0] (id 3): bbox [50, 40, 30, 30] empty or outside the 64x48 image" in text
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()) == before  # wrote nothing

    (out / "KITTI" / "ImageSets" / "Main" / "val.txt").write_text("000001\n000002\n")
    result = prep.check(["kitti"], str(out))[0]
    assert any("split 'val' has 2 images" in p and "manifest recorded 1" in p for p in result.problems)


def test_cli_rejects_unknown_dataset(tmp_path, capsys):
    assert _cli().main(["--source", str(tmp_path), "--output", str(tmp_path / "o"), "nope"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err


def test_symlink_mode_links_unchanged_images(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_art(src, "clipart")
    prep.prepare(["clipart"], str(src), str(out), progress=False, link_mode="symlink")
    link = out / "clipart" / "JPEGImages" / "clipart1.jpg"
    assert link.is_symlink() and os.path.realpath(link) == str(src / "clipart" / "JPEGImages" / "clipart1.jpg")


def test_conversion_is_deterministic(tmp_path):
    src = tmp_path / "src"
    for key in ("kitti", "dota", "deeplesion", "lisa"):
        MAKERS[key](src)
    trees = []
    for out in (tmp_path / "a", tmp_path / "b"):
        prep.prepare(["kitti", "dota", "deeplesion", "lisa"], str(src), str(out), progress=False, link_mode="copy")
        trees.append({str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert trees[0] == trees[1] and len(trees[0]) > 20


def test_cli_keep_going_converts_what_it_can(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    make_kitti(src)
    args = ["--source", str(src), "--output", str(out), "--no-progress", "kitti", "widerface", "lisa"]
    assert _cli().main(args) == 2  # stops at widerface
    assert not (out / "LISA").exists()
    captured = capsys.readouterr()
    assert "error: widerface:" in captured.err and "wider_face_train_bbx_gt.txt" in captured.err
    assert _cli().main(args + ["--keep-going"]) == 2
    captured = capsys.readouterr()
    assert "failed: widerface, lisa" in captured.err and "up to date (skipped)" in captured.out
