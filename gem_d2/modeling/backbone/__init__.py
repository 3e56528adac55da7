"""gem_d2's detectron2 backbones (registered in detectron2's ``BACKBONE_REGISTRY`` on import).

- ``build_mobilenet_v2_backbone``: torchvision's MobileNetV2 in detectron2-style stages (:mod:`.mobilenet`),
  with ImageNet weights at ``MODEL.WEIGHTS gem_d2://ImageNetPretrained/mobilenet_v2`` (docs/backbones.md).
"""
from gem_d2.modeling.backbone.mobilenet import MobileNetV2Backbone, build_mobilenet_v2_backbone  # noqa: F401

__all__ = ["MobileNetV2Backbone", "build_mobilenet_v2_backbone"]
