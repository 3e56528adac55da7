"""gem_d2.modeling: the GEMDINO meta-architecture (detectron2 adapter), the DINO detector (``dino/``),
the Mixture-of-Experts layers and routers (``moe/``), backbones (``backbone/``) and test-time dataset
identification.

Importing it registers ``GEMDINO`` in detectron2's ``META_ARCH_REGISTRY``, the routers in
``ROUTER_REGISTRY`` and the MobileNetV2 backbone in ``BACKBONE_REGISTRY``.
"""
from gem_d2.modeling import moe  # noqa: F401  (registers the routers)
from gem_d2.modeling.backbone import build_mobilenet_v2_backbone  # noqa: F401  (registers the backbone)
from gem_d2.modeling.dino import DINO  # noqa: F401
from gem_d2.modeling.meta_arch import GEMDINO  # noqa: F401  (registers GEMDINO)
