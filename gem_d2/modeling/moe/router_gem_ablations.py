"""The planner ablations as routers: ``gem``'s dispatch with the mapping of another planner variant.

``gem_random``, ``gem_inverse``, ``gem_k2``, ``gem_nocap`` and ``gem_worst`` route exactly like ``gem`` (no gate,
no loss: each token goes to its unit's mapped experts with the mapping's weights). Their mappings are planned
before training like GEM's, by the variant :mod:`gem_d2.planner.ablations` names for the router, and stored in
``MODEL.GEM.{UNITS, MAPPING, MAPPING_WEIGHTS}`` and every checkpoint.
"""
from __future__ import annotations

from typing import List

from gem_d2.modeling.moe.base import register_router
from gem_d2.modeling.moe.router_gem import GEMRouter
from gem_d2.planner.ablations import check_router_cfg


class PlannedAblationRouter(GEMRouter):
    """``gem``'s router whose config is first checked against its planner variant (``gem_k2``: two experts/unit)."""

    @classmethod
    def kwargs_from_cfg(cls, cfg, dataset_names: List[str]) -> dict:
        check_router_cfg(cfg)
        return super().kwargs_from_cfg(cfg, dataset_names)


@register_router("gem_random")
class GEMRandomRouter(PlannedAblationRouter):
    """A uniformly random capacity-respecting mapping (seeded by ``MODEL.GEM.PLANNER.SEED``)."""


@register_router("gem_inverse")
class GEMInverseRouter(PlannedAblationRouter):
    """The mapping that minimises GEM's objective (importance-weighted affinity) under the same constraints."""


@register_router("gem_k2")
class GEMTwoExpertRouter(PlannedAblationRouter):
    """GEM's plan with two experts per unit and the plan's weights (``MODEL.GEM.EXPERTS_PER_UNIT: 2``)."""


@register_router("gem_nocap")
class GEMNoCapacityRouter(PlannedAblationRouter):
    """GEM's LP without capacities: every unit on its most similar experts, however unbalanced."""


@register_router("gem_worst")
class GEMWorstGroupingRouter(PlannedAblationRouter):
    """The grouping of units onto experts that GEM's objective rates worst, whatever the experts are named."""
