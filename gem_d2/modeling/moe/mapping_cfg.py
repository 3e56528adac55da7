"""Turn the stored GEM plan (MODEL.GEM.UNITS / MAPPING / MAPPING_WEIGHTS) into ``gem`` router arguments.

Dataset level: UNITS are dataset names; each dataset of DATASETS.TRAIN must have exactly one unit.
Class level (``PLANNER.LEVEL: class``): UNITS are "dataset/class" names (a class of that dataset's
``thing_classes``) and optionally plain dataset names. Class ids are the unified label space: the
concatenation of each dataset's ``thing_classes`` in DATASETS.TRAIN order (``UnifiedLabelSpace``).
Classes without a unit use their dataset's row. A dataset's row (used by encoder tokens and by
queries without a label) is its plain-name unit if present, else the most frequent row (same experts
and weights) among its classes' units, ties going to the class that comes first.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence

from gem_d2.modeling.moe.router_gem import _check_mapping


def thing_classes_of(dataset_names: Sequence[str]) -> List[List[str]]:
    """Each dataset's classes in the unified label space's order (gem_d2.data.label_space)."""
    from gem_d2.data.label_space import UnifiedLabelSpace

    space = UnifiedLabelSpace(list(dataset_names))
    return [list(space.classes(i)) for i in range(len(space))]


def gem_router_kwargs(cfg, dataset_names: Sequence[str]) -> dict:
    """``mapping``, ``mapping_weights``, ``unit_of_dataset`` (and ``unit_of_class`` at class level)."""
    g = cfg.MODEL.GEM
    dataset_names = list(dataset_names)
    mapping = _check_mapping([list(r) for r in g.MAPPING], int(g.NUM_EXPERTS))
    units = list(g.UNITS)
    if len(units) != len(mapping):
        raise ValueError(f"MODEL.GEM.UNITS has {len(units)} names but MODEL.GEM.MAPPING has {len(mapping)} rows: "
                         f"expected one unit name per mapping row")
    dup = [u for u, c in Counter(units).items() if c > 1]
    if dup:
        raise ValueError(f"MODEL.GEM.UNITS repeats {dup}")
    k = int(g.EXPERTS_PER_UNIT)
    for u, row in enumerate(mapping):
        if len(row) != k:
            raise ValueError(f"MODEL.GEM.MAPPING[{u}] ({units[u]!r}) = {row} has {len(row)} experts but "
                             f"MODEL.GEM.EXPERTS_PER_UNIT={k}: the mapping is stale, re-run the planner")
    weights = [list(w) for w in g.MAPPING_WEIGHTS]
    kwargs = dict(mapping=mapping, mapping_weights=weights)
    level = g.PLANNER.LEVEL
    if level == "dataset":
        kwargs["unit_of_dataset"] = _dataset_level_units(units, dataset_names)
    elif level == "class":
        kwargs.update(_class_level_units(units, mapping, weights, dataset_names))
    else:
        raise ValueError(f"MODEL.GEM.PLANNER.LEVEL={level!r}: expected 'dataset' or 'class'")
    return kwargs


def first_expert_per_dataset(cfg, dataset_names: Sequence[str]) -> Optional[List[int]]:
    """The first expert of each dataset's GEM row, or None when MODEL.GEM.MAPPING is empty."""
    if len(cfg.MODEL.GEM.MAPPING) == 0:
        return None
    kw = gem_router_kwargs(cfg, dataset_names)
    return [kw["mapping"][u][0] for u in kw["unit_of_dataset"]]


def _dataset_level_units(units: List[str], dataset_names: List[str]) -> List[int]:
    unknown = [u for u in units if u not in dataset_names]
    if unknown:
        raise ValueError(f"MODEL.GEM.UNITS {unknown} are not in DATASETS.TRAIN {dataset_names} "
                         f"(PLANNER.LEVEL=dataset: units are dataset names)")
    missing = [d for d in dataset_names if d not in units]
    if missing:
        raise ValueError(f"DATASETS.TRAIN {missing} have no unit in MODEL.GEM.UNITS {units}: the mapping was "
                         f"planned for other datasets, re-run the planner")
    return [units.index(d) for d in dataset_names]


def _class_level_units(units: List[str], mapping: List[List[int]], weights: List[List[float]],
                       dataset_names: List[str]) -> Dict[str, List[int]]:
    classes = thing_classes_of(dataset_names)
    offsets = [sum(len(c) for c in classes[:i]) for i in range(len(classes))]
    unit_of_class = [-1] * sum(len(c) for c in classes)
    dataset_row: Dict[int, int] = {}
    class_rows: Dict[int, List[int]] = {d: [] for d in range(len(dataset_names))}
    for u, name in enumerate(units):
        if name in dataset_names:
            dataset_row[dataset_names.index(name)] = u
            continue
        owners = [d for d, dn in enumerate(dataset_names) if name.startswith(dn + "/")]
        if not owners:
            raise ValueError(f"MODEL.GEM.UNITS[{u}] = {name!r}: expected 'dataset/class' with a dataset of "
                             f"DATASETS.TRAIN {dataset_names} (or a plain dataset name) at PLANNER.LEVEL=class")
        d = max(owners, key=lambda i: len(dataset_names[i]))
        cls = name[len(dataset_names[d]) + 1:]
        if cls not in classes[d]:
            raise ValueError(f"MODEL.GEM.UNITS[{u}] = {name!r}: {cls!r} is not a class of {dataset_names[d]!r} "
                             f"(thing_classes {classes[d]})")
        unit_of_class[offsets[d] + classes[d].index(cls)] = u
        class_rows[d].append(u)

    def signature(u: int):
        return tuple(mapping[u]), tuple(weights[u]) if weights else ()

    unit_of_dataset = []
    for d, dn in enumerate(dataset_names):
        if d in dataset_row:
            unit_of_dataset.append(dataset_row[d])
            continue
        if not class_rows[d]:
            raise ValueError(f"DATASETS.TRAIN {dn!r} has no unit in MODEL.GEM.UNITS (neither {dn!r} nor "
                             f"'{dn}/<class>'): the mapping was planned for other datasets, re-run the planner")
        rows = sorted(class_rows[d], key=lambda u: unit_of_class.index(u))  # class order
        freq = Counter(signature(u) for u in rows)
        best = max(freq.values())
        unit_of_dataset.append(next(u for u in rows if freq[signature(u)] == best))
    return dict(unit_of_dataset=unit_of_dataset, unit_of_class=unit_of_class)
