"""Mixture-of-Experts FFNs and their routers (docs/design/routers.md).

``MoEFFN`` replaces the dense FFN of the layers listed in ``MODEL.GEM.MOE_LAYERS``; the router named
by ``MODEL.GEM.ROUTER`` (``ROUTER_REGISTRY``) decides which experts each token uses. Importing this
package registers the built-in routers (gem, dense, topk, softmoe, remoe, moepp, damex) and GEM's planner
ablations (gem_random, gem_inverse, gem_worst, gem_k2, gem_nocap). See :mod:`.base` for the router interface.
"""
from gem_d2.modeling.moe import router_gem_ablations  # noqa: F401  (registers gem_random, gem_inverse, gem_k2, gem_nocap, gem_worst)
from gem_d2.modeling.moe.base import ROUTER_REGISTRY, MoEResult, Router, RoutingPlan, TokenBatch, register_router
from gem_d2.modeling.moe.dispatch import grouped_dispatch
from gem_d2.modeling.moe.experts import ExpertBank
from gem_d2.modeling.moe.layer import MoEFFN
from gem_d2.modeling.moe.router_gem import DenseRouter, GEMRouter
from gem_d2.modeling.moe.router_moepp import MoEPlusPlusRouter
from gem_d2.modeling.moe.router_remoe import ReMoERouter
from gem_d2.modeling.moe.router_softmoe import SoftMoERouter
from gem_d2.modeling.moe.router_topk import DAMEXRouter, TopKRouter
from gem_d2.modeling.moe.spec import moe_spec_from_cfg

__all__ = [
    "ROUTER_REGISTRY", "Router", "RoutingPlan", "TokenBatch", "MoEResult", "register_router", "ExpertBank",
    "grouped_dispatch", "MoEFFN", "GEMRouter", "DenseRouter", "TopKRouter", "DAMEXRouter", "SoftMoERouter",
    "ReMoERouter", "MoEPlusPlusRouter", "moe_spec_from_cfg",
]
