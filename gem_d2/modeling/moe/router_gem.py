"""Routers without learned parameters: ``gem`` (the planned mapping) and ``dense`` (one shared FFN)."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from gem_d2.modeling.moe.base import Router, RoutingPlan, TokenBatch, register_router


@register_router("gem")
class GEMRouter(Router):
    """GEM: tokens of an image from unit u go to ``mapping[u]`` with ``mapping_weights[u]``. No gate, no loss.

    mapping: per unit row, its expert ids (distinct, each < num_experts, at least one).
    mapping_weights: per row, the combination weights (same lengths, >= 0); empty list/row = 1/k each.
    unit_of_dataset: dataset index -> row (default: dataset i -> row i).
    unit_of_class: unified class id -> row, or -1 for "use the dataset's row" (class-level plans).
    Tokens with labels (decoder queries, ``ctx.query_labels``; a label < 0 means unknown) use
    ``unit_of_class``; other tokens (encoder, unknown labels) use ``unit_of_dataset``.
    """

    def __init__(self, d_model: int, num_experts: int, mapping: Sequence[Sequence[int]],
                 mapping_weights: Optional[Sequence[Sequence[float]]] = None,
                 unit_of_dataset: Optional[Sequence[int]] = None,
                 unit_of_class: Optional[Sequence[int]] = None):
        super().__init__(d_model, num_experts)
        rows = _check_mapping(mapping, num_experts)
        weights = _check_weights(mapping_weights, rows)
        k = max(len(r) for r in rows)
        index = torch.zeros(len(rows), k, dtype=torch.long)
        weight = torch.zeros(len(rows), k)
        pad = torch.ones(len(rows), k, dtype=torch.bool)
        for u, (r, w) in enumerate(zip(rows, weights)):
            index[u, :len(r)] = torch.tensor(r)
            weight[u, :len(r)] = torch.tensor(w)
            pad[u, :len(r)] = False
        if unit_of_dataset is None:
            unit_of_dataset = list(range(len(rows)))
        # non-persistent: the config (MODEL.GEM.MAPPING) is the source of truth, checkpoints carry it separately
        self.register_buffer("table_index", index, persistent=False)
        self.register_buffer("table_weight", weight, persistent=False)
        self.register_buffer("table_pad", pad, persistent=False)
        self.register_buffer("unit_of_dataset", _check_units(unit_of_dataset, len(rows), "unit_of_dataset", False),
                             persistent=False)
        if unit_of_class is not None:
            unit_of_class = _check_units(unit_of_class, len(rows), "unit_of_class", True)
        self.register_buffer("unit_of_class", unit_of_class, persistent=False)

    @classmethod
    def kwargs_from_cfg(cls, cfg, dataset_names: List[str]) -> dict:
        from gem_d2.modeling.moe.mapping_cfg import gem_router_kwargs

        return gem_router_kwargs(cfg, dataset_names)

    def units_of(self, tokens: TokenBatch) -> torch.Tensor:
        """(T,) mapping row of each token."""
        ds = tokens.dataset
        n = self.unit_of_dataset.numel()
        if ds.numel() and (int(ds.min()) < 0 or int(ds.max()) >= n):
            raise ValueError(f"gem router: ctx.dataset_ids has values in [{int(ds.min())}, {int(ds.max())}] but "
                             f"unit_of_dataset covers datasets 0..{n - 1}")
        unit = self.unit_of_dataset[ds]
        if tokens.labels is not None and self.unit_of_class is not None:
            labels = tokens.labels
            n_cls = self.unit_of_class.numel()
            if labels.numel() and int(labels.max()) >= n_cls:
                raise ValueError(f"gem router: ctx.query_labels contains class {int(labels.max())} but "
                                 f"unit_of_class covers classes 0..{n_cls - 1}")
            class_unit = self.unit_of_class[labels.clamp(min=0)]
            unit = torch.where((labels >= 0) & (class_unit >= 0), class_unit, unit)
        return unit

    def route(self, tokens: TokenBatch) -> RoutingPlan:
        unit = self.units_of(tokens)
        return RoutingPlan(self.table_index[unit], self.table_weight[unit], self.table_pad[unit])


@register_router("dense")
class DenseRouter(Router):
    """One FFN expert used by every token with weight 1 (the non-MoE baseline); NUM_EXPERTS is ignored."""

    def __init__(self, d_model: int, num_experts: int = 1):
        super().__init__(d_model, 1)

    def route(self, tokens: TokenBatch) -> RoutingPlan:
        T = tokens.x.shape[0]
        index = torch.zeros(T, 1, dtype=torch.long, device=tokens.x.device)
        return RoutingPlan(index, torch.ones(T, 1, device=tokens.x.device))


def _check_mapping(mapping, num_experts: int) -> List[List[int]]:
    if mapping is None or len(mapping) == 0:
        raise ValueError("MODEL.GEM.MAPPING is empty: the gem router needs a planned mapping; run the planner "
                         "first (tools/plan_experts.py, or tools/train_net.py runs it automatically)")
    rows = []
    for u, row in enumerate(mapping):
        row = list(row)
        if not row:
            raise ValueError(f"MODEL.GEM.MAPPING[{u}] is empty: every unit needs at least one expert")
        for e in row:
            if isinstance(e, bool) or int(e) != e or not 0 <= int(e) < num_experts:
                raise ValueError(f"MODEL.GEM.MAPPING[{u}] = {row}: expert id {e!r} is not an integer in "
                                 f"[0, MODEL.GEM.NUM_EXPERTS={num_experts})")
        if len(set(int(e) for e in row)) != len(row):
            raise ValueError(f"MODEL.GEM.MAPPING[{u}] = {row}: repeated expert id")
        rows.append([int(e) for e in row])
    return rows


def _check_weights(mapping_weights, rows: List[List[int]]) -> List[List[float]]:
    if mapping_weights is None or len(mapping_weights) == 0:
        return [[1.0 / len(r)] * len(r) for r in rows]
    if len(mapping_weights) != len(rows):
        raise ValueError(f"MODEL.GEM.MAPPING_WEIGHTS has {len(mapping_weights)} rows but MODEL.GEM.MAPPING has "
                         f"{len(rows)}: expected one weight row per unit (or an empty list)")
    out = []
    for u, (w, r) in enumerate(zip(mapping_weights, rows)):
        w = [float(v) for v in w]
        if not w:
            w = [1.0 / len(r)] * len(r)
        if len(w) != len(r):
            raise ValueError(f"MODEL.GEM.MAPPING_WEIGHTS[{u}] = {w} has {len(w)} weights but MAPPING[{u}] = {r} "
                             f"has {len(r)} experts")
        if any(not math.isfinite(v) or v < 0 for v in w):
            raise ValueError(f"MODEL.GEM.MAPPING_WEIGHTS[{u}] = {w}: weights must be finite and >= 0")
        out.append(w)
    return out


def _check_units(units, num_rows: int, name: str, allow_unmapped: bool) -> torch.Tensor:
    units = list(units)
    low = -1 if allow_unmapped else 0
    for i, u in enumerate(units):
        if isinstance(u, bool) or int(u) != u or not low <= int(u) < num_rows:
            raise ValueError(f"gem router {name}[{i}] = {u!r}: expected a mapping row in [{low}, {num_rows})")
    if not units:
        raise ValueError(f"gem router {name} is empty")
    return torch.tensor([int(u) for u in units], dtype=torch.long)
