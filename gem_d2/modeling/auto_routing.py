"""Test-time routing without a known dataset (``MODEL.GEM.TEST_ROUTING: auto``, DESIGN.md §3).

An image's backbone feature (the last backbone stage, averaged over its valid, unpadded cells,
L2-normalised) picks the nearest dataset prototype by cosine similarity; the image then uses that
dataset's experts and class block, exactly as if its dataset were known.

The prototypes are the normalised mean features of each training dataset under the backbone that
will route, i.e. the *trained* one: the planner's prototypes (DESIGN.md §1) come from the frozen
starting backbone, whose features no longer match after training. gem_d2.engine recomputes them
with the trained backbone before every evaluation and at the end of training; they live in a
persistent buffer of the model, so every checkpoint carries them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pooled_image_features(feature: Tensor, image_sizes: Sequence[Sequence[int]], padded_hw: Sequence[int],
                          with_std: bool = False) -> Tensor:
    """Mean of ``feature`` (N, C, h, w) over each image's valid cells, L2-normalised -> (N, C).

    With ``with_std`` the per-channel standard deviation over the same cells (the feature's "style"
    statistics, which tell visual domains apart) is appended, separately normalised -> (N, 2C).

    ``image_sizes`` are the unpadded (H, W) of each image and ``padded_hw`` the padded batch (H, W);
    a cell counts when its top-left pixel lies inside the image.
    """
    n, _, h, w = feature.shape
    ph, pw = padded_hw
    rows = torch.arange(h, device=feature.device) * (ph / h)
    cols = torch.arange(w, device=feature.device) * (pw / w)
    sizes = torch.as_tensor([list(s) for s in image_sizes], device=feature.device, dtype=rows.dtype)
    valid = (rows[None, :, None] < sizes[:, 0, None, None]) & (cols[None, None, :] < sizes[:, 1, None, None])
    valid = valid.to(feature.dtype).unsqueeze(1)  # (N, 1, h, w)
    count = valid.sum((2, 3)).clamp(min=1)
    mean = (feature * valid).sum((2, 3)) / count
    if not with_std:
        return F.normalize(mean, dim=1)
    var = (((feature - mean[:, :, None, None]) ** 2) * valid).sum((2, 3)) / count
    return torch.cat([F.normalize(mean, dim=1), F.normalize(var.sqrt(), dim=1)], dim=1)


class DatasetRouter(nn.Module):
    """Nearest-prototype dataset identification.

    Args:
        num_datasets: datasets of the label space (rows of ``prototypes``).
        channels: feature width C.
    Buffers (persistent, so checkpoints carry them): ``prototypes`` (D, C), ``ready`` (bool scalar).
    """

    def __init__(self, num_datasets: int, channels: int):
        super().__init__()
        self.register_buffer("prototypes", torch.zeros(num_datasets, channels))
        self.register_buffer("ready", torch.tensor(False))

    def set_prototypes(self, prototypes: Tensor) -> None:
        """Install (D, C) prototypes (normalised here)."""
        if prototypes.shape != self.prototypes.shape:
            raise ValueError(f"dataset prototypes must have shape {tuple(self.prototypes.shape)} "
                             f"(datasets x backbone channels), got {tuple(prototypes.shape)}")
        self.prototypes.copy_(F.normalize(prototypes.to(self.prototypes), dim=1))
        self.ready.fill_(True)

    def forward(self, features: Tensor) -> Tensor:
        """(N, C) normalised image features -> (N,) long dataset index of the nearest prototype."""
        if not bool(self.ready):
            raise RuntimeError("MODEL.GEM.TEST_ROUTING is 'auto' but the model has no dataset prototypes: they are "
                               "computed at the end of training (gem_d2.engine) or by GemTrainer.test; a checkpoint "
                               "from before that has none")
        return (features.to(self.prototypes) @ self.prototypes.t()).argmax(dim=1)
