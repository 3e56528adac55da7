"""Mixture-of-Experts FFNs and their routers (DESIGN.md §2).

``MoEFFN`` replaces the dense FFN of the layers listed in ``MODEL.GEM.MOE_LAYERS``; the router named
by ``MODEL.GEM.ROUTER`` (``ROUTER_REGISTRY``) decides which experts each token uses. Importing this
package registers the built-in routers: gem, dense, topk, softmoe, remoe, moepp, damex. See
:mod:`.base` for the router interface.
"""
from .base import ROUTER_REGISTRY, MoEResult, Router, RoutingPlan, TokenBatch, register_router
from .dispatch import grouped_dispatch
from .experts import ExpertBank
from .layer import MoEFFN
from .router_gem import DenseRouter, GEMRouter
from .router_moepp import MoEPlusPlusRouter
from .router_remoe import ReMoERouter
from .router_softmoe import SoftMoERouter
from .router_topk import DAMEXRouter, TopKRouter
from .spec import moe_spec_from_cfg

__all__ = [
    "ROUTER_REGISTRY", "Router", "RoutingPlan", "TokenBatch", "MoEResult", "register_router", "ExpertBank",
    "grouped_dispatch", "MoEFFN", "GEMRouter", "DenseRouter", "TopKRouter", "DAMEXRouter", "SoftMoERouter",
    "ReMoERouter", "MoEPlusPlusRouter", "moe_spec_from_cfg",
]
