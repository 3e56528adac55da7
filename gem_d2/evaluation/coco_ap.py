"""COCO box AP / AP50 / AP75 of one dataset through pycocotools' ``COCOeval``, entirely in memory.

Ground truth and detections become COCO dicts (XYWH boxes) without temporary files. Choices:

- Ignored (``difficult``) ground truth is given ``iscrowd=1``: ``COCOeval._prepare`` overwrites any
  ``ignore`` field with ``iscrowd``, so crowd is pycocotools' only way to ignore a box. A detection
  is then matched to a regular box if it can be; otherwise, if it covers a crowd box (IoU computed
  by COCO as intersection over the *detection's* area >= threshold), it is neither TP nor FP, and
  several detections may fall on one crowd box. Crowd boxes do not count toward recall.
- ``pixel_inclusive=True`` (VOC-layout datasets) converts ``(x1, y1, x2, y2)`` to
  ``(x1, y1, x2 - x1 + 1, y2 - y1 + 1)`` for ground truth and detections alike, so COCO's
  continuous IoU equals the inclusive-pixel IoU of the VOC07 protocol.
- Only the ``area=all`` range is evaluated (AP/AP50/AP75 do not depend on the other ranges, which
  would quadruple pycocotools' per-image work) with ``maxDets = [max_dets_per_image]``; the numbers
  are those of ``COCOeval.summarize()``'s ``stats[0:3]`` for the same ``maxDets``.
- Classes without ground truth are left out of the mean (COCOeval marks them -1); AP is NaN when no
  class has ground truth.
"""
from __future__ import annotations

import contextlib
import io
from typing import Dict

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def _xywh(boxes: np.ndarray, pixel_inclusive: bool) -> np.ndarray:
    one = 1.0 if pixel_inclusive else 0.0
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0] + one, boxes[:, 3] - boxes[:, 1] + one], 1)


def _coco_from_dict(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_box_ap(
    num_images: int,
    gt_image: np.ndarray,
    gt_class: np.ndarray,
    gt_boxes: np.ndarray,
    gt_ignore: np.ndarray,
    det_image: np.ndarray,
    det_class: np.ndarray,
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    num_classes: int,
    pixel_inclusive: bool = True,
    max_dets_per_image: int = 100,
) -> Dict[str, float]:
    """COCO AP over IoU 0.50:0.95, AP50 and AP75 (percent; NaN where undefined) via pycocotools.

    Args:
        num_images: images ``0..num_images-1`` are evaluated (also those without boxes or detections).
        gt_*, det_*: as in :func:`gem_d2.evaluation.voc07_ap.voc07_ap_per_class` (image indices,
            0-based class ids, XYXY boxes, ignore flags / scores).
        num_classes: the dataset's classes ``0..num_classes-1``.
        max_dets_per_image: COCOeval's ``maxDets`` (pycocotools keeps the highest-scoring ones per
            image *and class*).
    Returns:
        ``{"AP": ..., "AP50": ..., "AP75": ...}``.
    """
    if max_dets_per_image < 1:
        raise ValueError(f"max_dets_per_image must be >= 1, got {max_dets_per_image}")
    # COCO ids: image i -> i + 1, class c -> c + 1 (pycocotools treats some id-0 values as missing).
    images = [{"id": i + 1} for i in range(num_images)]
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    gt_xywh = _xywh(gt_boxes, pixel_inclusive)
    gt_anns = [
        {"id": k + 1, "image_id": int(i) + 1, "category_id": int(c) + 1, "bbox": b.tolist(),
         "area": float(b[2] * b[3]), "iscrowd": int(ig)}
        for k, (i, c, b, ig) in enumerate(zip(gt_image, gt_class, gt_xywh, gt_ignore))
    ]
    det_xywh = _xywh(det_boxes, pixel_inclusive)
    det_anns = [
        {"id": k + 1, "image_id": int(i) + 1, "category_id": int(c) + 1, "bbox": b.tolist(),
         "area": float(b[2] * b[3]), "score": float(s), "iscrowd": 0}
        for k, (i, c, b, s) in enumerate(zip(det_image, det_class, det_xywh, det_scores))
    ]
    coco_gt = _coco_from_dict({"images": images, "annotations": gt_anns, "categories": categories})
    coco_dt = _coco_from_dict({"images": images, "annotations": det_anns, "categories": categories})

    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    params = evaluator.params
    params.areaRng, params.areaRngLbl = [params.areaRng[0]], [params.areaRngLbl[0]]  # "all" only
    params.maxDets = [max_dets_per_image]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, 0]  # [IoU thresholds, recall points, classes]

    def mean_valid(p: np.ndarray) -> float:
        valid = p[p > -1]
        return float(np.mean(valid) * 100) if valid.size else float("nan")

    # Same selection as COCOeval.summarize (it also looks thresholds up by float equality).
    return {
        "AP": mean_valid(precision),
        "AP50": mean_valid(precision[np.where(params.iouThrs == 0.5)[0]]),
        "AP75": mean_valid(precision[np.where(params.iouThrs == 0.75)[0]]),
    }
