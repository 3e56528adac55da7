"""PASCAL VOC 2007 11-point average precision, vectorised over all images and classes, in memory.

The rules are those of the VOC devkit's ``voc_eval`` (py-faster-rcnn), which both the UODB reference
code and detectron2's ``PascalVOCDetectionEvaluator`` use:

- detections of a class are ranked by score (descending); each is compared with the ground-truth
  boxes of its image and class and takes the one of highest IoU (the first in annotation order on
  ties);
- IoU > threshold (strictly) and that box is *ignored* (``difficult``): neither TP nor FP;
- IoU > threshold and the box is not yet taken: TP, and the box is taken; already taken: FP
  (a duplicate detection). Note the devkit never falls back to a second-best box;
- otherwise FP. Recall is over the non-ignored boxes of the class;
- AP = (1/11) * sum over t in {0, 0.1, ..., 1} of max{precision(r) : r >= t} (0 where no r >= t);
- a class with no non-ignored box has AP 0 (the devkit divides 0 by 0 and ends at 0).

The sequential "take the box" loop is replaced by an equivalent closed form: a detection's box can
only be taken by a detection whose best box it is, so the TP among all detections sharing one best
box is the first of them in rank order. Only the per-class ranking and the 11-point sum loop over
classes in Python.

Pixel convention. With ``pixel_inclusive=True`` a box ``(x1, y1, x2, y2)`` covers the pixels
x1..x2 inclusive, so widths are ``x2 - x1 + 1`` (the devkit's convention for integer VOC boxes); with
``False`` widths are ``x2 - x1`` (continuous coordinates, e.g. COCO json).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

# Exactly the devkit's grid ``np.arange(0.0, 1.1, 0.1)``: its values are not the decimals 0.3, 0.6,
# 0.7 (e.g. 0.30000000000000004), which decides ``recall >= t`` when recall is exactly 3/10.
VOC07_RECALL_THRESHOLDS = np.arange(0.0, 1.1, 0.1)


def voc07_11point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC07 11-point AP of one precision/recall curve.

    Args:
        recall, precision: 1-D arrays of equal length in detection rank order (recall non-decreasing).
    Returns:
        AP as a fraction in [0, 1].
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if recall.shape != precision.shape or recall.ndim != 1:
        raise ValueError(f"recall and precision must be 1-D of equal length, got {recall.shape} and {precision.shape}")
    if recall.size == 0:
        return 0.0
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # max precision at any rank >= i
    first = np.searchsorted(recall, VOC07_RECALL_THRESHOLDS, side="left")
    ap = 0.0
    for i in first:  # summed in the devkit's order so the result is bit-identical
        p = envelope[i] if i < recall.size else 0.0
        ap = ap + p / 11.0
    return float(ap)


def box_iou_pairs(a: np.ndarray, b: np.ndarray, pixel_inclusive: bool) -> np.ndarray:
    """IoU of paired boxes ``a[i]`` and ``b[i]`` (both ``(N, 4)`` XYXY); 0 where the union is empty.

    The operations follow the devkit's formula term by term so that decisions at the threshold agree.
    """
    one = 1.0 if pixel_inclusive else 0.0
    iw = np.maximum(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + one, 0.0)
    ih = np.maximum(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + one, 0.0)
    inters = iw * ih
    union = (a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one) + (b[:, 2] - b[:, 0] + one) * (
        b[:, 3] - b[:, 1] + one
    ) - inters
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inters / np.where(union > 0, union, 1.0), 0.0)


def best_overlaps(
    gt_group: np.ndarray, gt_boxes: np.ndarray, det_group: np.ndarray, det_boxes: np.ndarray, pixel_inclusive: bool
) -> Tuple[np.ndarray, np.ndarray]:
    """For every detection, its highest-IoU ground-truth box among those of the same group.

    Args:
        gt_group, det_group: integer group keys (e.g. ``image_index * num_classes + class``).
        gt_boxes, det_boxes: ``(G, 4)`` and ``(D, 4)`` XYXY boxes.
    Returns:
        ``(best_iou, best_gt)``: float array (``-inf`` where the group has no box) and the index into
        the ground truth (``-1`` where none); ties go to the lowest ground-truth index.
    """
    num_det = det_group.shape[0]
    best_iou = np.full(num_det, -np.inf)
    best_gt = np.full(num_det, -1, dtype=np.int64)
    if num_det == 0 or gt_group.shape[0] == 0:
        return best_iou, best_gt
    order = np.argsort(gt_group, kind="stable")
    sorted_groups = gt_group[order]
    start = np.searchsorted(sorted_groups, det_group, side="left")
    count = np.searchsorted(sorted_groups, det_group, side="right") - start
    total = int(count.sum())
    if total == 0:
        return best_iou, best_gt
    # Enumerate every (detection, gt of its group) pair, grouped by detection, gts in index order.
    pair_det = np.repeat(np.arange(num_det), count)
    first_pair = np.cumsum(count) - count
    pair_gt = order[start[pair_det] + np.arange(total) - first_pair[pair_det]]
    iou = box_iou_pairs(det_boxes[pair_det], gt_boxes[pair_gt], pixel_inclusive)
    has_gt = count > 0
    best_iou[has_gt] = np.maximum.reduceat(iou, first_pair[has_gt])
    is_best = iou == best_iou[pair_det]
    best_det, best_pair_gt = pair_det[is_best], pair_gt[is_best]
    first = np.ones(best_det.shape[0], dtype=bool)
    first[1:] = best_det[1:] != best_det[:-1]
    best_gt[best_det[first]] = best_pair_gt[first]
    return best_iou, best_gt


def voc07_ap_per_class(
    gt_image: np.ndarray,
    gt_class: np.ndarray,
    gt_boxes: np.ndarray,
    gt_ignore: np.ndarray,
    det_image: np.ndarray,
    det_class: np.ndarray,
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    num_classes: int,
    iou_threshold: float = 0.5,
    pixel_inclusive: bool = True,
) -> Tuple[np.ndarray, np.ndarray]:
    """VOC07 11-point AP of every class at one IoU threshold.

    Args:
        gt_image, gt_class: ``(G,)`` image index and class id (0-based) of each ground-truth box,
            boxes of one image and class in annotation order.
        gt_boxes: ``(G, 4)`` XYXY; gt_ignore: ``(G,)`` bool, True for difficult (ignored) boxes.
        det_image, det_class, det_boxes, det_scores: the same for the ``D`` detections, in the order
            they were produced (this order breaks score ties, as in the devkit).
        num_classes: classes ``0..num_classes-1`` are evaluated.
    Returns:
        ``(ap, num_positives)``: ``(num_classes,)`` AP as fractions and counts of non-ignored boxes.
    """
    gt_image = np.asarray(gt_image, dtype=np.int64)
    gt_class = np.asarray(gt_class, dtype=np.int64)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_ignore = np.asarray(gt_ignore, dtype=bool)
    det_image = np.asarray(det_image, dtype=np.int64)
    det_class = np.asarray(det_class, dtype=np.int64)
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    det_scores = np.asarray(det_scores, dtype=np.float64)
    for name, arr in (("gt_class", gt_class), ("det_class", det_class)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{arr.min()}, {arr.max()}]")

    num_positives = np.bincount(gt_class[~gt_ignore], minlength=num_classes)
    best_iou, best_gt = best_overlaps(
        gt_image * num_classes + gt_class, gt_boxes, det_image * num_classes + det_class, det_boxes, pixel_inclusive
    )
    hit = best_iou > iou_threshold
    ignored = np.zeros_like(hit)
    ignored[hit] = gt_ignore[best_gt[hit]]

    ap = np.zeros(num_classes)
    by_class = np.argsort(det_class, kind="stable")
    bounds = np.searchsorted(det_class[by_class], np.arange(num_classes + 1))
    eps = np.finfo(np.float64).eps
    for c in range(num_classes):
        if num_positives[c] == 0:
            continue  # AP 0, as the devkit's 0/0 recall gives
        members = by_class[bounds[c]:bounds[c + 1]]
        # The devkit's own (unstable) sort on the same array, so tied scores rank identically.
        ranked = members[np.argsort(-det_scores[members])]
        candidate = hit[ranked] & ~ignored[ranked]
        tp = np.zeros(ranked.shape[0])
        cand_pos = np.flatnonzero(candidate)
        _, first = np.unique(best_gt[ranked[cand_pos]], return_index=True)
        tp[cand_pos[first]] = 1.0
        fp = (~hit[ranked] | candidate).astype(np.float64) - tp
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / float(num_positives[c])
        precision = tp / np.maximum(tp + fp, eps)
        ap[c] = voc07_11point_ap(recall, precision)
    return ap, num_positives
