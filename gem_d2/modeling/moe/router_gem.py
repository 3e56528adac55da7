"""Routers without learned parameters: ``gem`` (the planned mapping) and ``dense`` (one shared FFN)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from gem_d2.data.label_space import UnifiedLabelSpace
from gem_d2.modeling.moe.base import ImageRoute, Router, RoutingPlan, TokenBatch, register_router
from gem_d2.modeling.moe.context import RoutingContext
from gem_d2.planner.mapping import GemMapping, RouterTables
from gem_d2.utils.checks import check_index_range


def gem_tables_from_cfg(cfg, dataset_names: Sequence[str]) -> RouterTables:
    """The ``gem`` router's tables of ``cfg``'s mapping (``MODEL.GEM``) for the label space's datasets.

    Class level (``MODEL.GEM.PLANNER.LEVEL: class``) uses each dataset's class names from the unified label space.
    """
    g = cfg.MODEL.GEM
    mapping = GemMapping.from_cfg(cfg)
    classes = None
    if g.PLANNER.LEVEL == "class":
        space = UnifiedLabelSpace(list(dataset_names))
        classes = [list(space.classes(i)) for i in range(len(space))]
    mapping.validate(dataset_names, g.PLANNER.LEVEL, classes, int(g.EXPERTS_PER_UNIT), int(g.NUM_EXPERTS))
    return mapping.router_tables(dataset_names, classes)


@register_router("gem")
class GEMRouter(Router):
    """GEM: tokens of an image from unit u go to the mapping row's experts with its weights. No gate, no loss.

    tables: :class:`~gem_d2.planner.mapping.RouterTables` of the mapping (``GemMapping.router_tables``).
    Tokens with labels (decoder queries, ``ctx.query_labels``; a label < 0 means unknown) use
    ``unit_of_class`` when the plan is class-level; other tokens use their dataset's row. Whenever every token of
    an image uses its dataset's row (a dataset-level plan, or tokens without labels), :meth:`image_routes` gives
    the rows per image and the layer runs the experts on each image's contiguous tokens.
    """

    def __init__(self, d_model: int, num_experts: int, tables: RouterTables):
        super().__init__(d_model, num_experts)
        bad = sorted({e for row, pads in zip(tables.index, tables.pad) for e, p in zip(row, pads)
                      if not p and not 0 <= e < num_experts})
        if bad:
            raise ValueError(f"gem router: expert ids {bad} outside [0, MODEL.GEM.NUM_EXPERTS={num_experts})")
        # non-persistent: the config (MODEL.GEM.MAPPING) is the source of truth, checkpoints carry it separately
        self.register_buffer("table_index", torch.tensor(tables.index, dtype=torch.long), persistent=False)
        self.register_buffer("table_weight", torch.tensor(tables.weight, dtype=torch.float32), persistent=False)
        self.register_buffer("table_pad", torch.tensor(tables.pad, dtype=torch.bool), persistent=False)
        self.register_buffer("unit_of_dataset", torch.tensor(tables.unit_of_dataset, dtype=torch.long),
                             persistent=False)
        unit_of_class = None if tables.unit_of_class is None else torch.tensor(tables.unit_of_class, dtype=torch.long)
        self.register_buffer("unit_of_class", unit_of_class, persistent=False)
        # host copies for per-image routing: weights rounded to float32 like the buffer the per-token path reads
        weight32 = torch.tensor(tables.weight, dtype=torch.float32).tolist()
        self._rows = [tuple((int(e), float(w)) for e, w, p in zip(row, ws, pads) if not p)
                      for row, ws, pads in zip(tables.index, weight32, tables.pad)]
        self._unit_of_dataset = [int(u) for u in tables.unit_of_dataset]

    @classmethod
    def kwargs_from_cfg(cls, cfg, dataset_names: List[str]) -> dict:
        return {"tables": gem_tables_from_cfg(cfg, dataset_names)}

    def units_of(self, tokens: TokenBatch) -> torch.Tensor:
        """(T,) mapping row of each token."""
        unit = self.unit_of_dataset[tokens.dataset]
        if tokens.labels is not None and self.unit_of_class is not None:
            labels = tokens.labels
            class_unit = self.unit_of_class[labels.clamp(min=0)]
            unit = torch.where((labels >= 0) & (class_unit >= 0), class_unit, unit)
        return unit

    def image_routes(self, ctx: RoutingContext, num_images: int) -> Optional[List[ImageRoute]]:
        """Each image's dataset row, unless a class-level plan routes labelled tokens (then None: per token)."""
        if self.unit_of_class is not None and ctx.query_labels is not None:
            return None
        ids = ctx.dataset_id_list()
        check_index_range(ids, len(self._unit_of_dataset), "gem router: dataset ids (the mapping's datasets)")
        return [self._rows[self._unit_of_dataset[d]] for d in ids]

    def route(self, tokens: TokenBatch) -> RoutingPlan:
        unit = self.units_of(tokens)
        return RoutingPlan(self.table_index[unit], self.table_weight[unit], self.table_pad[unit])


@register_router("dense")
class DenseRouter(Router):
    """One FFN expert used by every token with weight 1 (the non-MoE baseline); NUM_EXPERTS is ignored."""

    def __init__(self, d_model: int, num_experts: int = 1):
        super().__init__(d_model, 1)

    def image_routes(self, ctx: RoutingContext, num_images: int) -> Optional[List[ImageRoute]]:
        return [((0, 1.0),)] * num_images

    def route(self, tokens: TokenBatch) -> RoutingPlan:
        T = tokens.x.shape[0]
        index = torch.zeros(T, 1, dtype=torch.long, device=tokens.x.device)
        return RoutingPlan(index, torch.ones(T, 1, device=tokens.x.device))
