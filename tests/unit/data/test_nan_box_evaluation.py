"""A NaN box in the annotations no longer lowers the score of perfect predictions (VOC XML and COCO JSON)."""
import json
import uuid

import numpy as np
import pytest
import torch

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from gem_d2.data import register_coco_dataset, register_voc_dataset
from gem_d2.evaluation import UODBEvaluator


def _perfect_predictions(name):
    """UODBEvaluator results for detections equal to every finite ground-truth box of the dataset."""
    ev = UODBEvaluator(name)
    ev.reset()
    for r in DatasetCatalog.get(name):
        gt = [(BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS), a["category_id"])
              for a in r["annotations"]]
        gt = [(b, c) for b, c in gt if np.isfinite(b).all()]
        inst = Instances((r["height"], r["width"]))
        inst.pred_boxes = Boxes(torch.tensor([b for b, _ in gt], dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.linspace(0.9, 0.5, len(gt))
        inst.pred_classes = torch.tensor([c for _, c in gt], dtype=torch.int64)
        ev.process([{"image_id": r["image_id"], "dataset_name": name}], [{"instances": inst}])
    return ev.evaluate()["uodb"]


def test_voc_nan_box_does_not_lower_ap(tmp_path, write_voc, registered_names):
    name = f"t_nanvoc_{uuid.uuid4().hex[:6]}_test"
    registered_names.append(name)
    write_voc(tmp_path, "test", {
        "a": {"size": (64, 48), "objects": [("cat", 5, 5, 30, 30, 0), ("cat", float("nan"), 2, 20, 20, 0)]},
        "b": {"size": (64, 48), "objects": [("cat", 10, 12, 40, 44, 0), ("cat", 2, 2, 20, float("inf"), 0)]},
    })
    register_voc_dataset(name, tmp_path, "test", ["cat"])
    res = _perfect_predictions(name)
    assert res["AP50_voc07"] == pytest.approx(100.0) and res["AP50"] == pytest.approx(100.0)
    assert MetadataCatalog.get(name).load_stats.dropped_nonfinite == 2


def test_coco_nan_box_does_not_lower_ap(tmp_path, registered_names):
    name = f"t_nancoco_{uuid.uuid4().hex[:6]}_test"
    registered_names.append(name)
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": 48, "width": 64}],
            "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20]},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 5, 20, 20]}]}
    (tmp_path / "gt.json").write_text(json.dumps(data))  # json writes NaN, as many tools do
    register_coco_dataset(name, tmp_path / "gt.json", tmp_path, class_names=["cat"])
    res = _perfect_predictions(name)
    assert res["AP50_voc07"] == pytest.approx(100.0) and res["AP50"] == pytest.approx(100.0)


def test_control_a_kept_nan_box_did_lower_ap(registered_names):
    # what the loaders used to hand over: the NaN box kept as ground truth, which no detection can match
    name = f"t_nankept_{uuid.uuid4().hex[:6]}_test"
    registered_names.append(name)
    anns = [{"bbox": [4.0, 4.0, 29.0, 29.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "difficult": 0},
            {"bbox": [np.nan, 1.0, 19.0, 19.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "difficult": 0}]
    records = [{"image_id": "a", "file_name": "a.jpg", "height": 48, "width": 64, "annotations": anns}]
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["cat"])
    res = _perfect_predictions(name)
    assert res["AP50_voc07"] < 100.0
