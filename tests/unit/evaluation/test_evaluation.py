"""gem_d2.evaluation against hand-computed values, pycocotools and detectron2's PascalVOCDetectionEvaluator."""
import json
import math
import multiprocessing
import uuid
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

import gem_d2  # noqa: F401  (compat shims before detectron2)

# isort: split
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.evaluation.testing import print_csv_format
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gem_d2.config import add_gem_config
from gem_d2.evaluation import (
    UODBEvaluator,
    build_uodb_evaluator,
    coco_box_ap,
    summarize_results,
    voc07_11point_ap,
    voc07_ap_per_class,
)


@pytest.fixture
def registry():
    """Register throw-away datasets; removes them afterwards."""
    names = []

    def register(records, classes, **meta):
        name = f"test_eval_{uuid.uuid4().hex[:8]}"
        DatasetCatalog.register(name, lambda: records)
        MetadataCatalog.get(name).set(thing_classes=list(classes), **meta)
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _output(boxes, scores, classes, hw=(100, 100)):
    inst = Instances(hw)
    inst.pred_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    inst.pred_classes = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
    return {"instances": inst}


def _run(evaluator, dets_per_image, dataset_name=None):
    """dets_per_image: image_id -> (boxes, scores, classes)."""
    evaluator.reset()
    for image_id, (b, s, c) in dets_per_image.items():
        inp = {"image_id": image_id, "height": 100, "width": 100}
        if dataset_name:
            inp["dataset_name"] = dataset_name
        evaluator.process([inp], [_output(b, s, c)])
    return evaluator.evaluate()


def _rec(image_id, anns):
    return {"image_id": image_id, "file_name": f"{image_id}.jpg", "height": 100, "width": 100,
            "annotations": [{"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": c, "difficult": d}
                            for b, c, d in anns]}


# ---------------------------------------------------------------------------------------------
# VOC07 11-point AP by hand


def test_voc07_hand_computed_with_difficult_and_duplicate():
    # One image, one class. GT: g0..g2 regular, g3 difficult (npos = 3).
    gt = np.array([[0, 0, 9, 9], [20, 20, 29, 29], [40, 40, 49, 49], [60, 60, 69, 69]], float)
    ignore = np.array([False, False, False, True])
    # Ranked detections (pixel-inclusive IoU, widths x2 - x1 + 1):
    #   d1 = g0 exactly           -> TP                       tp=1 fp=0  rec 1/3 prec 1
    #   d2 far from everything    -> FP                       tp=1 fp=1  rec 1/3 prec 1/2
    #   d3 = g2 exactly           -> TP                       tp=2 fp=1  rec 2/3 prec 2/3
    #   d4 = g3 (difficult)       -> ignored (neither)        tp=2 fp=1  rec 2/3 prec 2/3
    #   d5 = g0 shifted by 1 px:  inter 9*9 = 81, union 100 + 100 - 81 = 119, IoU 0.68 > 0.5,
    #        but g0 is taken      -> FP (duplicate)           tp=2 fp=2  rec 2/3 prec 1/2
    dets = np.array([[0, 0, 9, 9], [80, 0, 89, 9], [40, 40, 49, 49], [60, 60, 69, 69], [1, 1, 10, 10]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    # 11 points: t = 0, .1, .2, .3 -> max prec over rec >= t = 1          (4 x 1)
    #            t = .4, .5, .6    -> max prec over rec = 2/3 = 2/3        (3 x 2/3 = 2)
    #            t = .7 .. 1.0     -> no recall that high, 0
    # AP = (4 + 2) / 11 = 6/11
    ap, npos = voc07_ap_per_class(np.zeros(4), np.zeros(4), gt, ignore, np.zeros(5), np.zeros(5), dets, scores, 1)
    assert npos.tolist() == [3]
    assert ap[0] == pytest.approx(6 / 11, abs=1e-12)

    # Without the difficult detection d4 nothing changes (ignored = neither TP nor FP).
    keep = [0, 1, 2, 4]
    ap2, _ = voc07_ap_per_class(np.zeros(4), np.zeros(4), gt, ignore, np.zeros(4), np.zeros(4), dets[keep],
                                scores[keep], 1)
    assert ap2[0] == ap[0]
    # If g3 were not difficult, d4 is a TP: npos 4, tp/fp after each: 1/0, 1/1, 2/1, 3/1, 3/2 ->
    # rec .25 .25 .5 .75 .75, prec 1 .5 .667 .75 .6; t<=.2 -> 1 (3 points), .3-.7 -> .75 (5), >= .8 -> 0
    ap3, _ = voc07_ap_per_class(np.zeros(4), np.zeros(4), gt, np.zeros(4, bool), np.zeros(5), np.zeros(5), dets,
                                scores, 1)
    assert ap3[0] == pytest.approx((3 + 5 * 0.75) / 11, abs=1e-12)


def test_voc07_recall_threshold_grid_is_the_devkits():
    # recall 3/10 = 0.29999999999999999 is below the devkit's t = 0.1 * 3 = 0.30000000000000004, so
    # the point t = 0.3 takes precision 0 here: AP = 3 points (t = 0, .1, .2) of precision 1 = 3/11.
    recall = np.array([0.1, 0.2, 3 / 10])
    assert voc07_11point_ap(recall, np.ones(3)) == pytest.approx(3 / 11, abs=1e-15)
    assert voc07_11point_ap(np.zeros(0), np.zeros(0)) == 0.0


def test_pixel_convention_decides_the_threshold():
    # GT [0,0,3,3], det [1,0,4,3]: inclusive inter 3*4 = 12, union 16 + 16 - 12 = 20 -> 0.6 (TP, AP 1);
    # continuous inter 2*3 = 6, union 9 + 9 - 6 = 12 -> 0.5, not > 0.5 (FP, AP 0).
    args = (np.zeros(1), np.zeros(1), np.array([[0, 0, 3, 3.0]]), np.zeros(1, bool), np.zeros(1), np.zeros(1),
            np.array([[1, 0, 4, 3.0]]), np.ones(1), 1)
    assert voc07_ap_per_class(*args, pixel_inclusive=True)[0][0] == pytest.approx(1.0)  # 11 x (1/11)
    assert voc07_ap_per_class(*args, pixel_inclusive=False)[0][0] == 0.0


def test_second_best_box_is_never_used():
    # Two GT boxes; both detections overlap g0 best, the second also overlaps g1 > 0.5.
    # Devkit rule: the second takes g0 (its best), finds it taken -> FP, even though g1 is free.
    gt = np.array([[0, 0, 9, 9], [0, 2, 9, 11]], float)
    dets = np.array([[0, 0, 9, 9], [0, 1, 9, 10]], float)  # d2: IoU 0.82 with g0, 0.82 with g1 -> g0 (first)
    ap, _ = voc07_ap_per_class(np.zeros(2), np.zeros(2), gt, np.zeros(2, bool), np.zeros(2), np.zeros(2), dets,
                               np.array([0.9, 0.8]), 1)
    # rec .5 .5, prec 1 .5 -> t <= .5: 1 (6 points) -> 6/11
    assert ap[0] == pytest.approx(6 / 11, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# The evaluator: edge cases, bad input, outputs


def test_evaluator_edge_cases(registry, tmp_path):
    records = [_rec("a", [([0, 0, 9, 9], 0, 0)]), _rec("empty", [])]
    name = registry(records, ["cat", "dog", "bird"])
    ev = UODBEvaluator(name, output_dir=str(tmp_path))
    # No detections at all: every AP is 0 (COCO: only "cat" has GT; the others are left out).
    res = _run(ev, {})["uodb"]
    assert res["AP50_voc07"] == 0.0 and res["AP"] == 0.0 and res["AP50"] == 0.0
    # A perfect "cat" detection, a false "dog" detection on the empty image (no dog GT anywhere).
    # VOC07: cat 100, dog 0 (no GT -> 0, as detectron2), bird 0 -> mean 100/3. COCO: only cat -> 100.
    res = _run(ev, {"a": ([[0, 0, 9, 9]], [0.9], [0]), "empty": ([[5, 5, 20, 20]], [0.8], [1])}, name)["uodb"]
    assert res["AP50_voc07-cat"] == pytest.approx(100.0) and res["AP50_voc07-dog"] == 0.0
    assert res["AP50_voc07"] == pytest.approx(100 / 3)
    assert res["AP"] == pytest.approx(100.0) and res["AP75"] == pytest.approx(100.0)
    saved = json.loads((tmp_path / f"uodb_metrics_{name}.json").read_text())
    assert saved["AP50_voc07"] == pytest.approx(100 / 3) and saved["source"] is None
    ev.source = {"iteration": 7, "checkpoint": "/runs/a/model_0000007.pth"}  # set by GemTrainer.test
    _run(ev, {})
    saved = json.loads((tmp_path / f"uodb_metrics_{name}.json").read_text())
    assert saved["source"] == {"iteration": 7, "checkpoint": "/runs/a/model_0000007.pth"}
    print_csv_format({"uodb": res})  # detectron2's printer accepts the flat layout
    fast = _run(UODBEvaluator(name, compute_coco=False), {"a": ([[0, 0, 9, 9]], [0.9], [0])})["uodb"]
    assert fast["AP50_voc07"] == pytest.approx(100 / 3) and math.isnan(fast["AP"])


def test_evaluator_bad_input(registry):
    with pytest.raises(KeyError, match="no_such_dataset"):
        UODBEvaluator("no_such_dataset")
    name = registry([_rec("a", [([0, 0, 9, 9], 0, 0)])], ["cat", "dog"])
    ev = UODBEvaluator(name)
    with pytest.raises(ValueError, match=r"pred_classes \[2\].*expected local ids 0\.\.1"):
        ev.process([{"image_id": "a"}], [_output([[0, 0, 1, 1]], [0.5], [2])])
    with pytest.raises(ValueError, match=r"pred_classes \[-1\]"):
        ev.process([{"image_id": "a"}], [_output([[0, 0, 1, 1]], [0.5], [-1])])
    with pytest.raises(ValueError, match="'zzz' is not in dataset"):
        ev.process([{"image_id": "zzz"}], [_output([[0, 0, 1, 1]], [0.5], [0])])
    with pytest.raises(ValueError, match="of dataset 'other'"):
        ev.process([{"image_id": "a", "dataset_name": "other"}], [_output([[0, 0, 1, 1]], [0.5], [0])])
    with pytest.raises(ValueError, match="non-finite"):
        ev.process([{"image_id": "a"}], [_output([[0, 0, float("nan"), 1]], [0.5], [0])])
    ev.reset()
    for _ in range(2):
        ev.process([{"image_id": "a"}], [_output([[0, 0, 1, 1]], [0.5], [0])])
    with pytest.raises(ValueError, match="'a' was processed more than once"):
        ev.evaluate()
    bad_gt = registry([_rec("a", [([0, 0, 9, 9], 5, 0)])], ["cat", "dog"])
    with pytest.raises(ValueError, match="category_id 5 outside"):
        UODBEvaluator(bad_gt)
    no_classes = registry([_rec("a", [])], [])
    with pytest.raises(ValueError, match="thing_classes"):
        UODBEvaluator(no_classes)


def test_build_uodb_evaluator_writes_under_output_dir(registry, tmp_path):
    name = registry([_rec("a", [([0, 0, 9, 9], 0, 0)])], ["cat"])
    cfg = add_gem_config(get_cfg())
    cfg.OUTPUT_DIR = str(tmp_path)
    ev = build_uodb_evaluator(cfg, name)
    assert isinstance(ev, UODBEvaluator)
    assert _run(ev, {"a": ([[0, 0, 9, 9]], [0.9], [0])})["uodb"]["AP"] == pytest.approx(100.0)
    assert (tmp_path / "inference" / f"uodb_metrics_{name}.json").is_file()
    cfg.TEST.UODB_COCO_AP = False
    assert math.isnan(_run(build_uodb_evaluator(cfg, name), {})["uodb"]["AP"])


# ---------------------------------------------------------------------------------------------
# Parity with pycocotools and detectron2, on seeded random detections


def _random_voc(rng, num_images, num_classes, empty_class=None):
    """Objects per image as (xmin, ymin, xmax, ymax) 1-based VOC integers, class, difficult."""
    images = {}
    for i in range(num_images):
        objs = []
        for _ in range(0 if i == 0 else rng.integers(1, 7)):  # image 0 has no objects
            c = int(rng.integers(0, num_classes))
            if c == empty_class:
                continue
            x1, y1 = rng.integers(1, 150, size=2)
            w, h = rng.integers(8, 60, size=2)
            objs.append(((int(x1), int(y1), int(x1 + w), int(y1 + h)), c, int(rng.random() < 0.2)))
        images[f"img{i:03d}"] = objs
    return images


def _random_dets(rng, images, num_classes, score_levels=1000, max_copies=2):
    """Jittered copies of objects (some duplicated), random boxes; coordinates on a 0.5 px grid and
    scores on a 1/1000 grid (detectron2 writes %.1f / %.3f), with deliberate score ties."""
    dets = {}
    for image_id, objs in images.items():
        boxes, classes = [], []
        for (x1, y1, x2, y2), c, _ in objs:
            for _ in range(rng.integers(0, max_copies + 1)):
                jitter = rng.integers(-8, 9, size=4) / 2
                # gem_d2 frame: VOC value - 1 on all four coordinates
                boxes.append([x1 - 1 + jitter[0], y1 - 1 + jitter[1], x2 - 1 + jitter[2], y2 - 1 + jitter[3]])
                classes.append(c if rng.random() < 0.85 else int(rng.integers(0, num_classes)))
        for _ in range(rng.integers(0, 5)):
            x, y = rng.integers(0, 150, size=2)
            w, h = rng.integers(4, 60, size=2)
            boxes.append([x, y, x + w + 0.5, y + h])
            classes.append(int(rng.integers(0, num_classes)))
        scores = rng.integers(1, score_levels, size=len(boxes)) / 1000
        dets[image_id] = (np.asarray(boxes, float).reshape(-1, 4), scores, np.asarray(classes, np.int64))
    return dets


def _write_voc_tree(root, images, classes, split="test"):
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
    for image_id, objs in images.items():
        ann = ET.Element("annotation")
        size = ET.SubElement(ann, "size")
        for tag, v in (("width", 220), ("height", 220), ("depth", 3)):
            ET.SubElement(size, tag).text = str(v)
        for (x1, y1, x2, y2), c, difficult in objs:
            obj = ET.SubElement(ann, "object")
            for tag, v in (("name", classes[c]), ("pose", "Unspecified"), ("truncated", 0), ("difficult", difficult)):
                ET.SubElement(obj, tag).text = str(v)
            bb = ET.SubElement(obj, "bndbox")
            for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
                ET.SubElement(bb, tag).text = str(v)
        ET.ElementTree(ann).write(root / "Annotations" / f"{image_id}.xml")


def _records_from_xml(root, split, classes):
    """What gem_d2's VOC loader produces: 1 subtracted from all four coordinates (UODB reference)."""
    records = []
    for image_id in (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split():
        anns = []
        for obj in ET.parse(root / "Annotations" / f"{image_id}.xml").findall("object"):
            bb = [float(obj.find("bndbox").find(t).text) - 1 for t in ("xmin", "ymin", "xmax", "ymax")]
            anns.append((bb, classes.index(obj.find("name").text), int(obj.find("difficult").text)))
        records.append(_rec(image_id, anns))
    return records


def test_parity_with_detectron2_pascal_voc_evaluator(registry, tmp_path):
    classes = ["car", "person", "dog", "kite"]
    rng = np.random.default_rng(0)
    images = _random_voc(rng, 20, len(classes), empty_class=3)  # "kite" has no GT at all
    _write_voc_tree(tmp_path, images, classes)
    name = registry(_records_from_xml(tmp_path, "test", classes), classes,
                    dirname=str(tmp_path), split="test", year=2007)
    ours = UODBEvaluator(name)
    theirs = PascalVOCDetectionEvaluator(name)
    # Few score levels: many ties, ranked by numpy's unstable sort exactly as the devkit ranks them.
    for seed, levels, copies in ((1, 1000, 2), (2, 40, 2), (3, 6, 8)):
        dets = _random_dets(np.random.default_rng(seed), images, len(classes), levels, copies)
        assert sum(len(s) for _, s, _ in dets.values()) > 60
        res = _run(ours, dets, name)["uodb"]
        # detectron2 writes (x1 + 1, y1 + 1, x2, y2) against raw XML; the UODB code writes all four + 1.
        shifted = {k: (b + np.array([0, 0, 1, 1]), s, c) for k, (b, s, c) in dets.items()}
        ref = _run(theirs, shifted)["bbox"]["AP50"]
        assert 5 < res["AP50_voc07"] < 95
        assert res["AP50_voc07"] == ref


def _ddp_worker(rank, world_size, init_file, records, classes, dets, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        DatasetCatalog.register("ddp_eval", lambda: records)
        MetadataCatalog.get("ddp_eval").set(thing_classes=classes)
        mine = {k: v for n, (k, v) in enumerate(sorted(dets.items())) if n % world_size == rank}
        result = _run(UODBEvaluator("ddp_eval"), mine)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(result, f)
        else:
            assert result == {}
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method")
def test_distributed_gather_matches_single_process(registry, tmp_path):
    classes = ["car", "person", "dog"]
    images = _random_voc(np.random.default_rng(6), 8, len(classes))
    records = [_rec(k, [([x1 - 1, y1 - 1, x2 - 1, y2 - 1], c, d) for (x1, y1, x2, y2), c, d in objs])
               for k, objs in images.items()]
    dets = _random_dets(np.random.default_rng(7), images, len(classes))
    single = _run(UODBEvaluator(registry(records, classes)), dets)["uodb"]
    out = tmp_path / "rank0.json"
    # fork: the children reuse the imported modules (spawn would re-import torch and detectron2).
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "init"), records, classes, dets, str(out)), nprocs=2,
        start_method="fork",
    )
    gathered = json.loads(out.read_text())["uodb"]
    assert gathered == pytest.approx(single, abs=1e-12)


def test_parity_with_pycocotools(registry, tmp_path):
    classes = ["car", "person", "dog"]
    rng = np.random.default_rng(3)
    images = _random_voc(rng, 10, len(classes))
    dets = _random_dets(np.random.default_rng(4), images, len(classes))
    # 130 more "car" detections on one image, scored above the others: COCOeval keeps the best 100 per
    # image and class, which pushes out lower-scored ones (asserted below to change the AP).
    b, s, c = dets["img001"]
    extra = np.random.default_rng(5)
    more = extra.integers(0, 150, size=(130, 2)).astype(float)
    dets["img001"] = (np.concatenate([b, np.hstack([more, more + 30])]),
                      np.concatenate([s, 0.9 + extra.random(130) / 20]), np.concatenate([c, np.zeros(130, np.int64)]))
    records = [_rec(k, [([x1 - 1, y1 - 1, x2 - 1, y2 - 1], cl, d) for (x1, y1, x2, y2), cl, d in objs])
               for k, objs in images.items()]
    name = registry(records, classes)
    res = _run(UODBEvaluator(name), dets)["uodb"]
    uncapped = _run(UODBEvaluator(name, max_dets_per_image=1000), dets)["uodb"]
    assert uncapped["AP"] != res["AP"]  # the cap matters for this data

    # Independent COCO files, the usual VOC -> COCO conversion (bbox [xmin - 1, ymin - 1, w, h] from
    # 1-based inclusive integers), difficult as crowd, detections through loadRes.
    ids = {k: n + 1 for n, k in enumerate(images)}
    gt = {"images": [{"id": v, "width": 220, "height": 220} for v in ids.values()],
          "categories": [{"id": n + 1, "name": cl} for n, cl in enumerate(classes)], "annotations": []}
    for k, objs in images.items():
        for (x1, y1, x2, y2), cl, d in objs:
            w, h = x2 - x1 + 1, y2 - y1 + 1
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": ids[k], "category_id": cl + 1,
                                      "bbox": [x1 - 1, y1 - 1, w, h], "area": w * h, "iscrowd": d})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    results = [{"image_id": ids[k], "category_id": int(cl) + 1, "score": float(sc),
                "bbox": [float(bb[0]), float(bb[1]), float(bb[2] - bb[0] + 1), float(bb[3] - bb[1] + 1)]}
               for k, (bs, ss, cs) in dets.items() for bb, sc, cl in zip(bs, np.float32(ss), cs)]
    coco_gt = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert 5 < res["AP"] < 95
    assert res["AP"] == pytest.approx(ev.stats[0] * 100, abs=1e-9)
    assert res["AP50"] == pytest.approx(ev.stats[1] * 100, abs=1e-9)
    assert res["AP75"] == pytest.approx(ev.stats[2] * 100, abs=1e-9)


def test_coco_box_ap_no_ground_truth_is_nan():
    out = coco_box_ap(2, np.zeros(0), np.zeros(0), np.zeros((0, 4)), np.zeros(0, bool), np.zeros(1), np.zeros(1),
                      np.array([[0, 0, 5, 5.0]]), np.ones(1), 2)
    assert all(math.isnan(v) for v in out.values())


# ---------------------------------------------------------------------------------------------
# Summary table


def test_summary_table_and_files(tmp_path):
    a = {"uodb": {"AP50_voc07": 60.0, "AP": 30.0, "AP50": 55.0, "AP75": 28.0, "AP50_voc07-car": 60.0}}
    b = {"AP50_voc07": 81.0, "AP": 45.5, "AP50": 80.0, "AP75": 47.0}
    table = summarize_results({"kitti": a, "voc": b}, output_dir=str(tmp_path))
    assert "AP50 (VOC07 11-pt)" in table.splitlines()[0] and "AP (COCO)" in table.splitlines()[0]
    last = table.strip().splitlines()[-1]
    # (60 + 81) / 2 = 70.5; (30 + 45.5) / 2 = 37.75; (55 + 80) / 2 = 67.5; (28 + 47) / 2 = 37.5
    assert "average (2 datasets" in last
    assert [c.strip(" *") for c in last.split("|")[2:6]] == ["70.50", "37.75", "67.50", "37.50"]
    assert (tmp_path / "results_table.md").read_text() == table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["average"]["AP50_voc07"] == 70.5 and saved["datasets"]["kitti"]["AP50_voc07-car"] == 60.0
    assert saved["source"] is None  # not told where the weights come from
    summarize_results({"kitti": a}, output_dir=str(tmp_path), source={"iteration": 3, "checkpoint": "/r/m.pth"})
    assert json.loads((tmp_path / "results.json").read_text())["source"] == {"iteration": 3, "checkpoint": "/r/m.pth"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]

    # A missing value makes the average n/a (a mean over fewer datasets is not the benchmark score).
    c = dict(b, AP=float("nan"))
    last = summarize_results({"kitti": a, "voc": c}, output_dir=str(tmp_path)).strip().splitlines()[-1]
    assert [x.strip(" *") for x in last.split("|")[2:4]] == ["70.50", "n/a"]
    assert json.loads((tmp_path / "results.json").read_text())["average"]["AP"] is None

    with pytest.raises(KeyError, match=r"results\['voc'\] lacks metric\(s\) \['AP75'\]"):
        summarize_results({"voc": {"AP50_voc07": 1.0, "AP": 1.0, "AP50": 1.0}})
    with pytest.raises(ValueError, match="no datasets"):
        summarize_results({})
