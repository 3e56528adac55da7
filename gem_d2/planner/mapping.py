"""``GemMapping``: the one representation of a GEM plan, units -> experts -> weights.

Everything that stores, reads, compares or routes with a mapping goes through this type:

- config: ``MODEL.GEM.{UNITS, MAPPING, MAPPING_WEIGHTS, NUM_EXPERTS, MOE_LAYERS}`` (:meth:`from_cfg`, :meth:`to_cfg`);
- checkpoints: the ``gem_mapping`` record, plain lists only (:meth:`from_record`, :meth:`to_record`);
- YAML fragments that ``cfg.merge_from_file`` accepts (:meth:`to_yaml`, :meth:`save`, :meth:`load`);
- comparison (:meth:`diff`), validation (:meth:`validate`, structural rules in :meth:`create`);
- the lookup tables of the ``gem`` router (:meth:`router_tables`).

Rules (checked once, in :meth:`create`): one expert row and one weight row per unit; unit names unique;
each row has at least one expert, ids distinct integers in ``[0, num_experts)``; weights finite,
non-negative and summing to 1 (an empty weight list means uniform ``1/k``). Class-level unit names are
``"<dataset>/<class>"`` (:data:`UNIT_SEPARATOR`, :func:`class_unit_name`, :meth:`GemMapping.split_unit`).
An empty mapping (no units) means "not planned yet".
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from gem_d2.utils.files import atomic_write

__all__ = ["GemMapping", "RouterTables", "UNIT_SEPARATOR", "class_unit_name"]

UNIT_SEPARATOR = "/"  # class-level unit names are "<dataset>/<class>"
WEIGHT_DECIMALS = 6  # weights are rounded when written, so the YAML is byte-identical across runs and platforms
WEIGHT_SUM_TOLERANCE = 1e-4
_RECORD_KEYS = ("units", "mapping", "mapping_weights", "num_experts", "moe_layers")


def class_unit_name(dataset: str, class_name: str) -> str:
    """The unit name of one class of one dataset at class level."""
    return f"{dataset}{UNIT_SEPARATOR}{class_name}"


@dataclass(frozen=True)
class RouterTables:
    """What the ``gem`` router looks up, as plain lists (the router turns them into buffers).

    index: (U, k) expert ids per mapping row (rows shorter than k padded with 0).
    weight: (U, k) combination weights (0 at padding).
    pad: (U, k) True where a row has no k-th expert.
    unit_of_dataset: (D,) mapping row of each dataset of the label space.
    unit_of_class: (K,) mapping row of each unified class id, -1 = its dataset's row; None at dataset level.
    """

    index: List[List[int]]
    weight: List[List[float]]
    pad: List[List[bool]]
    unit_of_dataset: List[int]
    unit_of_class: Optional[List[int]] = None


@dataclass(frozen=True)
class GemMapping:
    """Units, their expert ids and combination weights, and the expert layout the ids refer to.

    Attributes:
        units: unit names (datasets, or "dataset/class" at class level).
        experts: per unit, its expert ids.
        weights: per unit, one weight per expert (summing to 1).
        num_experts: experts per MoE layer the ids index into.
        moe_layers: the MoE layers ("encoder.i"/"decoder.i") the mapping routes; () when not tied to a model.
    Build with :meth:`create` (or the ``from_*`` readers), which applies the rules of the module docstring.
    """

    units: Tuple[str, ...]
    experts: Tuple[Tuple[int, ...], ...]
    weights: Tuple[Tuple[float, ...], ...]
    num_experts: int
    moe_layers: Tuple[str, ...] = ()

    # ------------------------------------------------------------------ construction and readers

    @classmethod
    def create(cls, units: Sequence[str], experts: Sequence[Sequence[int]],
               weights: Optional[Sequence[Sequence[float]]] = None, num_experts: Optional[int] = None,
               moe_layers: Sequence[str] = (), source: str = "MODEL.GEM") -> GemMapping:
        """Check and build. ``weights`` None/empty = uniform; ``num_experts`` None = largest id + 1.

        Errors (ValueError) name ``source`` and the offending key and value.
        """
        units = [str(u) for u in units]
        rows = [list(r) for r in experts]
        if len(units) != len(rows):
            raise ValueError(f"{source}.UNITS has {len(units)} entries but {source}.MAPPING has {len(rows)}; "
                             "expected one expert list per unit")
        repeated = sorted(u for u, c in Counter(units).items() if c > 1)
        if repeated:
            raise ValueError(f"{source}.UNITS has repeated names: {repeated}")
        if num_experts is None:
            num_experts = 1 + max((int(e) for r in rows for e in r), default=-1)
        num_experts = int(num_experts)
        checked = tuple(_check_row(u, r, num_experts, source) for u, r in zip(units, rows))
        if weights is None or len(weights) == 0:
            ws = tuple(tuple([1.0 / len(r)] * len(r)) for r in checked)
        else:
            if len(weights) != len(checked):
                raise ValueError(f"{source}.MAPPING_WEIGHTS has {len(weights)} rows but {source}.MAPPING has "
                                 f"{len(checked)}; expected one weight row per unit or an empty list (uniform)")
            ws = tuple(_check_weights(u, w, r, source) for u, w, r in zip(units, weights, checked))
        return cls(tuple(units), checked, ws, num_experts, tuple(str(n) for n in moe_layers))

    @classmethod
    def empty(cls, num_experts: int = 0, moe_layers: Sequence[str] = ()) -> GemMapping:
        """A mapping with no units: "not planned yet"."""
        return cls((), (), (), int(num_experts), tuple(moe_layers))

    @classmethod
    def from_plan(cls, plan, moe_layers: Sequence[str] = ()) -> GemMapping:
        """From an :class:`~gem_d2.planner.plan.ExpertPlan`."""
        return cls.create(plan.unit_names, plan.mapping, plan.weights, num_experts=plan.problem.n,
                          moe_layers=moe_layers, source="planner")

    @classmethod
    def from_cfg(cls, cfg) -> GemMapping:
        """From ``cfg.MODEL.GEM.{UNITS, MAPPING, MAPPING_WEIGHTS, NUM_EXPERTS, MOE_LAYERS}``."""
        g = cfg.MODEL.GEM
        return cls.create(g.UNITS, g.MAPPING, g.MAPPING_WEIGHTS, num_experts=g.NUM_EXPERTS, moe_layers=g.MOE_LAYERS)

    @classmethod
    def from_record(cls, record: Any, source: str) -> GemMapping:
        """From a checkpoint's ``gem_mapping`` record (:meth:`to_record`); ``source`` names the file in errors."""
        if not isinstance(record, dict) or any(k not in record for k in ("units", "mapping", "num_experts")):
            raise ValueError(f"{source}: malformed GEM mapping record {record!r}: expected a dict with "
                             f"{list(_RECORD_KEYS)}")
        try:
            return cls.create(record["units"], record["mapping"], record.get("mapping_weights") or None,
                              num_experts=int(record["num_experts"]), moe_layers=record.get("moe_layers", ()),
                              source=source)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed GEM mapping record: {e}") from e

    @classmethod
    def load(cls, path: str) -> GemMapping:
        """Read a YAML fragment written by :meth:`save` (or any YAML with MODEL.GEM.UNITS/MAPPING)."""
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        try:
            g = data["MODEL"]["GEM"]
            units, experts = g["UNITS"], g["MAPPING"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: expected MODEL.GEM.UNITS and MODEL.GEM.MAPPING in the YAML") from e
        return cls.create(units, experts, g.get("MAPPING_WEIGHTS") or None, num_experts=g.get("NUM_EXPERTS"),
                          moe_layers=g.get("MOE_LAYERS", ()), source=path)

    # ------------------------------------------------------------------ writers

    def to_cfg(self, cfg):
        """Write UNITS, MAPPING, MAPPING_WEIGHTS, NUM_EXPERTS (and MOE_LAYERS when recorded) into ``cfg.MODEL.GEM``.

        The config must be mutable (``cfg.defrost()``); returns it.
        """
        g = cfg.MODEL.GEM
        g.UNITS = list(self.units)
        g.MAPPING = [list(row) for row in self.experts]
        g.MAPPING_WEIGHTS = self._rounded_weights()
        g.NUM_EXPERTS = self.num_experts
        if self.moe_layers:
            g.MOE_LAYERS = list(self.moe_layers)
        return cfg

    def to_record(self) -> Dict[str, Any]:
        """The checkpoint record: plain lists and ints (``torch.load(weights_only=True)`` reads it)."""
        return {"units": list(self.units), "mapping": [list(r) for r in self.experts],
                "mapping_weights": [list(w) for w in self.weights], "num_experts": self.num_experts,
                "moe_layers": list(self.moe_layers)}

    def to_yaml(self, header: str = "") -> str:
        """A YAML config fragment (deterministic text); ``header`` becomes leading comment lines."""
        gem = {"NUM_EXPERTS": self.num_experts}
        if self.experts_per_unit is not None:
            gem["EXPERTS_PER_UNIT"] = self.experts_per_unit
        gem["UNITS"] = list(self.units)
        gem["MAPPING"] = [list(row) for row in self.experts]
        gem["MAPPING_WEIGHTS"] = self._rounded_weights()
        if self.moe_layers:
            gem["MOE_LAYERS"] = list(self.moe_layers)
        lines = "".join(f"# {line}\n" for line in header.splitlines()) if header else ""
        return lines + yaml.safe_dump({"MODEL": {"GEM": gem}}, sort_keys=False, default_flow_style=None, width=120)

    def save(self, path: str, header: str = "") -> None:
        """Write :meth:`to_yaml` to ``path`` atomically."""
        text = self.to_yaml(header)
        atomic_write(path, lambda f: f.write(text), binary=False)

    def _rounded_weights(self) -> List[List[float]]:
        return [[round(w, WEIGHT_DECIMALS) for w in row] for row in self.weights]

    # ------------------------------------------------------------------ queries

    @property
    def is_empty(self) -> bool:
        return len(self.units) == 0

    @property
    def experts_per_unit(self) -> Optional[int]:
        """k if every unit has the same number of experts, else None."""
        ks = {len(row) for row in self.experts}
        return ks.pop() if len(ks) == 1 else None

    def experts_of(self, unit: str) -> Tuple[int, ...]:
        """Expert ids of a unit (KeyError naming the unit if unknown)."""
        if unit not in self.units:
            raise KeyError(f"unit {unit!r} is not in the mapping (units: {list(self.units)})")
        return self.experts[self.units.index(unit)]

    def used_experts(self) -> List[int]:
        """Sorted expert ids that at least one unit uses."""
        return sorted({e for row in self.experts for e in row})

    def with_unit(self, unit: str, experts: Sequence[int], weights: Optional[Sequence[float]] = None,
                  num_experts: Optional[int] = None) -> GemMapping:
        """A copy with one more unit (and optionally more experts per layer), checked like :meth:`create`."""
        new_weights = list(weights) if weights else [1.0 / len(experts)] * len(experts)
        return GemMapping.create(self.units + (unit,), self.experts + (tuple(experts),),
                                 [list(w) for w in self.weights] + [new_weights],
                                 num_experts=self.num_experts if num_experts is None else num_experts,
                                 moe_layers=self.moe_layers)

    def diff(self, other: GemMapping) -> List[str]:
        """Human-readable differences in units, experts, weights (to 1e-6), expert count and MoE layers; [] if equal."""
        out = []
        if self.units != other.units:
            out.append(f"units: {list(self.units)} vs {list(other.units)}")
        if self.experts != other.experts:
            out.append(f"mapping: {[list(r) for r in self.experts]} vs {[list(r) for r in other.experts]}")
        same_w = len(self.weights) == len(other.weights) and all(
            len(a) == len(b) and np.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(self.weights, other.weights))
        if not same_w:
            out.append(f"mapping_weights: {[list(w) for w in self.weights]} vs {[list(w) for w in other.weights]}")
        if self.num_experts != other.num_experts:
            out.append(f"num_experts: {self.num_experts} vs {other.num_experts}")
        if self.moe_layers != other.moe_layers:
            out.append(f"moe_layers: {list(self.moe_layers)} vs {list(other.moe_layers)}")
        return out

    def split_unit(self, unit: str, datasets: Sequence[str]) -> Tuple[str, Optional[str]]:
        """``(dataset, class or None)`` of a unit name against the datasets it may belong to.

        A plain dataset name gives ``(dataset, None)``; ``"dataset/class"`` the longest matching dataset and the
        rest. ValueError naming the unit when it belongs to none of ``datasets``.
        """
        if unit in datasets:
            return unit, None
        owners = [d for d in datasets if unit.startswith(d + UNIT_SEPARATOR)]
        if not owners:
            raise ValueError(f"MODEL.GEM.UNITS: unit {unit!r} is neither a dataset of DATASETS.TRAIN {list(datasets)} "
                             f"nor 'dataset{UNIT_SEPARATOR}class' with one of them")
        dataset = max(owners, key=len)
        return dataset, unit[len(dataset) + 1:]

    # ------------------------------------------------------------------ validation against a model

    def validate(self, datasets: Sequence[str], level: str = "dataset",
                 dataset_classes: Optional[Sequence[Sequence[str]]] = None, experts_per_unit: Optional[int] = None,
                 num_experts: Optional[int] = None) -> None:
        """Check that the mapping fits a model; ValueError naming the key and value otherwise.

        Args:
            datasets: ``DATASETS.TRAIN`` (the label space's datasets, in order).
            level: ``MODEL.GEM.PLANNER.LEVEL``: "dataset" (units are datasets) or "class" (units may also be
                "dataset/class" with a class of ``dataset_classes``).
            dataset_classes: each dataset's class names (needed at class level).
            experts_per_unit: ``MODEL.GEM.EXPERTS_PER_UNIT`` (every row must have that many experts), or None.
            num_experts: ``MODEL.GEM.NUM_EXPERTS`` the model is built with, or None.
        """
        datasets = list(datasets)
        if level not in ("dataset", "class"):
            raise ValueError(f"MODEL.GEM.PLANNER.LEVEL={level!r}; expected 'dataset' or 'class'")
        if self.is_empty:
            raise ValueError("MODEL.GEM.MAPPING is empty: the gem router needs a planned mapping; run the planner "
                             "(tools/plan_experts.py, or tools/train_net.py plans it before training)")
        if num_experts is not None and int(num_experts) != self.num_experts:
            raise ValueError(f"the mapping indexes {self.num_experts} experts but MODEL.GEM.NUM_EXPERTS={num_experts}")
        covered = set()
        for unit in self.units:
            dataset, cls_name = self.split_unit(unit, datasets)
            if cls_name is not None:
                if level != "class":
                    raise ValueError(f"MODEL.GEM.UNITS: unit {unit!r} is a class unit but MODEL.GEM.PLANNER.LEVEL="
                                     "dataset: units are dataset names")
                classes = list(dataset_classes[datasets.index(dataset)]) if dataset_classes is not None else None
                if classes is not None and cls_name not in classes:
                    raise ValueError(f"MODEL.GEM.UNITS: unit {unit!r}: class {cls_name!r} is not one of "
                                     f"{dataset}'s classes {classes}")
            covered.add(dataset)
        missing = [d for d in datasets if d not in covered]
        if missing:
            raise ValueError(f"MODEL.GEM.UNITS {list(self.units)} has no unit for the training dataset(s) {missing}: "
                             "the mapping was planned for other datasets; re-run the planner")
        if experts_per_unit is not None:
            for unit, row in zip(self.units, self.experts):
                if len(row) != int(experts_per_unit):
                    raise ValueError(f"MODEL.GEM.MAPPING: unit {unit!r} has {len(row)} experts {list(row)} but "
                                     f"MODEL.GEM.EXPERTS_PER_UNIT={experts_per_unit}: the mapping is stale, re-plan")

    def validate_cfg(self, cfg) -> None:
        """:meth:`validate` against a config: ``DATASETS.TRAIN``, ``MODEL.GEM.PLANNER.LEVEL``, ``EXPERTS_PER_UNIT``,
        ``NUM_EXPERTS``; class names from the datasets' registered ``thing_classes`` at class level."""
        g = cfg.MODEL.GEM
        datasets = list(cfg.DATASETS.TRAIN)
        classes = None
        if g.PLANNER.LEVEL == "class":
            from detectron2.data import MetadataCatalog

            classes = [list(MetadataCatalog.get(d).get("thing_classes", [])) for d in datasets]
        self.validate(datasets, g.PLANNER.LEVEL, classes, int(g.EXPERTS_PER_UNIT), int(g.NUM_EXPERTS))

    # ------------------------------------------------------------------ router tables

    def router_tables(self, datasets: Sequence[str],
                      dataset_classes: Optional[Sequence[Sequence[str]]] = None) -> RouterTables:
        """The ``gem`` router's tables for the label space ``datasets`` (class level when ``dataset_classes``).

        A dataset's row (encoder tokens, queries without a label) is its plain-name unit if present, else the most
        frequent row (same experts and weights) among its class units, ties going to the class that comes first.
        Class ids are the unified label space: the datasets' class lists concatenated in ``datasets`` order.
        """
        datasets = list(datasets)
        level = "dataset" if dataset_classes is None else "class"
        self.validate(datasets, level, dataset_classes)
        k = max(len(r) for r in self.experts)
        index = [list(r) + [0] * (k - len(r)) for r in self.experts]
        weight = [list(w) + [0.0] * (k - len(w)) for w in self.weights]
        pad = [[False] * len(r) + [True] * (k - len(r)) for r in self.experts]
        if dataset_classes is None:
            return RouterTables(index, weight, pad, [self.units.index(d) for d in datasets])
        offsets = np.cumsum([0] + [len(c) for c in dataset_classes]).tolist()
        unit_of_class = [-1] * offsets[-1]
        class_rows: Dict[int, List[Tuple[int, int]]] = {d: [] for d in range(len(datasets))}
        for u, unit in enumerate(self.units):
            dataset, cls_name = self.split_unit(unit, datasets)
            if cls_name is not None:
                d = datasets.index(dataset)
                c = list(dataset_classes[d]).index(cls_name)
                unit_of_class[offsets[d] + c] = u
                class_rows[d].append((c, u))
        unit_of_dataset = []
        for d, name in enumerate(datasets):
            if name in self.units:
                unit_of_dataset.append(self.units.index(name))
                continue
            rows = [u for _, u in sorted(class_rows[d])]
            signature = {u: (self.experts[u], self.weights[u]) for u in rows}
            freq = Counter(signature.values())
            best = max(freq.values())
            unit_of_dataset.append(next(u for u in rows if freq[signature[u]] == best))
        return RouterTables(index, weight, pad, unit_of_dataset, unit_of_class)


def _check_row(unit: str, row: Sequence[Any], num_experts: int, source: str) -> Tuple[int, ...]:
    if len(row) == 0:
        raise ValueError(f"{source}.MAPPING: unit {unit!r} has no expert; every unit needs at least one")
    ids = []
    for e in row:
        if isinstance(e, bool) or not isinstance(e, (int, np.integer, float)) or int(e) != e \
                or not 0 <= int(e) < num_experts:
            raise ValueError(f"{source}.MAPPING: unit {unit!r} = {list(row)}: expert id {e!r} is not an integer in "
                             f"[0, NUM_EXPERTS={num_experts})")
        ids.append(int(e))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{source}.MAPPING: unit {unit!r} lists an expert twice: {ids}")
    return tuple(ids)


def _check_weights(unit: str, weights: Sequence[Any], row: Tuple[int, ...], source: str) -> Tuple[float, ...]:
    try:
        ws = [float(w) for w in weights]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}.MAPPING_WEIGHTS: unit {unit!r} has non-numeric weights {weights!r}") from e
    if len(ws) != len(row):
        raise ValueError(f"{source}.MAPPING_WEIGHTS: unit {unit!r} has {len(ws)} weights {ws} for {len(row)} "
                         f"experts {list(row)}")
    if any(w < 0 or not math.isfinite(w) for w in ws) or abs(sum(ws) - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"{source}.MAPPING_WEIGHTS: unit {unit!r} has weights {ws}; expected finite non-negative "
                         "weights summing to 1")
    return tuple(ws)
