"""gem_d2: multi-dataset DINO with GEM (Global Expert Mapping) Mixture-of-Experts, for detectron2.

Importing this package applies the compatibility shims (gem_d2._compat) and registers gem_d2's
datasets, meta-architecture, backbones and routers with detectron2's registries.
"""
from . import _compat

_compat.apply()

from . import data  # noqa: E402,F401  (registers datasets)
from . import modeling  # noqa: E402,F401  (registers GEMDINO, routers)
from .config import add_gem_config  # noqa: E402,F401

__version__ = "0.1.0"
