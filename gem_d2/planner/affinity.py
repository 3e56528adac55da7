"""Affinity of planning units for experts, from a frozen detectron2 backbone (docs/design/planner.md).

Per unit, ``MODEL.GEM.PLANNER.SAMPLES_PER_UNIT`` training images (dataset level) or ground-truth boxes (class
level) are sampled with a seed derived from ``PLANNER.SEED`` and the unit's name. Each image is resized (short
side ``PLANNER.IMAGE_SIZE``), normalised with ``MODEL.PIXEL_MEAN/STD`` and passed through the backbone; the
last stage (largest stride) is average-pooled over the whole image, or RoI-aligned (torchvision ``roi_align``,
7x7, then averaged) over each sampled box, and L2-normalised. Unit prototypes ``mu_u`` are the normalised mean
of their features; expert keys ``kappa_j`` are seeded k-means centroids (``NUM_EXPERTS`` clusters) over all
sampled features; ``w_uj = softmax_j(cos(mu_u, kappa_j) / tau)``.
"""
from __future__ import annotations

import logging
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gem_d2.planner.kmeans import kmeans
from gem_d2.planner.mapping import UNIT_SEPARATOR
from gem_d2.utils.safe_load import SafeDetectionCheckpointer

__all__ = ["AffinityResult", "FeatureExtractor", "UnitFeatures", "affinity_from_features", "affinity_from_prototypes",
           "affinity_temperature", "cosine_matrix",
           "build_frozen_backbone", "collect_unit_features", "compute_affinity", "unit_prototypes"]

logger = logging.getLogger(__name__)

ROI_OUTPUT_SIZE = 7
_BATCH = 8  # images per backbone call (same resized shape only, so results do not depend on padding)
_LOG_EVERY_S = 5.0


@dataclass
class UnitFeatures:
    """Sampled features per unit.

    Attributes:
        unit_names: m names (dataset names, or "dataset/class").
        datasets: the dataset of each unit.
        features: m arrays (S_u, C), L2-normalised rows.
        share_in_dataset: (m,) fraction of its dataset's load a unit carries (1 at dataset level; the class's
            fraction of the dataset's ground-truth boxes at class level).
    """

    unit_names: List[str]
    datasets: List[str]
    features: List[np.ndarray]
    share_in_dataset: np.ndarray


@dataclass
class AffinityResult:
    """Output of :func:`compute_affinity`: units, prototypes (m, C), expert keys (n, C), affinity (m, n)."""

    unit_names: List[str]
    datasets: List[str]
    share_in_dataset: np.ndarray
    prototypes: np.ndarray
    keys: np.ndarray
    affinity: np.ndarray
    samples_per_unit: np.ndarray
    seconds: float
    temperature: float = float("nan")  # the softmax temperature T the affinity was computed with


def build_frozen_backbone(cfg) -> torch.nn.Module:
    """``build_backbone(cfg)`` with ``MODEL.WEIGHTS`` loaded (if set), in eval mode, without gradients.

    Weights are loaded through a holder module whose only child is named ``backbone``, so a full gem_d2 /
    detectron2 model checkpoint (keys ``backbone.*``) and a backbone-only one (e.g. ImageNet ``.pkl``, matched
    by detectron2's suffix alignment) both load. With no weights the backbone is randomly initialised from
    ``PLANNER.SEED`` (without touching the global RNG).
    """
    from detectron2.modeling import build_backbone

    device = torch.device(cfg.MODEL.DEVICE)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but CUDA is not available here; set MODEL.DEVICE cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.MODEL.GEM.PLANNER.SEED))
        backbone = build_backbone(cfg)
    holder = torch.nn.Module()
    holder.backbone = backbone
    if cfg.MODEL.WEIGHTS:
        SafeDetectionCheckpointer(holder).load(cfg.MODEL.WEIGHTS)
    else:
        logger.info("planner: MODEL.WEIGHTS is empty, affinity features come from a randomly initialised backbone")
    backbone.eval()
    for prm in backbone.parameters():
        prm.requires_grad_(False)
    return backbone.to(device)


class FeatureExtractor:
    """Frozen backbone + the planner's image preprocessing.

    Args:
        backbone: a detectron2 ``Backbone`` (eval mode).
        pixel_mean, pixel_std: per-channel normalisation, in ``image_format`` channel order.
        image_size: short side images are resized to (long side capped at ``image_size * 1333 / 800``).
        image_format: ``INPUT.FORMAT`` passed to ``detection_utils.read_image``.
        device: torch device of the backbone.
    """

    def __init__(self, backbone, pixel_mean: Sequence[float], pixel_std: Sequence[float], image_size: int,
                 image_format: str = "BGR", device: str = "cpu"):
        if int(image_size) < 16:
            raise ValueError(f"MODEL.GEM.PLANNER.IMAGE_SIZE must be >= 16 pixels, got {image_size}")
        shapes = backbone.output_shape()
        self.feature = max(shapes, key=lambda k: (shapes[k].stride, k))  # last stage = largest stride
        self.stride = shapes[self.feature].stride
        self.backbone = backbone
        self.device = torch.device(device)
        self.mean = torch.tensor(pixel_mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.std = torch.tensor(pixel_std, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.image_size = int(image_size)
        self.max_size = int(round(self.image_size * 1333 / 800))
        self.image_format = image_format

    @classmethod
    def from_cfg(cls, cfg, backbone=None) -> FeatureExtractor:
        backbone = build_frozen_backbone(cfg) if backbone is None else backbone
        return cls(backbone, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.MODEL.GEM.PLANNER.IMAGE_SIZE,
                   cfg.INPUT.FORMAT, cfg.MODEL.DEVICE)

    def load(self, file_name: str):
        """Read, resize and normalise one image; returns ((C, H, W) tensor, scale factor applied)."""
        from detectron2.data.detection_utils import read_image

        img = read_image(file_name, format=self.image_format)
        t = torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)), dtype=torch.float32, device=self.device)
        h, w = t.shape[-2:]
        scale = min(self.image_size / min(h, w), self.max_size / max(h, w))
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        t = F.interpolate(t[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        return (t - self.mean) / self.std, (nw / w, nh / h)

    @torch.no_grad()
    def feature_maps(self, images: List[torch.Tensor]) -> torch.Tensor:
        """Last-stage feature maps of same-shape images: (B, C, h, w)."""
        return self.backbone(torch.stack(images))[self.feature]

    @torch.no_grad()
    def image_features(self, file_names: Sequence[str], progress=None) -> np.ndarray:
        """Globally pooled, L2-normalised last-stage features of images: (N, C) float32 (``progress``: a tqdm bar)."""
        loaded = []
        for f in file_names:
            loaded.append(self.load(f)[0])
        out: List[Optional[torch.Tensor]] = [None] * len(loaded)
        by_shape: Dict[tuple, List[int]] = {}
        for i, t in enumerate(loaded):
            by_shape.setdefault(tuple(t.shape), []).append(i)
        for idx in by_shape.values():
            for s in range(0, len(idx), _BATCH):
                chunk = idx[s:s + _BATCH]
                pooled = self.feature_maps([loaded[i] for i in chunk]).mean(dim=(2, 3))
                for i, v in zip(chunk, F.normalize(pooled, dim=1)):
                    out[i] = v
                if progress is not None:
                    progress.update(len(chunk))
        return torch.stack(out).cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def box_features(self, file_name: str, boxes_xyxy: np.ndarray) -> np.ndarray:
        """RoI-aligned, averaged, L2-normalised last-stage features of boxes (XYXY, original pixels): (B, C)."""
        from torchvision.ops import roi_align

        img, (sx, sy) = self.load(file_name)
        fmap = self.feature_maps([img])
        b = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32), device=self.device).reshape(-1, 4)
        b = b * torch.tensor([sx, sy, sx, sy], device=self.device)
        rois = torch.cat([torch.zeros(len(b), 1, device=self.device), b], dim=1)
        pooled = roi_align(fmap, rois, output_size=ROI_OUTPUT_SIZE, spatial_scale=1.0 / self.stride,
                           sampling_ratio=2, aligned=True).mean(dim=(2, 3))
        return F.normalize(pooled, dim=1).cpu().numpy().astype(np.float32)


def _progress(total: int, what: str) -> tqdm:
    """A tqdm bar on stderr (also when it is a log file) updated at most every few seconds."""
    return tqdm(total=total, desc=f"planner affinity ({what})", unit=what, mininterval=_LOG_EVERY_S, file=sys.stderr,
                disable=False, leave=True)


def _unit_rng(seed: int, unit: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(unit.encode("utf-8"))])


def _sample(rng: np.random.Generator, count: int, samples: int) -> np.ndarray:
    if count <= samples:
        return np.arange(count)
    return np.sort(rng.choice(count, size=samples, replace=False))


def collect_unit_features(extractor: FeatureExtractor, datasets: Sequence[str], level: str = "dataset",
                          samples: int = 32, seed: int = 0) -> UnitFeatures:
    """Sample and embed images (``level="dataset"``) or ground-truth boxes (``level="class"``) per unit.

    Datasets are read with ``DatasetCatalog.get``. Class-level units are "dataset/class" for every class of the
    dataset's ``thing_classes`` that has at least one box (classes without boxes get no unit; the router falls
    back to the dataset's row for them).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    if level not in ("dataset", "class"):
        raise ValueError(f"MODEL.GEM.PLANNER.LEVEL must be 'dataset' or 'class', got {level!r}")
    if int(samples) < 1:
        raise ValueError(f"MODEL.GEM.PLANNER.SAMPLES_PER_UNIT must be >= 1, got {samples}")
    plan = []  # (unit, dataset, share, [(file_name, [boxes] or None)])
    for name in datasets:
        records = DatasetCatalog.get(name)
        if not records:
            raise ValueError(f"DATASETS.TRAIN dataset {name!r} has no images; the planner needs at least one")
        if level == "dataset":
            pick = _sample(_unit_rng(seed, name), len(records), samples)
            plan.append((name, name, 1.0, [(records[i]["file_name"], None) for i in pick]))
            continue
        classes = list(MetadataCatalog.get(name).get("thing_classes", []) or [])
        if not classes:
            raise ValueError(f"PLANNER.LEVEL=class needs thing_classes metadata for dataset {name!r}")
        by_class: Dict[int, list] = {c: [] for c in range(len(classes))}
        for ri, rec in enumerate(records):
            for ai, ann in enumerate(rec.get("annotations", [])):
                if ann.get("iscrowd", 0) == 0 and ann["category_id"] in by_class:
                    by_class[ann["category_id"]].append((ri, ai))
        total = sum(len(v) for v in by_class.values())
        if total == 0:
            raise ValueError(f"PLANNER.LEVEL=class: dataset {name!r} has no ground-truth boxes")
        for c, cname in enumerate(classes):
            boxes = by_class[c]
            if not boxes:
                logger.warning(f"planner: class {cname!r} of {name!r} has no boxes and gets no unit")
                continue
            unit = f"{name}{UNIT_SEPARATOR}{cname}"
            pick = _sample(_unit_rng(seed, unit), len(boxes), samples)
            per_image: Dict[int, list] = {}
            for i in pick:
                ri, ai = boxes[i]
                ann = records[ri]["annotations"][ai]
                box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
                per_image.setdefault(ri, []).append(box)
            plan.append((unit, name, len(boxes) / total,
                         [(records[ri]["file_name"], per_image[ri]) for ri in sorted(per_image)]))
    if level == "dataset":
        with _progress(sum(len(items) for *_, items in plan), "images") as progress:
            feats = [extractor.image_features([fn for fn, _ in items], progress) for *_, items in plan]
    else:
        feats = _class_features(extractor, plan)
    return UnitFeatures(unit_names=[u for u, *_ in plan], datasets=[d for _, d, *_ in plan], features=feats,
                        share_in_dataset=np.asarray([sh for _, _, sh, _ in plan]))


def _class_features(extractor: FeatureExtractor, plan) -> List[np.ndarray]:
    # An image holding sampled boxes of several classes goes through the backbone once.
    boxes_of_image: Dict[str, list] = {}
    for ui, (*_, items) in enumerate(plan):
        for fn, boxes in items:
            boxes_of_image.setdefault(fn, []).extend((ui, b) for b in boxes)
    parts: List[list] = [[] for _ in plan]
    with _progress(len(boxes_of_image), "images") as progress:
        for fn in sorted(boxes_of_image):
            owners = boxes_of_image[fn]
            feats = extractor.box_features(fn, np.asarray([b for _, b in owners]))
            for (ui, _), f in zip(owners, feats):
                parts[ui].append(f)
            progress.update(1)
    return [np.stack(p) for p in parts]


def unit_prototypes(features: Sequence[np.ndarray]) -> np.ndarray:
    """Normalised mean feature per unit: (m, C) float32."""
    protos = np.stack([np.asarray(f, dtype=np.float64).mean(axis=0) for f in features])
    norms = np.linalg.norm(protos, axis=1, keepdims=True)
    return (protos / np.maximum(norms, 1e-12)).astype(np.float32)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of ``a`` (m, C) with every row of ``b`` (n, C): (m, n) float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def affinity_temperature(cosines: np.ndarray, tau: float) -> float:
    """The softmax temperature ``T = tau * std(all unit-key cosines)`` (at least ``tau * 1e-6``).

    Scaling by the spread makes the affinity independent of how concentrated a backbone's cosines are:
    with a fixed temperature, features whose cosines span 0.3-0.99 turn every row one-hot (a unit's
    second choice gets ~1% of the weight and the LP has no preference left when capacity denies its
    first), while cosines packed in 0.94-0.999 give nearly uniform rows.
    """
    if not tau > 0:
        raise ValueError(f"MODEL.GEM.PLANNER.TAU must be > 0, got {tau}")
    return float(tau) * max(float(np.std(cosines)), 1e-6)


def affinity_from_prototypes(prototypes: np.ndarray, keys: np.ndarray, tau: float = 1.0,
                             reference_cosines: Optional[np.ndarray] = None) -> np.ndarray:
    """``w_uj = softmax_j(cos(mu_u, kappa_j) / T)`` with ``T`` from :func:`affinity_temperature`: (m, n) float64.

    ``reference_cosines``: the cosine matrix whose spread sets ``T`` (default: this one); the few-shot
    extension passes the planned units' matrix so a new unit is scored on the same scale.
    """
    cos = cosine_matrix(prototypes, keys)
    temperature = affinity_temperature(cos if reference_cosines is None else reference_cosines, tau)
    z = cos / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def affinity_from_features(uf: UnitFeatures, num_experts: int, seed: int = 0, kmeans_iters: int = 50,
                           tau: float = 1.0) -> AffinityResult:
    """Prototypes, k-means expert keys (over all sampled features) and the affinity for sampled unit features."""
    t0 = time.perf_counter()
    allf = np.concatenate(uf.features, axis=0)
    if allf.shape[0] < num_experts:
        raise ValueError(f"the planner sampled {allf.shape[0]} features in all but MODEL.GEM.NUM_EXPERTS="
                         f"{num_experts} k-means keys need at least one each: raise MODEL.GEM.PLANNER.SAMPLES_PER_UNIT")
    keys = kmeans(allf, int(num_experts), seed=int(seed), iters=int(kmeans_iters))
    keys = (keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    protos = unit_prototypes(uf.features)
    return AffinityResult(unit_names=list(uf.unit_names), datasets=list(uf.datasets),
                          share_in_dataset=np.asarray(uf.share_in_dataset), prototypes=protos, keys=keys,
                          affinity=affinity_from_prototypes(protos, keys, float(tau)),
                          samples_per_unit=np.array([len(f) for f in uf.features]),
                          seconds=time.perf_counter() - t0,
                          temperature=affinity_temperature(cosine_matrix(protos, keys), float(tau)))


def compute_affinity(cfg, extractor: Optional[FeatureExtractor] = None,
                     features: Optional[UnitFeatures] = None) -> AffinityResult:
    """Units, prototypes, expert keys and the affinity matrix for ``cfg.DATASETS.TRAIN`` (see module docstring).

    Reads ``MODEL.GEM.PLANNER.{LEVEL, SAMPLES_PER_UNIT, SEED, KMEANS_ITERS, TAU, IMAGE_SIZE}``,
    ``MODEL.GEM.NUM_EXPERTS``, ``MODEL.WEIGHTS``, ``MODEL.PIXEL_MEAN/STD``, ``INPUT.FORMAT``, ``MODEL.DEVICE``.
    ``extractor`` reuses a built backbone; ``features`` reuses sampled features (skipping the backbone).
    ``seconds`` of the result covers sampling, the backbone and k-means.
    """
    t0 = time.perf_counter()
    pl = cfg.MODEL.GEM.PLANNER
    n = int(cfg.MODEL.GEM.NUM_EXPERTS)
    if n < 1:
        raise ValueError(f"MODEL.GEM.NUM_EXPERTS must be >= 1, got {n}")
    datasets = list(cfg.DATASETS.TRAIN)
    if not datasets:
        raise ValueError("DATASETS.TRAIN is empty: the planner needs the training datasets")
    if features is None:
        extractor = FeatureExtractor.from_cfg(cfg) if extractor is None else extractor
        features = collect_unit_features(extractor, datasets, pl.LEVEL, int(pl.SAMPLES_PER_UNIT), int(pl.SEED))
    result = affinity_from_features(features, n, int(pl.SEED), int(pl.KMEANS_ITERS), float(pl.TAU))
    result.seconds = time.perf_counter() - t0
    return result
