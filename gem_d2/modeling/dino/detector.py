"""DINO as a plain ``nn.Module``: backbone features in, DETR-style output dicts out (no detectron2, no cfg).

The meta-architecture (gem_d2.modeling.meta_arch) owns the backbone, the criterion and the
conversion to and from detectron2's structures; this module owns the neck, the position embedding,
the transformer, the denoising label embedding and the per-image class-block inference.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gem_d2.layers.neck import ChannelMapper
from gem_d2.layers.position_encoding import PositionEmbeddingSine
from gem_d2.modeling.dino.denoising import prepare_cdn, split_dn_outputs
from gem_d2.modeling.dino.transformer import DINOTransformer
from gem_d2.modeling.moe.context import RoutingContext

__all__ = ["DINO", "class_block_masks"]


def class_block_masks(class_blocks: Tensor, num_classes: int) -> Tensor:
    """``class_blocks (N, 2)`` long ``[start, stop)`` -> ``(N, K)`` bool, True inside each image's block."""
    if class_blocks.dim() != 2 or class_blocks.shape[1] != 2:
        raise ValueError(f"class_blocks must have shape (N, 2) as [start, stop), got {tuple(class_blocks.shape)}")
    start, stop = class_blocks[:, :1], class_blocks[:, 1:]
    if bool(((start < 0) | (stop > num_classes) | (start >= stop)).any()):
        raise ValueError(f"class_blocks must satisfy 0 <= start < stop <= num_classes={num_classes}, "
                         f"got {class_blocks.tolist()}")
    ks = torch.arange(num_classes, device=class_blocks.device)[None]
    return (ks >= start) & (ks < stop)


class DINO(nn.Module):
    """DINO detector head on multi-level backbone features.

    Args:
        neck: maps the backbone levels to ``L`` maps of ``C`` channels.
        position_embedding: sine embedding of the padding masks (``C`` channels).
        transformer: :class:`DINOTransformer` (its ``num_queries``/``num_classes`` are used).
        dn_number, label_noise_ratio, box_noise_scale: contrastive denoising (``dn_number <= 0``: off).
        aux_loss: also return every decoder layer's and the encoder's outputs.
    """

    def __init__(self, neck: ChannelMapper, position_embedding: PositionEmbeddingSine, transformer: DINOTransformer,
                 dn_number: int = 100, label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0,
                 aux_loss: bool = True):
        super().__init__()
        self.neck = neck
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.num_classes = transformer.num_classes
        self.num_queries = transformer.num_queries
        self.label_enc = nn.Embedding(self.num_classes, transformer.d_model)
        self.dn_number = dn_number
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.aux_loss = aux_loss

    def forward(self, features: Sequence[Tensor], image_mask: Tensor, class_blocks: Tensor, dataset_ids: Tensor,
                targets: Optional[List[Dict[str, Tensor]]] = None, ctx: Optional[RoutingContext] = None
                ) -> Tuple[Dict, Optional[Dict], RoutingContext]:
        """Detect.

        Args:
            features: backbone maps ``(N, C_l, H_l, W_l)``, finest first, as the neck expects.
            image_mask: ``(N, H, W)`` bool, True on padding of the batched image.
            class_blocks: ``(N, 2)`` long ``[start, stop)`` of each image's dataset block.
            dataset_ids: ``(N,)`` long dataset index of each image (for the FFN routers).
            targets: per image ``{"labels" (M,) unified ids, "boxes" (M, 4) normalised cxcywh}``; in
                training they drive contrastive denoising.
            ctx: routing context to fill (a new one when None).
        Returns:
            ``(outputs, dn_meta, ctx)``. outputs: ``pred_logits (N, Q, K)``, ``pred_boxes (N, Q, 4)``
            (last layer); with ``aux_loss`` also ``aux_outputs`` (the other layers, first to
            second-last) and ``enc_outputs`` (the selected encoder proposals); with DN also
            ``dn_outputs`` (same keys for the ``pad`` DN queries). ``dn_meta`` as ``prepare_cdn``'s
            or None. ``ctx`` holds the routers' ``aux_losses`` and ``stats``.
        """
        n = image_mask.shape[0]
        if dataset_ids.shape != (n,):
            raise ValueError(f"dataset_ids must have shape ({n},), got {tuple(dataset_ids.shape)}")
        class_blocks = torch.as_tensor(class_blocks, dtype=torch.long, device=image_mask.device)
        class_masks = class_block_masks(class_blocks, self.num_classes)
        if ctx is None:
            ctx = RoutingContext(dataset_ids=dataset_ids)

        feats = self.neck(features)
        masks = [F.interpolate(image_mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0] for f in feats]
        pos = [self.position_embedding(m).to(f.dtype) for m, f in zip(masks, feats)]

        dn_label = dn_bbox = dn_mask = dn_meta = None
        if self.training and targets is not None:
            dn_label, dn_bbox, dn_mask, dn_meta = prepare_cdn(
                targets, self.dn_number, self.label_noise_ratio, self.box_noise_scale, self.num_classes,
                self.label_enc, self.num_queries, class_blocks, training=True)
        out = self.transformer(feats, masks, pos, class_masks, ctx, dn_label, dn_bbox, dn_mask, dn_meta)

        logits = out["logits"]
        if self.training and dn_meta is None:
            # keep label_enc in the graph when a batch has no DN queries (DDP expects every parameter)
            logits = logits + 0.0 * self.label_enc.weight.sum()
        (dn_logits, dn_boxes), (logits, boxes) = split_dn_outputs(logits, out["boxes"], dn_meta)
        outputs = self._pack(logits, boxes)
        if self.aux_loss:
            outputs["enc_outputs"] = {"pred_logits": out["enc_logits"], "pred_boxes": out["enc_boxes"]}
        if dn_meta is not None:
            outputs["dn_outputs"] = self._pack(dn_logits, dn_boxes)
        return outputs, dn_meta, ctx

    def _pack(self, logits: Tensor, boxes: Tensor) -> Dict:
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out

    @staticmethod
    def predict(pred_logits: Tensor, pred_boxes: Tensor, class_blocks: Tensor, num_select: int
                ) -> List[Tuple[Tensor, Tensor, Tensor]]:
        """Top-``num_select`` (query, class) pairs per image, only among the image's class block.

        Args:
            pred_logits: ``(N, Q, K)``; pred_boxes: ``(N, Q, 4)`` normalised cxcywh.
            class_blocks: ``(N, 2)`` ``[start, stop)``.
            num_select: detections per image (fewer when ``Q * block size`` is smaller).
        Returns:
            per image ``(scores (k,), labels (k,) unified class ids, boxes (k, 4) normalised cxcywh)``,
            highest score first.
        """
        if num_select <= 0:
            raise ValueError(f"MODEL.DINO.NUM_SELECT must be > 0, got {num_select}")
        results = []
        for logits, boxes, (start, stop) in zip(pred_logits, pred_boxes, class_blocks.tolist()):
            prob = logits[:, start:stop].sigmoid()
            width = stop - start
            scores, idx = prob.flatten().topk(min(num_select, prob.numel()))
            query = torch.div(idx, width, rounding_mode="floor")
            results.append((scores, idx % width + start, boxes[query]))
        return results
