"""``GemMapping``: the planned unit -> experts mapping as stored in the config.

It round-trips through ``MODEL.GEM.UNITS`` (names), ``MODEL.GEM.MAPPING`` (per unit, its expert ids) and
``MODEL.GEM.MAPPING_WEIGHTS`` (per unit, combination weights; written for every unit, ``[1.0]`` when k = 1),
and through a YAML config fragment that ``cfg.merge_from_file`` accepts (or that a config names as ``_BASE_``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import yaml

__all__ = ["GemMapping", "UNIT_SEPARATOR"]

UNIT_SEPARATOR = "/"  # class-level unit names are "<dataset>/<class>"
WEIGHT_DECIMALS = 6  # weights are rounded so the YAML is byte-identical across runs and platforms


@dataclass(frozen=True)
class GemMapping:
    """Units, their expert ids and combination weights.

    Attributes:
        units: unit names (datasets, or "dataset/class" at class level).
        experts: per unit, its expert ids (ascending).
        weights: per unit, one weight per expert (summing to 1).
        num_experts: number of experts per MoE layer the ids index into.
    """

    units: tuple
    experts: tuple
    weights: tuple
    num_experts: int

    def __post_init__(self):
        if len(self.units) != len(self.experts) or len(self.units) != len(self.weights):
            raise ValueError(f"GemMapping: {len(self.units)} units but {len(self.experts)} expert lists and "
                             f"{len(self.weights)} weight lists")

    @classmethod
    def create(cls, units: Sequence[str], experts: Sequence[Sequence[int]],
               weights: Optional[Sequence[Sequence[float]]] = None, num_experts: Optional[int] = None) -> GemMapping:
        """Build from plain lists; ``weights=None`` gives uniform weights, ``num_experts=None`` the largest id + 1."""
        ex = tuple(tuple(int(e) for e in row) for row in experts)
        if weights is None or len(weights) == 0:
            ws = tuple(tuple([1.0 / len(r)] * len(r)) for r in ex)
        else:
            ws = tuple(tuple(float(w) for w in row) for row in weights)
        if num_experts is None:
            num_experts = 1 + max((e for row in ex for e in row), default=-1)
        return cls(units=tuple(str(u) for u in units), experts=ex, weights=ws, num_experts=int(num_experts))

    @classmethod
    def from_plan(cls, plan) -> GemMapping:
        """From an :class:`~gem_d2.planner.plan.ExpertPlan`."""
        return cls.create(plan.unit_names, plan.mapping, plan.weights, num_experts=plan.problem.n)

    @classmethod
    def from_cfg(cls, cfg) -> GemMapping:
        """From ``cfg.MODEL.GEM.{UNITS, MAPPING, MAPPING_WEIGHTS, NUM_EXPERTS}`` (empty weights = uniform)."""
        g = cfg.MODEL.GEM
        if len(g.UNITS) != len(g.MAPPING):
            raise ValueError(f"MODEL.GEM.UNITS has {len(g.UNITS)} entries but MODEL.GEM.MAPPING has "
                             f"{len(g.MAPPING)}; expected one expert list per unit")
        if len(g.MAPPING_WEIGHTS) not in (0, len(g.MAPPING)):
            raise ValueError(f"MODEL.GEM.MAPPING_WEIGHTS has {len(g.MAPPING_WEIGHTS)} entries; expected 0 "
                             f"(uniform) or one per unit ({len(g.MAPPING)})")
        return cls.create(g.UNITS, g.MAPPING, g.MAPPING_WEIGHTS or None, num_experts=g.NUM_EXPERTS)

    @property
    def is_empty(self) -> bool:
        return len(self.units) == 0

    @property
    def experts_per_unit(self) -> Optional[int]:
        """k if every unit has the same number of experts, else None."""
        ks = {len(row) for row in self.experts}
        return ks.pop() if len(ks) == 1 else None

    def unit_index(self) -> dict:
        """{unit name: row index}."""
        return {u: i for i, u in enumerate(self.units)}

    def experts_of(self, unit: str) -> tuple:
        """Expert ids of a unit (KeyError naming the unit if unknown)."""
        idx = self.unit_index()
        if unit not in idx:
            raise KeyError(f"unit {unit!r} is not in the mapping (units: {list(self.units)})")
        return self.experts[idx[unit]]

    def to_cfg(self, cfg):
        """Write into ``cfg.MODEL.GEM`` (UNITS, MAPPING, MAPPING_WEIGHTS, NUM_EXPERTS, EXPERTS_PER_UNIT when uniform).

        The config must be mutable (``cfg.defrost()``); returns it.
        """
        g = cfg.MODEL.GEM
        g.UNITS = list(self.units)
        g.MAPPING = [list(row) for row in self.experts]
        g.MAPPING_WEIGHTS = [[round(w, WEIGHT_DECIMALS) for w in row] for row in self.weights]
        g.NUM_EXPERTS = self.num_experts
        if self.experts_per_unit is not None:
            g.EXPERTS_PER_UNIT = self.experts_per_unit
        return cfg

    def to_dict(self, prototypes: Optional[str] = None) -> dict:
        """The config fragment as a nested dict (``{"MODEL": {"GEM": {...}}}``)."""
        gem = {"NUM_EXPERTS": self.num_experts}
        if self.experts_per_unit is not None:
            gem["EXPERTS_PER_UNIT"] = self.experts_per_unit
        gem["UNITS"] = list(self.units)
        gem["MAPPING"] = [list(row) for row in self.experts]
        gem["MAPPING_WEIGHTS"] = [[round(w, WEIGHT_DECIMALS) for w in row] for row in self.weights]
        if prototypes:
            gem["PROTOTYPES"] = str(prototypes)
        return {"MODEL": {"GEM": gem}}

    def to_yaml(self, prototypes: Optional[str] = None, header: str = "") -> str:
        """YAML config fragment (deterministic text). ``prototypes`` sets MODEL.GEM.PROTOTYPES; ``header`` is
        written as leading comment lines."""
        lines = "".join(f"# {line}\n" for line in header.splitlines()) if header else ""
        return lines + yaml.safe_dump(self.to_dict(prototypes), sort_keys=False, default_flow_style=None, width=120)

    def save(self, path: str, prototypes: Optional[str] = None, header: str = "") -> None:
        """Write :meth:`to_yaml` to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_yaml(prototypes, header))

    @classmethod
    def load(cls, path: str) -> GemMapping:
        """Read a fragment written by :meth:`save` (or any YAML with MODEL.GEM.UNITS/MAPPING)."""
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        try:
            g = data["MODEL"]["GEM"]
            units, mapping = g["UNITS"], g["MAPPING"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: expected MODEL.GEM.UNITS and MODEL.GEM.MAPPING in the YAML") from e
        return cls.create(units, mapping, g.get("MAPPING_WEIGHTS") or None, num_experts=g.get("NUM_EXPERTS"))

    def validate(self, cfg) -> None:
        """Check the mapping against a config; raises ValueError naming the key and the offending value.

        Checks: one expert list (and weight list) per unit; unit names unique; every unit is a ``DATASETS.TRAIN``
        dataset or, at class level (``MODEL.GEM.PLANNER.LEVEL``), "dataset/class" with a class of the dataset's
        ``thing_classes`` (when its metadata is registered); every training dataset has a unit;
        expert ids in ``[0, MODEL.GEM.NUM_EXPERTS)`` and distinct per unit; ``MODEL.GEM.EXPERTS_PER_UNIT`` experts
        per unit; weights non-negative and summing to 1.
        """
        g = cfg.MODEL.GEM
        if self.is_empty:
            raise ValueError("MODEL.GEM.MAPPING is empty; run the planner (tools/plan_experts.py) first")
        if len(set(self.units)) != len(self.units):
            dup = sorted({u for u in self.units if self.units.count(u) > 1})
            raise ValueError(f"MODEL.GEM.UNITS has repeated names: {dup}")
        train = list(cfg.DATASETS.TRAIN)
        level = g.PLANNER.LEVEL
        if level not in ("dataset", "class"):
            raise ValueError(f"MODEL.GEM.PLANNER.LEVEL={level!r}; expected 'dataset' or 'class'")
        covered = set()
        for unit in self.units:
            if unit in train:  # a dataset row (also allowed at class level: the dataset's default experts)
                covered.add(unit)
                continue
            owners = [d for d in train if unit.startswith(d + UNIT_SEPARATOR)] if level == "class" else []
            if not owners:
                form = "a dataset or 'dataset/class' with a dataset" if level == "class" else "a dataset"
                raise ValueError(f"MODEL.GEM.UNITS: unit {unit!r} is not {form} of DATASETS.TRAIN {train} "
                                 f"(MODEL.GEM.PLANNER.LEVEL={level})")
            dataset = max(owners, key=len)
            covered.add(dataset)
            classes = _thing_classes(dataset)
            cls_name = unit[len(dataset) + 1:]
            if classes is not None and cls_name not in classes:
                raise ValueError(f"MODEL.GEM.UNITS: unit {unit!r}: class {cls_name!r} is not one of "
                                 f"{dataset}'s thing_classes {classes}")
        missing = [d for d in train if d not in covered]
        if missing:
            raise ValueError(f"MODEL.GEM.UNITS has no unit for the training dataset(s) {missing}; re-plan with the "
                             "current DATASETS.TRAIN")
        k = int(g.EXPERTS_PER_UNIT)
        for unit, row, ws in zip(self.units, self.experts, self.weights):
            bad = [e for e in row if not 0 <= e < g.NUM_EXPERTS]
            if bad:
                raise ValueError(f"MODEL.GEM.MAPPING: unit {unit!r} uses expert id(s) {bad} outside "
                                 f"[0, MODEL.GEM.NUM_EXPERTS={g.NUM_EXPERTS})")
            if len(set(row)) != len(row):
                raise ValueError(f"MODEL.GEM.MAPPING: unit {unit!r} lists an expert twice: {list(row)}")
            if len(row) != k:
                raise ValueError(f"MODEL.GEM.MAPPING: unit {unit!r} has {len(row)} experts {list(row)} but "
                                 f"MODEL.GEM.EXPERTS_PER_UNIT={k}")
            if len(ws) != len(row):
                raise ValueError(f"MODEL.GEM.MAPPING_WEIGHTS: unit {unit!r} has {len(ws)} weights for "
                                 f"{len(row)} experts")
            if any(w < 0 or not math.isfinite(w) for w in ws) or abs(sum(ws) - 1.0) > 1e-4:
                raise ValueError(f"MODEL.GEM.MAPPING_WEIGHTS: unit {unit!r} has weights {list(ws)}; expected "
                                 "finite non-negative weights summing to 1")


def _thing_classes(dataset: str):
    """The dataset's registered ``thing_classes``, or None when detectron2 or the metadata is unavailable."""
    try:
        from detectron2.data import MetadataCatalog
    except ImportError:
        return None
    meta = MetadataCatalog.get(dataset)
    return list(meta.thing_classes) if hasattr(meta, "thing_classes") else None
