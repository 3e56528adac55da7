"""The per-dataset UODB evaluator: VOC07 11-point AP50 (the UODB protocol) and COCO AP, in memory.

Contract with the model (detectron2's evaluator protocol): ``inputs[i]`` carries ``image_id`` (and
``dataset_name``, checked when present); ``outputs[i]["instances"]`` has ``pred_boxes`` (XYXY in
original image pixels), ``scores`` and ``pred_classes`` in the 0-based class ids of the dataset
(``thing_classes``). Ground truth is ``DatasetCatalog.get(dataset_name)``: ``annotations`` with
``bbox`` (+ ``bbox_mode``, XYXY_ABS when absent), ``category_id`` and optional ``difficult`` /
``iscrowd`` (either makes the box ignored).

Every image of the dataset is scored, including those never processed (their boxes are misses, and a
warning says how many), as the VOC devkit scores every image of the split.

Parity with detectron2's ``PascalVOCDetectionEvaluator`` (year 2007). Its ``process`` writes
``(x1 + 1, y1 + 1, x2, y2)``, the inverse of *its* VOC loader (which subtracts 1 from xmin/ymin only),
and compares with the raw 1-based XML boxes using inclusive-pixel IoU. gem_d2's VOC loader subtracts
1 from all four coordinates, as the UODB reference code does, whose evaluation writes
``(x1 + 1, y1 + 1, x2 + 1, y2 + 1)``. Hence for detections ``(x1, y1, x2, y2)`` in gem_d2's frame:
``AP50_voc07(dets) == detectron2 AP50(dets with x2 + 1, y2 + 1)`` exactly, when detectron2's own
rounding (scores to 3 decimals, coordinates to 0.1 px, in its text files) changes nothing; fed the
unshifted boxes, detectron2 would score boxes one pixel narrower and shorter than the UODB code does.
(It also reads the raw XML, so ground truth must agree too: gem_d2's loader clips out-of-image boxes and
lower-cases names, which detectron2 does not.)
This evaluator keeps full precision; score ties rank as in the devkit (same numpy sort), and classes
without ground truth count as AP 0 in the mean, as in detectron2 and the devkit.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm

from gem_d2.data.catalog import dataset_domain
from gem_d2.evaluation.coco_ap import coco_box_ap
from gem_d2.evaluation.voc07_ap import voc07_ap_per_class
from gem_d2.utils.files import atomic_write_text

logger = logging.getLogger(__name__)

RESULT_KEY = "uodb"  # distinct from COCOEvaluator/PascalVOCDetectionEvaluator's "bbox"


@dataclass
class _GroundTruth:
    image_ids: list  # dataset order
    index: Dict[object, int]  # image_id -> position in image_ids
    image: np.ndarray
    category: np.ndarray
    boxes: np.ndarray
    ignore: np.ndarray


def _load_ground_truth(dataset_name: str, num_classes: int) -> _GroundTruth:
    records = DatasetCatalog.get(dataset_name)
    image_ids, index = [], {}
    image, category, boxes, ignore = [], [], [], []
    for record in records:
        if "image_id" not in record:
            raise KeyError(f"dataset {dataset_name!r}: record for {record.get('file_name', '?')!r} has no 'image_id'")
        image_id = record["image_id"]
        if image_id in index:
            raise ValueError(f"dataset {dataset_name!r}: image_id {image_id!r} occurs twice")
        index[image_id] = len(image_ids)
        image_ids.append(image_id)
        for ann in record.get("annotations", []):
            cat = ann["category_id"]
            if not 0 <= cat < num_classes:
                raise ValueError(
                    f"dataset {dataset_name!r}, image {image_id!r}: category_id {cat} outside the dataset's "
                    f"{num_classes} classes (expected 0..{num_classes - 1})"
                )
            mode = ann.get("bbox_mode", BoxMode.XYXY_ABS)
            boxes.append(BoxMode.convert(list(ann["bbox"]), mode, BoxMode.XYXY_ABS))
            image.append(index[image_id])
            category.append(cat)
            ignore.append(bool(ann.get("difficult", 0)) or bool(ann.get("iscrowd", 0)))
    return _GroundTruth(
        image_ids, index, np.asarray(image, dtype=np.int64), np.asarray(category, dtype=np.int64),
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(ignore, dtype=bool),
    )


def json_safe(obj):
    """Replace non-finite floats (NaN, inf) by None, recursively, so the JSON is standard."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


class UODBEvaluator(DatasetEvaluator):
    """UODB protocol (VOC07 11-point AP at IoU 0.5, difficult ignored) and COCO AP for one dataset.

    ``evaluate()`` returns ``{"uodb": OrderedDict}`` in percent with keys ``AP50_voc07`` (the UODB
    number), ``AP``, ``AP50``, ``AP75`` (pycocotools) and ``AP50_voc07-<class name>`` per class
    (detectron2's "-" convention keeps per-class values out of ``print_csv_format``). Under DDP the
    predictions are gathered on rank 0 (``detectron2.utils.comm.gather``), which alone computes and
    returns the results; other ranks return ``{}``.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        *,
        max_dets_per_image: int = 100,
        pixel_inclusive: Optional[bool] = None,
        compute_coco: bool = True,
    ):
        """
        Args:
            dataset_name: a name registered in ``DatasetCatalog`` with ``thing_classes`` metadata.
            output_dir: if given, the metrics are also written to ``uodb_metrics_<dataset>.json`` there, with
                ``"source"``: the attribute :attr:`source` (``{"iteration", "checkpoint"}`` of the weights).
            distributed: gather predictions from all ranks before evaluating.
            max_dets_per_image: COCO AP's detection cap (COCOeval ``maxDets``, which pycocotools applies
                per image *and class*); VOC07 AP uses all detections.
            pixel_inclusive: box widths are ``x2 - x1 + 1`` (VOC layout) or ``x2 - x1``. ``None``:
                continuous for datasets registered from COCO json (metadata ``json_file``), inclusive
                otherwise.
            compute_coco: run pycocotools (most of the evaluation time); ``False`` reports AP, AP50,
                AP75 as NaN.
        """
        if dataset_name not in DatasetCatalog.list():
            raise KeyError(
                f"UODBEvaluator: dataset {dataset_name!r} is not registered in DatasetCatalog; "
                f"registered: {sorted(DatasetCatalog.list())}"
            )
        meta = MetadataCatalog.get(dataset_name)
        classes = meta.get("thing_classes", None)
        if not classes:
            raise ValueError(f"UODBEvaluator: dataset {dataset_name!r} has no 'thing_classes' metadata")
        self._dataset_name = dataset_name
        self._class_names = list(classes)
        self._output_dir = output_dir
        self._distributed = distributed
        self._max_dets = int(max_dets_per_image)
        self._compute_coco = compute_coco
        self._pixel_inclusive = (meta.get("json_file", None) is None) if pixel_inclusive is None else pixel_inclusive
        self._gt = _load_ground_truth(dataset_name, len(self._class_names))
        # where the evaluated weights come from ({"iteration", "checkpoint"}; GemTrainer.test sets it),
        # recorded as "source" in uodb_metrics_<dataset>.json
        self.source: Optional[dict] = None
        self.reset()

    def reset(self) -> None:
        self._predictions: List[dict] = []

    def process(self, inputs, outputs) -> None:
        """Store each image's detections (as numpy); raises on inputs that do not fit the dataset."""
        num_classes = len(self._class_names)
        for inp, out in zip(inputs, outputs):
            name = inp.get("dataset_name", self._dataset_name)
            if name != self._dataset_name:
                raise ValueError(
                    f"UODBEvaluator({self._dataset_name!r}) was given an image of dataset {name!r}; "
                    "use one evaluator per dataset"
                )
            image_id = inp["image_id"]
            if image_id not in self._gt.index:
                raise ValueError(f"image_id {image_id!r} is not in dataset {self._dataset_name!r}")
            if "instances" not in out:
                raise KeyError(f"output for image {image_id!r} has no 'instances'")
            inst = out["instances"].to("cpu")
            routed_right = None
            if "routed_dataset" in out:  # auto test-time routing: the model chose the dataset itself
                routed_right = dataset_domain(out["routed_dataset"]) == dataset_domain(self._dataset_name)
                if not routed_right:  # its classes belong to another dataset's label space: no detections here
                    inst = inst[:0]
            boxes = inst.pred_boxes.tensor.detach().double().numpy().reshape(-1, 4)
            scores = inst.scores.detach().double().numpy().reshape(-1)
            classes = inst.pred_classes.detach().numpy().astype(np.int64).reshape(-1)
            bad = (classes < 0) | (classes >= num_classes)
            if bad.any():
                raise ValueError(
                    f"image {image_id!r} of dataset {self._dataset_name!r}: pred_classes "
                    f"{sorted(set(classes[bad].tolist()))} outside the dataset's {num_classes} classes "
                    f"(expected local ids 0..{num_classes - 1})"
                )
            if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
                raise ValueError(f"image {image_id!r} of dataset {self._dataset_name!r}: non-finite boxes or scores")
            self._predictions.append({"image_id": image_id, "boxes": boxes, "scores": scores, "classes": classes,
                                      "routed_right": routed_right})

    def evaluate(self):
        """Gather, then compute the metrics (rank 0 returns ``{"uodb": ...}``, other ranks ``{}``)."""
        predictions = self._predictions
        if self._distributed and comm.get_world_size() > 1:
            comm.synchronize()
            gathered = comm.gather(predictions, dst=0)
            if not comm.is_main_process():
                return {}
            predictions = [p for rank in gathered for p in rank]
        metrics = self._compute(predictions)
        if self._output_dir:
            path = os.path.join(self._output_dir, f"uodb_metrics_{self._dataset_name}.json")
            payload = OrderedDict(metrics, source=None if self.source is None else dict(self.source))
            atomic_write_text(path, json.dumps(json_safe(payload), indent=2) + "\n")
        return OrderedDict([(RESULT_KEY, metrics)])

    def _compute(self, predictions: List[dict]) -> OrderedDict[str, float]:
        gt, num_classes = self._gt, len(self._class_names)
        seen = [self._gt.index[p["image_id"]] for p in predictions]
        if len(set(seen)) != len(seen):
            dup = next(p["image_id"] for p, s in zip(predictions, seen) if seen.count(s) > 1)
            raise ValueError(f"dataset {self._dataset_name!r}: image {dup!r} was processed more than once")
        if len(seen) < len(gt.image_ids):
            logger.warning(
                "%s: %d of %d images have no predictions; their objects count as missed",
                self._dataset_name, len(gt.image_ids) - len(seen), len(gt.image_ids),
            )
        counts = [p["scores"].shape[0] for p in predictions]
        det_image = np.repeat(np.asarray(seen, dtype=np.int64), counts)
        det_boxes = np.concatenate([p["boxes"] for p in predictions]) if predictions else np.zeros((0, 4))
        det_scores = np.concatenate([p["scores"] for p in predictions]) if predictions else np.zeros(0)
        det_class = np.concatenate([p["classes"] for p in predictions]) if predictions else np.zeros(0, np.int64)

        ap, npos = voc07_ap_per_class(
            gt.image, gt.category, gt.boxes, gt.ignore, det_image, det_class, det_boxes, det_scores,
            num_classes, iou_threshold=0.5, pixel_inclusive=self._pixel_inclusive,
        )
        missing = [n for n, k in zip(self._class_names, npos) if k == 0]
        if missing:
            logger.warning("%s: classes without (non-difficult) ground truth count as AP 0: %s",
                           self._dataset_name, missing)
        if self._compute_coco:
            coco = coco_box_ap(
                len(gt.image_ids), gt.image, gt.category, gt.boxes, gt.ignore, det_image, det_class, det_boxes,
                det_scores, num_classes, pixel_inclusive=self._pixel_inclusive, max_dets_per_image=self._max_dets,
            )
        else:
            coco = {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
        metrics = OrderedDict()
        metrics["AP50_voc07"] = float(np.mean(ap * 100))
        metrics.update(coco)
        routed = [p["routed_right"] for p in predictions if p.get("routed_right") is not None]
        if routed:  # share of images that auto routing sent to their own dataset
            metrics["auto_routing_acc"] = float(100 * np.mean(routed))
        for name, value in zip(self._class_names, ap):
            metrics[f"AP50_voc07-{name}"] = float(value * 100)
        return metrics


def build_uodb_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None) -> UODBEvaluator:
    """The Trainer's evaluator for ``dataset_name``; files go to ``output_folder`` or
    ``<OUTPUT_DIR>/inference``; ``TEST.UODB_COCO_AP`` switches pycocotools on/off.
    Returns a :class:`UODBEvaluator`.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    return UODBEvaluator(dataset_name, output_dir=output_folder, distributed=True,
                         compute_coco=bool(cfg.TEST.UODB_COCO_AP))
