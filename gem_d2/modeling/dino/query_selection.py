"""DINO's geometry and two-stage query selection helpers (pure tensor functions).

Encoder reference points and valid ratios, per-token proposals, and top-K selection restricted to
each image's class block.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["valid_ratios", "encoder_reference_points", "encoder_proposals", "masked_class_argmax",
           "select_topk_in_blocks"]


def valid_ratios(mask: Tensor) -> Tensor:
    """``mask (N, H, W)`` bool True = pad -> ``(N, 2)`` valid fraction ``(w_ratio, h_ratio)`` of the map."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).to(torch.float32)
    valid_w = (~mask[:, 0, :]).sum(1).to(torch.float32)
    return torch.stack([valid_w / w, valid_h / h], -1)


def _level_sizes(spatial_shapes: Tensor) -> List[Tuple[int, int]]:
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def encoder_reference_points(spatial_shapes: Tensor, ratios: Tensor) -> Tensor:
    """Reference point of every encoder token at every level.

    Token ``(i, j)`` of level ``l`` sits at its cell centre normalised by the *valid* extent of its
    image, ``((j + 0.5) / (r_w W_l), (i + 0.5) / (r_h H_l))``, then is mapped to each level ``l'`` by
    multiplying with that level's valid ratio (the sampling grid covers the padded map).

    Args:
        spatial_shapes: ``(L, 2)`` ``(H_l, W_l)``.
        ratios: ``(N, L, 2)`` ``(w_ratio, h_ratio)`` per level.
    Returns:
        ``(N, S, L, 2)`` normalised ``(x, y)``.
    """
    refs = []
    for lvl, (h, w) in enumerate(_level_sizes(spatial_shapes)):
        ys, xs = torch.meshgrid(torch.arange(h, dtype=ratios.dtype, device=ratios.device) + 0.5,
                                torch.arange(w, dtype=ratios.dtype, device=ratios.device) + 0.5, indexing="ij")
        x = xs.reshape(1, -1) / (ratios[:, None, lvl, 0] * w)
        y = ys.reshape(1, -1) / (ratios[:, None, lvl, 1] * h)
        refs.append(torch.stack([x, y], -1))
    ref = torch.cat(refs, 1)
    return ref[:, :, None] * ratios[:, None]


def encoder_proposals(memory: Tensor, padding_mask: Tensor, spatial_shapes: Tensor) -> Tuple[Tensor, Tensor]:
    """DINO "standard" two-stage proposals: one box per token.

    Token ``(i, j)`` of level ``l`` proposes the box centred on its cell (normalised by the valid
    extent of its image) with ``w = h = 0.05 * 2^l``. Proposals of padded tokens, or with any
    coordinate outside (0.01, 0.99), are invalid.

    Args:
        memory: ``(N, S, C)`` encoder output.
        padding_mask: ``(N, S)`` bool True = pad.
        spatial_shapes: ``(L, 2)``.
    Returns:
        ``(proposals_unact (N, S, 4)``: logits of the proposals, ``+inf`` where invalid;
        ``invalid (N, S)`` bool``)``.
    """
    n = memory.shape[0]
    props, start = [], 0
    for lvl, (h, w) in enumerate(_level_sizes(spatial_shapes)):
        mask_l = padding_mask[:, start:start + h * w].view(n, h, w)
        valid_h = (~mask_l[:, :, 0]).sum(1).to(memory.dtype)
        valid_w = (~mask_l[:, 0, :]).sum(1).to(memory.dtype)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=memory.dtype, device=memory.device),
                                torch.arange(w, dtype=memory.dtype, device=memory.device), indexing="ij")
        cx = (xs.reshape(1, -1) + 0.5) / valid_w[:, None]
        cy = (ys.reshape(1, -1) + 0.5) / valid_h[:, None]
        wh = torch.full_like(cx, 0.05 * (2.0 ** lvl))
        props.append(torch.stack([cx, cy, wh, wh], -1))
        start += h * w
    proposals = torch.cat(props, 1)
    invalid = padding_mask | ~((proposals > 0.01) & (proposals < 0.99)).all(-1)
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(invalid[..., None], float("inf"))
    return proposals, invalid


def masked_class_argmax(logits: Tensor, class_masks: Tensor) -> Tensor:
    """``logits (N, T, K)``, ``class_masks (N, K)`` bool -> ``(N, T)`` argmax among each image's allowed classes."""
    return logits.detach().masked_fill(~class_masks[:, None, :], float("-inf")).argmax(-1)


def select_topk_in_blocks(logits: Tensor, class_masks: Tensor, k: int, invalid: Optional[Tensor] = None) -> Tensor:
    """Indices of the ``k`` tokens with the highest class logit within each image's class block.

    Args:
        logits: ``(N, S, K)`` encoder class logits.
        class_masks: ``(N, K)`` bool, True for the classes of the image's dataset.
        k: number of tokens to keep (``<= S``).
        invalid: ``(N, S)`` bool tokens never to prefer (padding, out-of-range proposals) or None.
    Returns:
        ``(N, k)`` long token indices, best first.
    """
    if k > logits.shape[1]:
        raise ValueError(f"MODEL.DINO.NUM_QUERIES={k} exceeds the {logits.shape[1]} encoder tokens of this batch; "
                         "use larger images or fewer queries")
    scores = logits.detach().masked_fill(~class_masks[:, None, :], float("-inf")).max(-1).values
    if invalid is not None:
        scores = scores.masked_fill(invalid, float("-inf"))
    return scores.topk(k, dim=1).indices


# ----------------------------------------------------------------------------------------------
# encoder
# ----------------------------------------------------------------------------------------------
