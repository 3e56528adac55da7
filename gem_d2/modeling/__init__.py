"""gem_d2.modeling: the GEMDINO meta-architecture, the DINO transformer, and the MoE FFN layers.

Importing it registers ``GEMDINO`` in detectron2's ``META_ARCH_REGISTRY`` and, when the MoE package
is present, the routers in its registry.
"""
from pathlib import Path

from . import meta_arch  # noqa: F401  (registers GEMDINO)
from .backbone import build_mobilenet_v2_backbone  # noqa: F401  (registers it and the gem_d2:// weights URLs)
from .dino import DINO  # noqa: F401
from .meta_arch import GEMDINO  # noqa: F401

if (Path(__file__).resolve().parent / "moe" / "__init__.py").is_file():
    from . import moe  # noqa: F401  (registers the routers)
