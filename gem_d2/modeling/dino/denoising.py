"""DINO's contrastive denoising (CDN) queries, their self-attention mask, and output splitting.

Layout of the ``pad_size = 2 * G * B`` DN queries (``B`` = most objects in any image of the batch,
``G`` = number of groups), prepended to the ``Q`` matching queries in the decoder::

    [ group 0: B positives | B negatives ][ group 1: ... ] ... [ group G-1 ] [ Q matching queries ]

Positive ``k`` of group ``g`` sits at ``g * 2B + k`` and reconstructs target ``k`` of its image;
negative ``k`` at ``g * 2B + B + k`` is a harder-noised copy that must predict "no object". Images
with fewer than ``B`` objects leave their remaining slots as zero content / zero logit-box queries
(they are trained as "no object" and stay visible inside their group, like in the reference
implementation). ``dn_meta["dn_labels"]`` is -1 in those slots.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from gem_d2.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid

__all__ = ["prepare_cdn", "cdn_attention_mask", "dn_match_indices", "split_dn_outputs"]


def cdn_attention_mask(num_groups: int, single_pad: int, num_queries: int, device=None) -> Tensor:
    """Decoder self-attention mask for CDN, ``(pad + Q, pad + Q)`` bool, True = may NOT attend.

    ``pad = 2 * num_groups * single_pad``; row = query, column = key. As in DINO's reference code:

    - matching queries (rows ``pad:``) cannot see any DN query (columns ``:pad``), so they never
      get the ground truth through attention;
    - a DN group (rows ``g*2B:(g+1)*2B``) cannot see the other groups' DN queries;
    - DN queries can see their own group (positives and negatives) and all matching queries.
    """
    pad = 2 * num_groups * single_pad
    size = pad + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True
    group = 2 * single_pad
    for g in range(num_groups):
        rows = slice(g * group, (g + 1) * group)
        mask[rows, :g * group] = True
        mask[rows, (g + 1) * group:pad] = True
    return mask


def prepare_cdn(targets: List[Dict[str, Tensor]], dn_number: int, label_noise_ratio: float, box_noise_scale: float,
                num_classes: int, label_enc: nn.Embedding, num_queries: int, class_blocks: Optional[Tensor] = None,
                training: bool = True, generator: Optional[torch.Generator] = None):
    """Build DINO's contrastive denoising queries for a batch.

    Args:
        targets: per image ``{"labels": (M_i,) long, "boxes": (M_i, 4) normalised cxcywh}``.
        dn_number: DN budget; groups ``G = max(1, dn_number // max_i M_i)``, each with a positive and
            a negative copy of every target, so ``pad_size = 2 * G * max_i M_i``.
        label_noise_ratio: a label is replaced with probability ``label_noise_ratio / 2`` by a class
            drawn uniformly (it may draw the true class) from the image's dataset block
            ``class_blocks[i]`` (or from all ``num_classes`` when ``class_blocks`` is None).
        box_noise_scale: ``λ``; each xyxy corner moves by ``±u * λ * (w/2, h/2)``, ``u ∈ [0, 1)`` for
            positives and ``u ∈ [1, 2)`` for negatives, then boxes are clamped to [0, 1] (a negative
            whose corners cross gets width/height <= 0, which ``inverse_sigmoid`` clamps to ``eps``).
        num_classes: ``K`` of the unified label space.
        label_enc: ``nn.Embedding(>= K, C)`` giving the content of a DN query from its noised label.
        num_queries: ``Q`` matching queries (only for the attention mask's size).
        class_blocks: ``(N, 2)`` long ``[start, stop)`` of each image's class block, or None.
        training: DN is only built in training.
        generator: optional ``torch.Generator`` on ``label_enc``'s device, for the random draws.

    Returns:
        ``(dn_query_label (N, pad, C), dn_query_bbox (N, pad, 4) inverse-sigmoid cxcywh,
        dn_attn_mask (pad + Q, pad + Q) bool True = blocked, dn_meta)`` with dn_meta keys
        ``pad_size``, ``num_dn_group`` (G), ``single_pad`` (B: positives per group; a group spans
        ``2B``), ``num_queries`` (Q), ``num_targets`` (list of M_i), ``dn_labels`` ``(N, pad)`` long
        noised labels (-1 in empty slots), ``dn_valid`` ``(N, pad)`` bool (slot holds a query).
        All four are None when ``dn_number <= 0``, not ``training``, or the batch has no targets.
    """
    if not training or dn_number <= 0:
        return None, None, None, None
    if not 0 <= label_noise_ratio <= 1 or box_noise_scale < 0:
        raise ValueError(f"need 0 <= label_noise_ratio <= 1 and box_noise_scale >= 0, got "
                         f"{label_noise_ratio} and {box_noise_scale}")
    if label_enc.num_embeddings < num_classes:
        raise ValueError(f"label_enc has {label_enc.num_embeddings} embeddings, fewer than num_classes={num_classes}")
    batch = len(targets)
    counts = [int(t["labels"].numel()) for t in targets]
    max_gt = max(counts, default=0)
    if max_gt == 0:
        return None, None, None, None
    device = label_enc.weight.device
    if class_blocks is not None:
        class_blocks = torch.as_tensor(class_blocks, device=device)
        if class_blocks.shape != (batch, 2):
            raise ValueError(f"class_blocks must have shape ({batch}, 2) as [start, stop), got "
                             f"{tuple(class_blocks.shape)}")
        blocks = class_blocks.tolist()
        bad = [b for b in blocks if not 0 <= b[0] < b[1] <= num_classes]
        if bad:
            raise ValueError(f"class_blocks must satisfy 0 <= start < stop <= {num_classes}, got {bad}")

    groups = max(1, dn_number // max_gt)
    single_pad = max_gt
    pad_size = 2 * groups * single_pad
    labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.long)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=label_enc.weight.dtype)
    image_of = torch.cat([torch.full((c,), i, dtype=torch.long, device=device) for i, c in enumerate(counts)])
    rank_in_image = torch.cat([torch.arange(c, device=device) for c in counts])
    total = labels.numel()

    # Every target appears 2G times: copy r (r = 0..2G-1) is a positive when r is even, a negative when odd.
    copies = 2 * groups
    noised_labels = labels.repeat(copies)
    if label_noise_ratio > 0:
        flip = _rand((copies * total,), generator, device) < label_noise_ratio * 0.5
        if class_blocks is None:
            start = torch.zeros_like(noised_labels)
            width = torch.full_like(noised_labels, num_classes)
        else:
            start = class_blocks[image_of, 0].repeat(copies)
            width = (class_blocks[image_of, 1] - class_blocks[image_of, 0]).repeat(copies)
        draw = start + (_rand((copies * total,), generator, device) * width).long()
        draw = torch.minimum(draw, start + width - 1)  # guards u * width rounding up to width
        noised_labels = torch.where(flip, draw, noised_labels)

    noised_boxes = boxes.repeat(copies, 1)
    if box_noise_scale > 0:
        xyxy = box_cxcywh_to_xyxy(noised_boxes)
        half_wh = noised_boxes[:, 2:].repeat(1, 2) / 2
        magnitude = _rand(xyxy.shape, generator, device, xyxy.dtype)
        is_negative = (torch.arange(copies, device=device) % 2 == 1).repeat_interleave(total)
        magnitude = magnitude + is_negative[:, None].to(magnitude.dtype)
        sign = torch.where(_rand(xyxy.shape, generator, device) < 0.5, -1.0, 1.0).to(xyxy.dtype)
        xyxy = (xyxy + sign * magnitude * half_wh * box_noise_scale).clamp(0.0, 1.0)
        noised_boxes = box_xyxy_to_cxcywh(xyxy)

    copy_idx = torch.arange(copies, device=device).repeat_interleave(total)
    slot = copy_idx * single_pad + rank_in_image.repeat(copies)
    image = image_of.repeat(copies)
    hidden = label_enc.embedding_dim
    dn_query_label = label_enc.weight.new_zeros(batch, pad_size, hidden)
    dn_query_bbox = label_enc.weight.new_zeros(batch, pad_size, 4)
    dn_query_label[image, slot] = label_enc(noised_labels)
    dn_query_bbox[image, slot] = inverse_sigmoid(noised_boxes)
    dn_labels = torch.full((batch, pad_size), -1, dtype=torch.long, device=device)
    dn_labels[image, slot] = noised_labels
    dn_valid = torch.zeros(batch, pad_size, dtype=torch.bool, device=device)
    dn_valid[image, slot] = True

    attn_mask = cdn_attention_mask(groups, single_pad, num_queries, device=device)
    dn_meta = {"pad_size": pad_size, "num_dn_group": groups, "single_pad": single_pad, "num_queries": num_queries,
               "num_targets": counts, "dn_labels": dn_labels, "dn_valid": dn_valid}
    return dn_query_label, dn_query_bbox, attn_mask, dn_meta


def _rand(shape, generator, device, dtype=torch.float32) -> Tensor:
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def dn_match_indices(dn_meta: Dict, device=None) -> List[Tuple[Tensor, Tensor]]:
    """Fixed DN correspondence: per image ``(pred_idx, tgt_idx)`` of its positive DN queries.

    Positive ``k`` of group ``g`` (index ``g * 2B + k``) ↔ target ``k``; ``G * M_i`` pairs per image,
    empty for images without targets.
    """
    groups, single_pad = dn_meta["num_dn_group"], dn_meta["single_pad"]
    out = []
    for m in dn_meta["num_targets"]:
        k = torch.arange(m, device=device)
        g = torch.arange(groups, device=device)
        pred = (g[:, None] * 2 * single_pad + k[None, :]).reshape(-1)
        out.append((pred, k.repeat(groups)))
    return out


def split_dn_outputs(outputs_class: Tensor, outputs_coord: Tensor, dn_meta: Optional[Dict]):
    """Split decoder outputs into the DN part and the matching part along the query axis.

    Args:
        outputs_class: ``(L, N, pad + Q, K)``; outputs_coord: ``(L, N, pad + Q, 4)``.
        dn_meta: from ``prepare_cdn`` (None: no DN queries were prepended).
    Returns:
        ``((dn_class (L, N, pad, K), dn_coord (L, N, pad, 4)), (match_class (L, N, Q, K), match_coord))``;
        the DN pair is ``(None, None)`` when ``dn_meta`` is None.
    """
    if dn_meta is None:
        return (None, None), (outputs_class, outputs_coord)
    pad = dn_meta["pad_size"]
    if outputs_class.shape[2] <= pad or outputs_coord.shape[2] != outputs_class.shape[2]:
        raise ValueError(f"outputs have {outputs_class.shape[2]} / {outputs_coord.shape[2]} queries; expected "
                         f"pad_size={pad} DN queries followed by the matching queries")
    if "num_queries" in dn_meta and outputs_class.shape[2] != pad + dn_meta["num_queries"]:
        raise ValueError(f"outputs have {outputs_class.shape[2]} queries, expected pad_size + num_queries = "
                         f"{pad} + {dn_meta['num_queries']}")
    return ((outputs_class[:, :, :pad], outputs_coord[:, :, :pad]),
            (outputs_class[:, :, pad:], outputs_coord[:, :, pad:]))
