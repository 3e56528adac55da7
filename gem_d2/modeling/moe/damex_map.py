"""The dataset -> expert map of the ``damex`` router: DAMEX's hand-written UODB map, or one given in the config.

DAMEX trains its gate toward a fixed expert per dataset, and that map is written by hand, not learned or
planned. On UODB its public code gives each of the 8 experts one dataset, except that KITTI shares LISA's
expert and VOC (2007 and 2012) and Comic share COCO's. :data:`UODB_DAMEX_MAP` is that map keyed by gem-d2's UODB
training datasets (``gem_d2.data.uodb``; gem-d2 has one VOC dataset for VOC2007 + VOC2012 trainval, where
DAMEX concatenates two, both on COCO's expert).

For any other set of training datasets the map is ``MODEL.GEM.DAMEX.DATASET_TO_EXPERT``: a list of
``[dataset, expert]`` pairs naming every ``DATASETS.TRAIN`` dataset once, or a plain list of expert ids in
``DATASETS.TRAIN`` order. It is never derived from GEM's plan nor from the dataset index.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

__all__ = ["UODB_DAMEX_MAP", "damex_dataset_to_expert"]

# DAMEX's published UODB map: its dataset order (clipart, coco, deeplesion, dota, kitchen, lisa, watercolor,
# widerface, kitti, voc07, voc12, comic) gives the first eight datasets experts 0..7, then merges KITTI into LISA's
# expert (5) and VOC07, VOC12 and Comic into COCO's (1).
UODB_DAMEX_MAP: Dict[str, int] = {
    "uodb_clipart_train": 0,
    "uodb_coco_valminusminival": 1,
    "uodb_deeplesion_trainval": 2,
    "uodb_dota_train": 3,
    "uodb_kitchen_train": 4,
    "uodb_lisa_train": 5,
    "uodb_watercolor_train": 6,
    "uodb_widerface_train": 7,
    "uodb_kitti_train": 5,
    "uodb_voc_trainval": 1,
    "uodb_comic_train": 1,
}

_KEY = "MODEL.GEM.DAMEX.DATASET_TO_EXPERT"


def _expert_id(value, where: str, num_experts: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_experts:
        raise ValueError(f"{_KEY}: {where} has expert {value!r}; expected an integer in "
                         f"[0, MODEL.GEM.NUM_EXPERTS={num_experts})")
    return int(value)


def damex_dataset_to_expert(entries: Sequence, dataset_names: Sequence[str], num_experts: int) -> List[int]:
    """The expert of each dataset of ``dataset_names`` (``DATASETS.TRAIN`` order) for DAMEX's loss.

    ``entries``: the config value (see the module docstring); empty means :data:`UODB_DAMEX_MAP`, which
    requires every training dataset to be a UODB training dataset and ``num_experts`` >= 8. Errors name the key.
    """
    names = [str(d) for d in dataset_names]
    entries = list(entries)
    if not entries:
        unknown = [d for d in names if d not in UODB_DAMEX_MAP]
        if unknown:
            raise ValueError(f"the damex router needs a hand-written dataset -> expert map: set {_KEY} to "
                             f"[[dataset, expert], ...] for every DATASETS.TRAIN dataset (the built-in map covers "
                             f"the UODB training datasets only; not {unknown})")
        table = [UODB_DAMEX_MAP[d] for d in names]
        too_big = sorted({e for e in table if e >= num_experts})
        if too_big:
            raise ValueError(f"DAMEX's UODB map uses experts {too_big}, but MODEL.GEM.NUM_EXPERTS={num_experts}; "
                             f"use 8 experts or set {_KEY}")
        return table
    if all(not isinstance(e, (list, tuple)) for e in entries):
        if len(entries) != len(names):
            raise ValueError(f"{_KEY} has {len(entries)} expert ids but DATASETS.TRAIN has {len(names)} datasets")
        return [_expert_id(e, f"dataset {d!r}", num_experts) for d, e in zip(names, entries)]
    table: Dict[str, int] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"{_KEY}[{i}] = {entry!r}: expected a [dataset name, expert id] pair")
        if entry[0] in table:
            raise ValueError(f"{_KEY} names dataset {entry[0]!r} twice")
        table[entry[0]] = _expert_id(entry[1], f"dataset {entry[0]!r}", num_experts)
    extra = sorted(set(table) - set(names))
    missing = [d for d in names if d not in table]
    if extra or missing:
        raise ValueError(f"{_KEY} must name every DATASETS.TRAIN dataset exactly: missing {missing}, "
                         f"not in DATASETS.TRAIN {extra}")
    return [table[d] for d in names]
