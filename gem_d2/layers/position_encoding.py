"""Sine position embeddings: of feature-map pixels (encoder keys) and of reference boxes (decoder queries).

Both have the same form, each with its own temperature (``MODEL.DINO.PE_TEMPERATURE`` for the map,
``MODEL.DINO.QUERY_PE_TEMPERATURE`` for the boxes): feature ``2i`` and ``2i + 1`` of a coordinate ``t``
(already scaled, e.g. to ``[0, 2*pi]``) are ``sin(t / T^(2i/F))`` and ``cos(t / T^(2i/F))``, with ``F``
features per coordinate and temperature ``T``. The y coordinate comes first, as in DETR/DINO/detrex, so
that a box's centre embedding lines up with the map embedding.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine", "sine_embedding", "box_sine_embedding"]


def _check_num_feats(num_feats: int, temperature: float) -> None:
    if not isinstance(num_feats, int) or num_feats <= 0 or num_feats % 2:
        raise ValueError(f"sine embedding num_feats must be a positive even int, got {num_feats!r}")
    if not temperature > 0:
        raise ValueError(f"sine embedding temperature (MODEL.DINO.PE_TEMPERATURE / QUERY_PE_TEMPERATURE) must be > 0, "
                         f"got {temperature!r}")


def sine_embedding(coords: Tensor, num_feats: int, temperature: float) -> Tensor:
    """Interleaved sin/cos features of scalar coordinates.

    Args:
        coords: ``(...)`` coordinates already multiplied by the scale (e.g. ``2*pi * x``).
        num_feats: ``F`` features per coordinate (even).
        temperature: ``T``.

    Returns:
        ``(..., F)``: ``[sin(c/d_0), cos(c/d_0), sin(c/d_1), cos(c/d_1), ...]`` with
        ``d_i = T^(2i/F)``.
    """
    _check_num_feats(num_feats, temperature)
    exponent = torch.arange(num_feats // 2, device=coords.device, dtype=coords.dtype) * 2 / num_feats
    # compute the divisor in float64 so float32 and float64 inputs see the same frequencies
    div = torch.as_tensor(temperature, dtype=torch.float64).pow(exponent.double()).to(coords.dtype)
    angles = coords[..., None] / div
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """2-d sine embedding of the valid (unpadded) area of each image, as DETR/DINO/detrex.

    The row/column index ``k = 1..n`` of a valid pixel (its cumulative count of valid pixels) becomes
    ``(k + offset) / (n_valid + eps) * scale`` when ``normalize`` (``k`` itself otherwise), then
    :func:`sine_embedding` with ``temperature``. detrex's DINO: temperature 10000, offset -0.5 (pixel
    centres); IDEA-Research/DINO's: temperature 20, offset 0; both normalise with scale ``2*pi``.

    Args:
        num_feats: features per axis; the output has ``2 * num_feats`` channels (``HIDDEN_DIM / 2``).
        temperature: ``MODEL.DINO.PE_TEMPERATURE``.
        offset, scale, normalize: ``MODEL.DINO.PE_OFFSET``, ``PE_SCALE``, ``PE_NORMALIZE``; eps as the references.
    """

    def __init__(self, num_feats: int = 128, temperature: float = 10000.0, offset: float = -0.5,
                 scale: float = 2 * math.pi, eps: float = 1e-6, normalize: bool = True):
        super().__init__()
        _check_num_feats(num_feats, temperature)
        if normalize and not scale > 0:
            raise ValueError(f"MODEL.DINO.PE_SCALE must be > 0, got {scale!r}")
        self.num_feats = num_feats
        self.temperature = float(temperature)
        self.offset = float(offset)
        self.scale = float(scale)
        self.eps = eps
        self.normalize = bool(normalize)

    def forward(self, mask: Tensor) -> Tensor:
        """``mask (N, H, W)`` bool, True = padding -> ``(N, 2*num_feats, H, W)`` float32, channels (y, x)."""
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(f"position embedding expects a bool mask (N, H, W), got {mask.dtype} {tuple(mask.shape)}")
        valid = (~mask).to(torch.float32)
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        pos_y = sine_embedding(y, self.num_feats, self.temperature)
        pos_x = sine_embedding(x, self.num_feats, self.temperature)
        return torch.cat([pos_y, pos_x], dim=-1).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"num_feats={self.num_feats}, temperature={self.temperature:g}, normalize={self.normalize}, "
                f"offset={self.offset:g}, scale={self.scale:g}")


def box_sine_embedding(boxes: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalised reference points or boxes (decoder query positions).

    Args:
        boxes: ``(..., 2)`` as ``(x, y)`` or ``(..., 4)`` as ``(cx, cy, w, h)``, in [0, 1].
        num_feats: ``F`` features per coordinate (``HIDDEN_DIM / 2``).
        temperature: ``T``.

    Returns:
        ``(..., D * F)`` ordered ``(y, x)`` or ``(y, x, w, h)``; each coordinate scaled by ``2*pi``.
    """
    if boxes.shape[-1] not in (2, 4):
        raise ValueError(f"box_sine_embedding expects (..., 2) points or (..., 4) boxes, got {tuple(boxes.shape)}")
    emb = sine_embedding(boxes * (2 * math.pi), num_feats, temperature)
    parts = list(emb.unbind(-2))
    parts[0], parts[1] = parts[1], parts[0]
    return torch.cat(parts, dim=-1)
