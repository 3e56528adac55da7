"""gem_d2: multi-dataset DINO with GEM (Global Expert Mapping) Mixture-of-Experts, for detectron2.

Importing this package applies the compatibility shims (gem_d2._compat) and registers gem_d2's
datasets, meta-architecture, backbones and routers with detectron2's registries.
"""
# ruff: noqa: E402, I001  (the shims must run before anything imports detectron2)
from gem_d2 import _compat

_compat.apply()

from gem_d2 import data  # registers the UODB and generated datasets
from gem_d2 import modeling  # registers GEMDINO, the routers and the backbones
from gem_d2 import model_zoo  # registers the gem_d2:// pretrained-weights URLs with PathManager
from gem_d2.config import add_gem_config

__all__ = ["add_gem_config", "data", "model_zoo", "modeling"]
__version__ = "0.1.0"
