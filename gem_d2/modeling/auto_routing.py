"""Test-time routing without a known dataset (``MODEL.GEM.TEST_ROUTING: auto``, docs/design/detector.md).

An image's backbone features (per level of ``MODEL.DINO.IN_FEATURES``, the mean and std over its valid,
unpadded cells, each L2-normalised) go through a linear dataset classifier; the image then uses the
identified dataset's experts and class block, exactly as if its dataset were known.

The classifier is fitted on the features of the backbone that will route, i.e. the *trained* one
(``GEMDINO.fit_dataset_classifier``): the planner's features come from the frozen starting backbone,
which no longer matches after training. The trainer refits it before every evaluation and at the end
of training; it lives in persistent buffers of the model, so every checkpoint carries it.
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


class DatasetClassifier(nn.Module):
    """Dataset identification from pooled image features: a linear classifier ``argmax(x W^T + b)``.

    :meth:`fit` trains it (multinomial logistic regression on standardised features, class-balanced,
    L2-regularised, float64 L-BFGS: deterministic). On the demo checkpoint it identifies all the test
    images from 16 images per dataset (BENCHMARKS.md "Auto routing").

    Args:
        num_datasets: datasets of the label space (rows of ``weight``).
        channels: feature width C.
    Buffers (persistent, so checkpoints carry them): ``weight`` (D, C), ``bias`` (D,), ``ready`` (bool scalar).
    """

    def __init__(self, num_datasets: int, channels: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_datasets, channels))
        self.register_buffer("bias", torch.zeros(num_datasets))
        self.register_buffer("ready", torch.tensor(False))

    def fit(self, features: Tensor, labels: Tensor, l2: float = 1e-2, max_iter: int = 500) -> float:
        """Fit the classifier to ``features`` (N, C) with dataset ``labels`` (N,); returns its training accuracy.

        Every dataset must have at least one sample. Features are standardised with their mean and std
        (folded into ``weight``/``bias``); each dataset's samples weigh 1/D in total, so a rare dataset
        counts as much as a large one.
        """
        d, c = self.weight.shape
        x = features.detach().to("cpu", torch.float64)
        y = labels.detach().to("cpu", torch.long)
        if x.dim() != 2 or x.shape[1] != c or y.shape != (x.shape[0],):
            raise ValueError(f"fit expects features (N, {c}) and labels (N,), got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        counts = torch.bincount(y, minlength=d)
        if counts.numel() != d or bool((counts == 0).any()):
            raise ValueError(f"fit needs samples of every one of the {d} datasets; counts per dataset: "
                             f"{counts.tolist()}")
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
        z = (x - mean) / std
        sample_weight = (1.0 / (d * counts.double()))[y]
        w = torch.zeros(d, c, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(d, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (F.cross_entropy(z @ w.t() + b, y, reduction="none") * sample_weight).sum()
            loss = loss + 0.5 * l2 * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        weight = (w / std).detach()
        self.weight.copy_(weight.to(self.weight))
        self.bias.copy_((b - weight @ mean).detach().to(self.bias))
        self.ready.fill_(True)
        return float(((z @ w.t() + b).argmax(1) == y).double().mean())

    def forward(self, features: Tensor) -> Tensor:
        """(N, C) image features -> (N,) long index of the identified dataset."""
        if not bool(self.ready):
            raise RuntimeError("MODEL.GEM.TEST_ROUTING is 'auto' but the model has no dataset classifier: it is "
                               "fitted at the end of training (gem_d2.engine) or by GemTrainer.test; a checkpoint "
                               "from before that has none")
        return (features.to(self.weight) @ self.weight.t() + self.bias).argmax(dim=1)
