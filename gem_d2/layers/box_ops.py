"""Box conversions, generalised IoU and the inverse sigmoid used by DINO's heads and losses.

Boxes are ``(..., 4)`` tensors, either ``cxcywh`` (centre, width, height) or ``xyxy`` (corners), in
any unit (DINO uses coordinates normalised by the image size). All functions are differentiable and
keep the input's device and dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor
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
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` ``(x1, y1, x2, y2)`` -> ``(..., 4)`` ``(cx, cy, w, h)``."""
    _check_boxes("boxes", boxes)
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


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
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    enclosing = (torch.maximum(boxes1[..., 2:], boxes2[..., 2:]) - torch.minimum(boxes1[..., :2], boxes2[..., :2]))
    area_c = enclosing[..., 0] * enclosing[..., 1]
    return inter / union - (area_c - union) / area_c


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """``log(max(x, eps) / max(1 - x, eps))`` after clamping ``x`` to [0, 1], so the result lies in
    ``[log(eps), -log(eps)]`` (about ±6.9 with the default). ``eps = 1e-3`` as DINO, Deformable-DETR and
    detrex: every reference box and DN anchor passes through it, so the clamp is part of the model."""
    if not eps > 0:
        raise ValueError(f"inverse_sigmoid eps must be > 0, got {eps}")
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
