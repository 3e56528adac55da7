"""Hungarian matching between DINO's predictions and the ground truth (one image at a time)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from gem_d2.layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "focal_class_cost", "check_targets"]


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """DINO's focal matching cost of each prediction for each target's class.

    ``cost[q, t] = alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` with
    ``p = sigmoid(logits[q, labels[t]])``: the focal loss of calling ``q`` positive for that class
    minus the focal loss of calling it negative. Logs are computed as ``-logsigmoid(±x)`` (exact,
    no ``+1e-8`` guard).

    Args:
        logits: ``(Q, K)`` class logits.
        labels: ``(M,)`` long class ids in ``[0, K)``.
    Returns:
        ``(Q, M)``.
    """
    x = logits[:, labels]
    p = x.sigmoid()
    pos = alpha * (1 - p) ** gamma * (-F.logsigmoid(x))
    neg = (1 - alpha) * p ** gamma * (-F.logsigmoid(-x))
    return pos - neg


def check_targets(targets: List[Dict[str, Tensor]], batch_size: int, num_classes: int) -> None:
    """Raise a clear error unless ``targets`` is one ``{"labels" (M,), "boxes" (M, 4)}`` dict per image."""
    if len(targets) != batch_size:
        raise ValueError(f"got {len(targets)} target dicts for a batch of {batch_size} images")
    for i, t in enumerate(targets):
        if "labels" not in t or "boxes" not in t:
            raise KeyError(f"targets[{i}] needs keys 'labels' and 'boxes', has {sorted(t)}")
        labels, boxes = t["labels"], t["boxes"]
        if labels.dim() != 1 or labels.dtype.is_floating_point:
            raise ValueError(f"targets[{i}]['labels'] must be a 1-d integer tensor, got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        if boxes.shape != (labels.shape[0], 4):
            raise ValueError(f"targets[{i}]['boxes'] must have shape ({labels.shape[0]}, 4), got {tuple(boxes.shape)}")


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets minimising a weighted cost.

    cost = ``cost_class`` * focal class cost + ``cost_bbox`` * L1(cxcywh) + ``cost_giou`` * (-GIoU),
    solved exactly per image by ``scipy.optimize.linear_sum_assignment`` on a CPU float64 copy.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if min(cost_class, cost_bbox, cost_giou) < 0 or cost_class == cost_bbox == cost_giou == 0:
            raise ValueError(f"matcher costs must be >= 0 and not all 0, got class={cost_class} "
                             f"bbox={cost_bbox} giou={cost_giou}")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Cost of one image: ``logits (Q, K)``, ``boxes (Q, 4)``, targets ``(M,)``, ``(M, 4)`` -> ``(Q, M)``."""
        if logits.dtype in (torch.float16, torch.bfloat16):  # AMP outputs: match in float32
            logits, boxes = logits.float(), boxes.float()
        tgt_boxes = tgt_boxes.to(boxes.dtype)
        c_class = focal_class_cost(logits, tgt_labels, self.focal_alpha, self.focal_gamma)
        c_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return self.cost_class * c_class + self.cost_bbox * c_bbox + self.cost_giou * c_giou

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor,
                targets: List[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        Args:
            pred_logits: ``(N, Q, K)`` class logits.
            pred_boxes: ``(N, Q, 4)`` normalised cxcywh.
            targets: per image ``{"labels": (M_i,) long, "boxes": (M_i, 4) normalised cxcywh}``.
        Returns:
            per image ``(pred_idx (m_i,), tgt_idx (m_i,))`` long tensors on ``pred_logits``' device,
            ``m_i = min(Q, M_i)``, sorted by ``pred_idx``; empty when the image has no targets.
        """
        if pred_logits.dim() != 3 or pred_boxes.shape != pred_logits.shape[:2] + (4,):
            raise ValueError(f"pred_logits must be (N, Q, K) and pred_boxes (N, Q, 4), got "
                             f"{tuple(pred_logits.shape)} and {tuple(pred_boxes.shape)}")
        n, _, k = pred_logits.shape
        check_targets(targets, n, k)
        device = pred_logits.device
        indices = []
        for i, t in enumerate(targets):
            if t["labels"].numel() == 0:
                empty = torch.empty(0, dtype=torch.long, device=device)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(pred_logits[i], pred_boxes[i], t["labels"].to(device), t["boxes"].to(device))
            cost = cost.detach().to("cpu", torch.float64)
            if not torch.isfinite(cost).all():
                raise ValueError(f"matching cost of image {i} is not finite: check for NaN/inf predictions or "
                                 f"degenerate (zero-area) target boxes")
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.long, device=device),
                            torch.as_tensor(cols, dtype=torch.long, device=device)))
        return indices
