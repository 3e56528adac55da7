"""Test-time routing without a known dataset (``MODEL.GEM.TEST_ROUTING: auto``, DESIGN.md §3).

An image's backbone feature (the last backbone stage's mean and std over its valid, unpadded cells,
each L2-normalised) goes through a linear dataset classifier; the image then uses the identified
dataset's experts and class block, exactly as if its dataset were known.

The classifier is fitted on the features of the backbone that will route, i.e. the *trained* one:
the planner's prototypes (DESIGN.md §1) come from the frozen starting backbone, whose features no
longer match after training. gem_d2.engine refits it with the trained backbone before every
evaluation and at the end of training; it lives in persistent buffers of the model, so every
checkpoint carries it. (Nearest prototype, the first rule, confused look-alike domains: BENCHMARKS.md.)
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
    """Dataset identification from pooled image features: a linear classifier ``argmax(x W^T + b)``.

    :meth:`fit` trains it (multinomial logistic regression on standardised features, class-balanced,
    L2-regularised, float64 L-BFGS: deterministic); :meth:`set_prototypes` makes it the nearest-prototype
    rule (``W`` = normalised prototypes, ``b`` = 0). On the demo checkpoint the fitted classifier identifies
    all the test images from 16 images per dataset where nearest-prototype managed 81% (BENCHMARKS.md).

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

    def set_prototypes(self, prototypes: Tensor) -> None:
        """Install (D, C) prototypes (normalised here) as the nearest-prototype rule."""
        if prototypes.shape != self.weight.shape:
            raise ValueError(f"dataset prototypes must have shape {tuple(self.weight.shape)} "
                             f"(datasets x backbone channels), got {tuple(prototypes.shape)}")
        self.weight.copy_(F.normalize(prototypes.to(self.weight), dim=1))
        self.bias.zero_()
        self.ready.fill_(True)

    @torch.no_grad()
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint from before the classifier holds nearest-prototype ``prototypes``: load them as such but
        # mark the router not ready, so GemTrainer.test fits the classifier before an auto-routed evaluation.
        old = state_dict.pop(prefix + "prototypes", None)
        if old is not None:
            state_dict.setdefault(prefix + "weight", old)
            state_dict.setdefault(prefix + "bias", torch.zeros(old.shape[0], dtype=old.dtype))
            state_dict[prefix + "ready"] = torch.tensor(False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
