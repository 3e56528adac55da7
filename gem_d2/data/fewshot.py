"""K-shot subsets of a registered dataset, for few-shot adaptation to a new domain (tools/adapt.py).

``few_shot_records(records, num_classes, shots, seed)`` picks, for every class in order, ``shots`` images
that contain it (a seeded shuffle of the images holding the class; images already picked count toward
every class they contain), so each class has at least ``min(shots, images holding it)`` training images;
picked images keep all their boxes. ``register_few_shot(source, shots, seed)`` registers the subset as
``<source>_<K>shot_seed<S>`` with the source's metadata and domain, so the source's test split evaluates
with the same class block. ``register_few_shot_names(names)`` re-registers such names found in a config
(e.g. an adapted model's ``config.yaml`` in a new process).
"""
from __future__ import annotations

import copy
import random
import re
from typing import List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from gem_d2.data.catalog import dataset_domain, require_registered, unregister

__all__ = ["few_shot_records", "few_shot_name", "register_few_shot", "register_few_shot_names"]
_NAME = re.compile(r"^(?P<source>.+)_(?P<shots>\d+)shot_seed(?P<seed>\d+)$")


def few_shot_records(records: Sequence[dict], num_classes: int, shots: int, seed: int = 0) -> List[dict]:
    """The K-shot subset of detectron2 records (deep copies), in the source order.

    Args:
        records: dataset dicts with ``annotations`` (``category_id`` in [0, num_classes)).
        num_classes: classes of the dataset.
        shots: K >= 1 images per class.
        seed: shuffle seed.
    Returns:
        The selected records; a class present in fewer than K images gets all of them.
    """
    if int(shots) != shots or shots < 1:
        raise ValueError(f"shots must be an integer >= 1 (MODEL.GEM.ADAPT.SHOTS / --shots), got {shots!r}")
    rng = random.Random(int(seed))
    holding = [[] for _ in range(num_classes)]
    for i, r in enumerate(records):
        for c in sorted({int(a["category_id"]) for a in r.get("annotations", ()) if not a.get("iscrowd", 0)}):
            if not 0 <= c < num_classes:
                raise ValueError(f"record {r.get('file_name', i)!r} has category_id {c}, outside [0, {num_classes})")
            holding[c].append(i)
    chosen = set()
    for c in range(num_classes):
        have = sum(1 for i in holding[c] if i in chosen)
        candidates = [i for i in holding[c] if i not in chosen]
        rng.shuffle(candidates)
        chosen.update(candidates[: max(0, int(shots) - have)])
    return [copy.deepcopy(records[i]) for i in sorted(chosen)]


def few_shot_name(source: str, shots: int, seed: int) -> str:
    """``<source>_<K>shot_seed<S>``."""
    return f"{source}_{int(shots)}shot_seed{int(seed)}"


def register_few_shot(source: str, shots: int, seed: int = 0) -> str:
    """Register the K-shot subset of dataset ``source`` (same metadata and domain); returns its name."""
    require_registered(source)
    meta = MetadataCatalog.get(source)
    classes = list(meta.thing_classes)
    domain = dataset_domain(source)
    name = few_shot_name(source, shots, seed)

    def load():
        subset = few_shot_records(DatasetCatalog.get(source), len(classes), shots, seed)
        if not subset:
            raise ValueError(f"dataset '{source}' has no annotated image to sample a {shots}-shot subset from")
        for r in subset:
            r["dataset_name"] = name
        return subset

    unregister(name)
    DatasetCatalog.register(name, load)
    keep = {k: v for k, v in meta.as_dict().items() if k not in ("name", "domain", "load_stats")}
    MetadataCatalog.get(name).set(**keep, domain=domain, few_shot_source=source, shots=int(shots),
                                  few_shot_seed=int(seed))
    return name


def register_few_shot_names(names: Sequence[str]) -> List[str]:
    """Register every unregistered ``<source>_<K>shot_seed<S>`` name whose source is registered; returns them."""
    done = []
    registered = set(DatasetCatalog.list())
    for name in names:
        m = _NAME.match(str(name))
        if name in registered or m is None or m.group("source") not in registered:
            continue
        register_few_shot(m.group("source"), int(m.group("shots")), int(m.group("seed")))
        done.append(name)
    return done
