"""What a gem_d2 checkpoint records about the model it holds, and how that is compared with a config.

Keys next to ``model`` (plain lists, strings and ints, so ``torch.load(weights_only=True)`` reads them):

- ``gem_mapping``: ``GemMapping.to_record()``: units, mapping, weights, ``num_experts``, ``moe_layers``;
- ``gem_router``: ``MODEL.GEM.ROUTER``;
- ``gem_label_space``: ``{"datasets": DATASETS.TRAIN in label-space order, "classes": [class names per
  dataset]}`` (:func:`label_space_record`; only when the config has training datasets).

The MoE layout of a checkpoint is its router with the mapping record's ``num_experts`` and ``moe_layers``
(:func:`checkpoint_layout`). A file without these keys (ImageNet or detectron2 weights, checkpoints of
older gem_d2 versions) is not compared. The comparisons return readable differences, config first:
:func:`label_space_diffs` and :func:`layout_diffs`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from detectron2.config import CfgNode
from detectron2.utils.file_io import PathManager

from gem_d2.planner.mapping import GemMapping
from gem_d2.utils.safe_load import load_torch_file

__all__ = ["MAPPING_KEY", "ROUTER_KEY", "LABEL_SPACE_KEY", "CheckpointLayoutError", "CheckpointRecords",
           "label_space_record", "config_layout", "checkpoint_layout", "label_space_diffs", "class_list_diffs",
           "layout_diffs", "read_checkpoint_records"]

MAPPING_KEY = "gem_mapping"
ROUTER_KEY = "gem_router"
LABEL_SPACE_KEY = "gem_label_space"


class CheckpointLayoutError(ValueError):
    """A checkpoint's label space or router/MoE layout disagrees with the config the model is built from."""


def label_space_record(cfg: CfgNode) -> Optional[Dict[str, list]]:
    """``{"datasets", "classes"}`` of ``UnifiedLabelSpace.from_cfg(cfg)``; None when DATASETS.TRAIN is empty."""
    if not len(cfg.DATASETS.TRAIN):
        return None
    from gem_d2.data import UnifiedLabelSpace

    space = UnifiedLabelSpace.from_cfg(cfg).to_dict()
    return {"datasets": list(space["datasets"]), "classes": [list(c) for c in space["classes"]]}


def config_layout(cfg: CfgNode) -> Dict[str, Any]:
    """The router/MoE layout a model built from ``cfg`` has: ``{"router", "num_experts", "moe_layers"}``."""
    g = cfg.MODEL.GEM
    return {"router": str(g.ROUTER), "num_experts": int(g.NUM_EXPERTS), "moe_layers": [str(n) for n in g.MOE_LAYERS]}


def checkpoint_layout(router: Optional[str], mapping: Optional[GemMapping]) -> Optional[Dict[str, Any]]:
    """The layout a checkpoint records (its ``gem_router`` and mapping record); None when it records none."""
    if not router and mapping is None:
        return None
    layout: Dict[str, Any] = {"router": str(router) if router else None}
    if mapping is not None:
        layout.update(num_experts=int(mapping.num_experts), moe_layers=list(mapping.moe_layers))
    return layout


def layout_diffs(config: Dict[str, Any], checkpoint: Dict[str, Any]) -> List[str]:
    """Differences (``"key: config vs checkpoint"``) in router, expert count and MoE layers.

    Only what both record is compared; with no MoE layer on either side the router and expert count
    do not shape the model and are not compared.
    """
    layers_c, layers_k = list(config.get("moe_layers", [])), checkpoint.get("moe_layers")
    if layers_k is not None and not layers_c and not layers_k:
        return []
    out = []
    if checkpoint.get("router") and config.get("router") and config["router"] != checkpoint["router"]:
        out.append(f"MODEL.GEM.ROUTER: {config.get('router')!r} vs {checkpoint['router']!r}")
    if checkpoint.get("num_experts") is not None and config.get("num_experts") != checkpoint["num_experts"]:
        out.append(f"MODEL.GEM.NUM_EXPERTS: {config.get('num_experts')} vs {checkpoint['num_experts']}")
    if layers_k is not None and layers_c != list(layers_k):
        out.append(f"MODEL.GEM.MOE_LAYERS: {layers_c} vs {list(layers_k)}")
    return out


def class_list_diffs(config: Dict[str, list], checkpoint: Dict[str, list]) -> List[str]:
    """Datasets in both label spaces whose class lists differ (never adopted: the class rows mean other things)."""
    mine = dict(zip(config["datasets"], config["classes"]))
    theirs = dict(zip(checkpoint["datasets"], checkpoint["classes"]))
    return [f"classes of {name}: {list(mine[name])} vs {list(theirs[name])}"
            for name in config["datasets"] if name in theirs and list(mine[name]) != list(theirs[name])]


def label_space_diffs(config: Dict[str, list], checkpoint: Dict[str, list]) -> List[str]:
    """Differences in the dataset order of DATASETS.TRAIN and in class lists (config vs checkpoint)."""
    out = []
    if list(config["datasets"]) != list(checkpoint["datasets"]):
        out.append(f"DATASETS.TRAIN (label-space order): {list(config['datasets'])} vs {list(checkpoint['datasets'])}")
    return out + class_list_diffs(config, checkpoint)


@dataclass
class CheckpointRecords:
    """What one checkpoint file records (None: the file does not record it)."""

    path: str
    mapping: Optional[GemMapping] = None
    router: Optional[str] = None
    label_space: Optional[Dict[str, list]] = None
    iteration: Optional[int] = None

    @property
    def layout(self) -> Optional[Dict[str, Any]]:
        return checkpoint_layout(self.router, self.mapping)


def _label_space_from(value: Any, source: str) -> Optional[Dict[str, list]]:
    if value is None:
        return None
    ok = (isinstance(value, dict) and isinstance(value.get("datasets"), list) and isinstance(value.get("classes"), list)
          and len(value["datasets"]) == len(value["classes"]))
    if not ok:
        raise ValueError(f"{source}: malformed label space record {value!r}: expected {{'datasets': [...], "
                         f"'classes': [[...] per dataset]}}")
    return {"datasets": [str(d) for d in value["datasets"]],
            "classes": [[str(c) for c in cs] for cs in value["classes"]]}


def records_of(data: Any, path: str) -> CheckpointRecords:
    """The records of an already loaded checkpoint dict ``data`` (read from ``path``)."""
    if not isinstance(data, dict):
        return CheckpointRecords(path)
    mapping = data.get(MAPPING_KEY)
    iteration = data.get("iteration")
    return CheckpointRecords(
        path=path,
        mapping=None if mapping is None else GemMapping.from_record(mapping, source=f"{path}[{MAPPING_KEY!r}]"),
        router=str(data[ROUTER_KEY]) if data.get(ROUTER_KEY) else None,
        label_space=_label_space_from(data.get(LABEL_SPACE_KEY), f"{path}[{LABEL_SPACE_KEY!r}]"),
        iteration=int(iteration) if isinstance(iteration, int) else None)


def read_checkpoint_records(path: str) -> CheckpointRecords:
    """The records of checkpoint ``path`` without building a model (memory-mapped, weights-only read).

    Files other than ``.pth``/``.pt`` (detectron2 ``.pkl``, pycls ``.pyth``) record nothing.
    """
    local = PathManager.get_local_path(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"checkpoint {path!r} not found (MODEL.WEIGHTS or OUTPUT_DIR/last_checkpoint)")
    if not local.endswith((".pth", ".pt")):
        return CheckpointRecords(path)
    return records_of(load_torch_file(local, mmap=True), path)
