"""MobileNetV2 as a detectron2 backbone: ``build_mobilenet_v2_backbone`` (``MODEL.BACKBONE.NAME``).

The network is torchvision's ``mobilenet_v2().features``, unchanged; its blocks are only regrouped into
detectron2-style stages, one per resolution, so that ``MODEL.DINO.IN_FEATURES`` names them as for a ResNet:

    stage   torchvision features[...]          stride   channels
    stem    0-1    (3x3 conv, first block)          2        16
    res2    2-3                                     4        24
    res3    4-6                                     8        32
    res4    7-13                                   16        96
    res5    14-18  (last block + 1x1 conv)         32      1280

Each stage's output equals torchvision's ``features[:stop](x)`` for the same weights. ``res5`` ends with
torchvision's final 1x1 convolution, so its pooled output is the ImageNet classifier's input.

Config (``MODEL.MOBILENET`` in :mod:`gem_d2.config`, plus detectron2's ``MODEL.BACKBONE.FREEZE_AT``):

- ``OUT_FEATURES``: the stages returned; stages after the last one are not built (as detectron2's ResNet).
- ``NORM``: ``FrozenBN`` (every BatchNorm becomes detectron2's ``FrozenBatchNorm2d``), ``BN`` or ``SyncBN``.
- ``FREEZE_AT``: detectron2's meaning: 0 nothing frozen, 1 the stem, 2 stem + res2, ..., 5 every stage.
  A frozen stage's parameters stop requiring gradients and its BatchNorms become ``FrozenBatchNorm2d``
  (as a frozen detectron2 ResNet block), whatever ``NORM`` says.

Pretrained weights: ``MODEL.WEIGHTS gem_d2://ImageNetPretrained/mobilenet_v2``
(:mod:`gem_d2.model_zoo.pretrained`, which renames torchvision's keys with :func:`torchvision_to_backbone_keys`).
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
import torchvision
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

__all__ = ["STAGES", "MobileNetV2Backbone", "build_mobilenet_v2_backbone", "torchvision_to_backbone_keys"]

# (name, first torchvision features index, end index (exclusive), output stride, output channels)
STAGES = (
    ("stem", 0, 2, 2, 16),
    ("res2", 2, 4, 4, 24),
    ("res3", 4, 7, 8, 32),
    ("res4", 7, 14, 16, 96),
    ("res5", 14, 19, 32, 1280),
)
NORMS = ("FrozenBN", "BN", "SyncBN")


class MobileNetV2Backbone(Backbone):
    """torchvision's MobileNetV2 ``features`` as the stages of :data:`STAGES` (see the module doc).

    Args:
        out_features: stage names to return, e.g. ``["res3", "res4", "res5"]``.
        norm: ``FrozenBN``, ``BN`` or ``SyncBN``.
        freeze_at: 0 (nothing frozen) to 5 (every stage), detectron2's ``MODEL.BACKBONE.FREEZE_AT``.
    """

    def __init__(self, out_features: Sequence[str] = ("res3", "res4", "res5"), norm: str = "FrozenBN",
                 freeze_at: int = 0):
        super().__init__()
        names = [s[0] for s in STAGES]
        out_features = list(out_features)
        unknown = [f for f in out_features if f not in names]
        if not out_features or unknown:
            raise ValueError(f"MODEL.MOBILENET.OUT_FEATURES must be a non-empty subset of {names}, got {out_features}")
        if norm not in NORMS:
            raise ValueError(f"MODEL.MOBILENET.NORM must be one of {list(NORMS)}, got {norm!r}")
        if not 0 <= int(freeze_at) <= len(STAGES):
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT must be in 0..{len(STAGES)} for MobileNetV2, got {freeze_at}")
        features = torchvision.models.mobilenet_v2(weights=None).features
        last = max(names.index(f) for f in out_features)
        self.stage_names = names[: last + 1]
        for name, start, stop, _, _ in STAGES[: last + 1]:
            self.add_module(name, nn.Sequential(*features[start:stop]))
        self._out_features = [n for n in names if n in out_features]  # network order
        self._out_feature_strides = {s[0]: s[3] for s in STAGES if s[0] in out_features}
        self._out_feature_channels = {s[0]: s[4] for s in STAGES if s[0] in out_features}
        if norm == "FrozenBN":
            FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        elif norm == "SyncBN":
            for name in self.stage_names:
                self.add_module(name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(self, name)))
        self.freeze(int(freeze_at))

    def freeze(self, freeze_at: int = 0) -> MobileNetV2Backbone:
        """Freeze the first ``freeze_at`` stages (stem = 1); returns self. See the module doc."""
        for index, name in enumerate(self.stage_names, start=1):
            if freeze_at >= index:
                stage = getattr(self, name)
                for p in stage.parameters():
                    p.requires_grad_(False)
                FrozenBatchNorm2d.convert_frozen_batchnorm(stage)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"MobileNetV2Backbone takes (N, C, H, W) input, got shape {tuple(x.shape)}")
        outputs = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in self._out_features}


def torchvision_to_backbone_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchvision MobileNetV2 state dict -> this backbone's names (``features.4.conv...`` -> ``res3.0.conv...``).

    The classifier and BatchNorm step counters (``num_batches_tracked``) are dropped, as detectron2 drops them
    from ImageNet checkpoints; a ``features`` key outside every stage raises.
    """
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("features.") or key.endswith("num_batches_tracked"):
            continue
        index, rest = key[len("features."):].split(".", 1)
        stage = next((s for s in STAGES if s[1] <= int(index) < s[2]), None)
        if stage is None:
            raise KeyError(f"{key}: torchvision index {index} is outside every MobileNetV2 stage {STAGES}")
        out[f"{stage[0]}.{int(index) - stage[1]}.{rest}"] = value
    return out


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_backbone(cfg, input_shape: ShapeSpec) -> MobileNetV2Backbone:
    """detectron2 builder: MobileNetV2 from ``MODEL.MOBILENET`` and ``MODEL.BACKBONE.FREEZE_AT``."""
    channels = input_shape.channels if input_shape is not None else 3
    if channels not in (None, 3):
        raise ValueError(f"MobileNetV2 takes 3 input channels (len(MODEL.PIXEL_MEAN)), got {channels}")
    m = cfg.MODEL.MOBILENET
    return MobileNetV2Backbone(m.OUT_FEATURES, m.NORM, cfg.MODEL.BACKBONE.FREEZE_AT)
