"""Box conversions, generalised IoU and the inverse sigmoid used by DINO's heads and losses.

Boxes are ``(..., 4)`` tensors, either ``cxcywh`` (centre, width, height) or ``xyxy`` (corners), in
any unit (DINO uses coordinates normalised by the image size). All functions are differentiable and
keep the input's device and dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou_loss
from torchvision.ops import generalized_box_iou as _tv_generalized_box_iou

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "paired_generalized_box_iou",
    "inverse_sigmoid",
]


def _check_boxes(name: str, boxes: Tensor) -> None:
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (..., 4), got {tuple(boxes.shape)}")


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` ``(cx, cy, w, h)`` -> ``(..., 4)`` ``(x1, y1, x2, y2)``."""
    _check_boxes("boxes", boxes)
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` ``(x1, y1, x2, y2)`` -> ``(..., 4)`` ``(cx, cy, w, h)``."""
    _check_boxes("boxes", boxes)
    return box_convert(boxes, "xyxy", "cxcywh")


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU of ``boxes1 (A, 4)`` and ``boxes2 (B, 4)``, both xyxy -> ``(A, B)``.

    Boxes must have positive area (x2 > x1, y2 > y1); two empty boxes have no defined IoU (NaN).
    """
    _check_boxes("boxes1", boxes1)
    _check_boxes("boxes2", boxes2)
    if boxes1.dim() != 2 or boxes2.dim() != 2:
        raise ValueError(f"generalized_box_iou expects (A, 4) and (B, 4), got {tuple(boxes1.shape)} "
                         f"and {tuple(boxes2.shape)}")
    return _tv_generalized_box_iou(boxes1, boxes2)


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of corresponding rows: ``boxes1 (M, 4)``, ``boxes2 (M, 4)`` xyxy -> ``(M,)``.

    Equal to ``generalized_box_iou(boxes1, boxes2).diagonal()`` without the ``M x M`` matrix.
    """
    _check_boxes("boxes1", boxes1)
    _check_boxes("boxes2", boxes2)
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"paired_generalized_box_iou expects equal shapes, got {tuple(boxes1.shape)} "
                         f"and {tuple(boxes2.shape)}")
    # torchvision's GIoU loss is 1 - GIoU of paired rows; eps 0 keeps the exact ratios (positive-area boxes)
    return 1 - generalized_box_iou_loss(boxes1, boxes2, reduction="none", eps=0.0)


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """``log(max(x, eps) / max(1 - x, eps))`` after clamping ``x`` to [0, 1], so the result lies in
    ``[log(eps), -log(eps)]`` (about ±6.9 with the default). ``eps = 1e-3`` as DINO, Deformable-DETR and
    detrex: every reference box and DN anchor passes through it, so the clamp is part of the model."""
    if not eps > 0:
        raise ValueError(f"inverse_sigmoid eps must be > 0, got {eps}")
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
