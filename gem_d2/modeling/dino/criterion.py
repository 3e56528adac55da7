"""DINO's set criterion: sigmoid focal + L1 + GIoU losses for every decoder layer, the encoder
proposals and the denoising queries, with per-image class-block restriction.

Normalisation (as DINO/detrex): with ``num_boxes`` = targets in the batch (all-reduced over ranks,
divided by the world size, clamped to >= 1),

- class loss = sum of the elementwise sigmoid focal loss over all queries and the image's classes
  / num_boxes (detrex writes it ``loss.mean(1).sum() / num_boxes * Q``, which is the same);
- L1 loss = sum over matched pairs of ``|b - b_hat|_1`` (cxcywh) / num_boxes;
- GIoU loss = sum over matched pairs of ``1 - GIoU`` / num_boxes.

Denoising losses use the fixed DN correspondence (no matching) and ``num_boxes * G`` (G = DN groups).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from gem_d2.layers.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from gem_d2.modeling.dino.denoising import dn_match_indices
from gem_d2.modeling.dino.matcher import check_targets

__all__ = ["SetCriterion", "average_num_boxes"]

_LOSS_NAMES = ("loss_class", "loss_bbox", "loss_giou")


def average_num_boxes(targets: List[Dict[str, Tensor]], device) -> float:
    """Targets per rank: total over ranks when ``torch.distributed`` is initialised / world size, >= 1."""
    total = torch.tensor([float(sum(int(t["labels"].numel()) for t in targets))], device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        world = dist.get_world_size()
    return max(float(total.item()) / world, 1.0)


class SetCriterion(nn.Module):
    """Losses of DINO's outputs against the targets.

    Args:
        num_classes: ``K`` of the unified label space.
        matcher: a ``HungarianMatcher`` (or anything with its call signature).
        weight_dict: weights of ``loss_class``, ``loss_bbox``, ``loss_giou``; applied to every variant
            (aux ``_i``, ``_enc``, ``_dn``, ``_dn_i``).
        focal_alpha, focal_gamma: sigmoid focal loss parameters.
        emit_zero_dn: when the outputs carry no DN part (e.g. a batch without objects), still return
            the DN keys with value 0 so the loss dict has the same keys every iteration (detectron2
            averages metrics over workers key by key). Set False for a model without DN.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float],
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, emit_zero_dn: bool = True):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        missing = [k for k in _LOSS_NAMES if k not in weight_dict]
        if missing:
            raise KeyError(f"weight_dict lacks {missing}; it needs {list(_LOSS_NAMES)}, got {sorted(weight_dict)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = {k: float(weight_dict[k]) for k in _LOSS_NAMES}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.emit_zero_dn = emit_zero_dn

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]], class_masks: Optional[Tensor] = None,
                dn_meta: Optional[Dict] = None) -> Dict[str, Tensor]:
        """Compute all weighted losses.

        Args:
            outputs: ``{"pred_logits": (N, Q, K), "pred_boxes": (N, Q, 4) cxcywh, "aux_outputs": [...]
                (optional), "enc_outputs": {...} (optional), "dn_outputs": {"pred_logits" (N, pad, K),
                "pred_boxes", "aux_outputs"} (optional, requires dn_meta)}``.
            targets: per image ``{"labels": (M_i,) long, "boxes": (M_i, 4) normalised cxcywh}``.
            class_masks: ``(N, K)`` bool, the classes of each image's dataset block, or None (all).
            dn_meta: from ``prepare_cdn``; required with ``dn_outputs``.
        Returns:
            ``{loss_class, loss_bbox, loss_giou}`` for the last layer plus ``_{i}`` (aux layer i),
            ``_enc`` and ``_dn`` / ``_dn_{i}`` variants, each multiplied by its weight.
        """
        logits = outputs["pred_logits"]
        n, _, k = logits.shape
        if k != self.num_classes:
            raise ValueError(f"pred_logits has {k} classes, criterion was built for {self.num_classes}")
        check_targets(targets, n, k)
        device = logits.device
        if class_masks is not None:
            class_masks = self._check_class_masks(class_masks, targets, n, k, device)
        num_boxes = average_num_boxes(targets, device)

        losses: Dict[str, Tensor] = {}
        layers: List[Tuple[str, Dict]] = [("", outputs)]
        layers += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []) or [])]
        if outputs.get("enc_outputs") is not None:
            layers.append(("_enc", outputs["enc_outputs"]))
        for suffix, out in layers:
            indices = self.matcher(out["pred_logits"], out["pred_boxes"], targets)
            losses.update(self._layer_losses(out, targets, indices, num_boxes, class_masks, suffix))

        dn_out = outputs.get("dn_outputs")
        if (dn_out is None) != (dn_meta is None):
            raise ValueError("dn_outputs and dn_meta must be given together "
                             f"(got dn_outputs={'present' if dn_out is not None else None}, "
                             f"dn_meta={'present' if dn_meta is not None else None})")
        num_aux = len(outputs.get("aux_outputs", []) or [])
        if dn_out is not None:
            if dn_out["pred_logits"].shape[1] != dn_meta["pad_size"]:
                raise ValueError(f"dn_outputs has {dn_out['pred_logits'].shape[1]} queries, dn_meta pad_size is "
                                 f"{dn_meta['pad_size']}")
            if list(dn_meta["num_targets"]) != [int(t["labels"].numel()) for t in targets]:
                raise ValueError(f"dn_meta num_targets {dn_meta['num_targets']} do not match the targets")
            dn_indices = dn_match_indices(dn_meta, device)
            dn_boxes = num_boxes * dn_meta["num_dn_group"]
            dn_layers = [("_dn", dn_out)] + [(f"_dn_{i}", aux) for i, aux in enumerate(dn_out.get("aux_outputs", []))]
            for suffix, out in dn_layers:
                losses.update(self._layer_losses(out, targets, dn_indices, dn_boxes, class_masks, suffix))
        elif self.emit_zero_dn:
            zero = logits.new_zeros(())
            for suffix in ["_dn"] + [f"_dn_{i}" for i in range(num_aux)]:
                losses.update({name + suffix: zero for name in _LOSS_NAMES})
        return losses

    def _check_class_masks(self, class_masks: Tensor, targets, n: int, k: int, device) -> Tensor:
        if class_masks.shape != (n, k) or class_masks.dtype != torch.bool:
            raise ValueError(f"class_masks must be a bool tensor of shape ({n}, {k}), got {class_masks.dtype} "
                             f"{tuple(class_masks.shape)}")
        class_masks = class_masks.to(device)
        empty = (~class_masks.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"class_masks rows {empty} select no class")
        for i, t in enumerate(targets):
            labels = t["labels"].to(device)
            if labels.numel() and not bool(class_masks[i, labels].all()):
                outside = labels[~class_masks[i, labels]].tolist()
                raise ValueError(f"targets[{i}] has labels {outside} outside its class block (class_masks[{i}])")
        return class_masks

    def _layer_losses(self, out: Dict, targets, indices, num_boxes: float, class_masks: Optional[Tensor],
                      suffix: str) -> Dict[str, Tensor]:
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        if logits.dtype in (torch.float16, torch.bfloat16):  # AMP outputs: losses in float32
            logits, boxes = logits.float(), boxes.float()
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        tgt_labels = torch.cat([t["labels"].to(logits.device)[j] for t, (_, j) in zip(targets, indices)])
        tgt_boxes = torch.cat([t["boxes"].to(boxes.device, boxes.dtype)[j] for t, (_, j) in zip(targets, indices)])

        onehot = torch.zeros_like(logits)
        onehot[batch_idx, src_idx, tgt_labels] = 1.0
        if class_masks is None:
            focal = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum")
        else:
            # Boolean selection (not multiplication by the mask) so that logits outside the block
            # cannot reach the loss or its gradient even when non-finite.
            keep = class_masks[:, None, :].expand_as(logits)
            focal = sigmoid_focal_loss(logits[keep], onehot[keep], self.focal_alpha, self.focal_gamma,
                                       reduction="sum")
        matched = boxes[batch_idx, src_idx]
        l1 = (matched - tgt_boxes).abs().sum()
        giou = (1 - paired_generalized_box_iou(box_cxcywh_to_xyxy(matched), box_cxcywh_to_xyxy(tgt_boxes))).sum()
        w = self.weight_dict
        return {
            "loss_class" + suffix: focal / num_boxes * w["loss_class"],
            "loss_bbox" + suffix: l1 / num_boxes * w["loss_bbox"],
            "loss_giou" + suffix: giou / num_boxes * w["loss_giou"],
        }
