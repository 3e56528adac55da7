"""``moe_spec_from_cfg``: the MoESpec of a config (which FFNs are expert banks and how they route)."""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Union

from gem_d2.modeling.moe.base import ROUTER_REGISTRY, check_positive_int
from gem_d2.modeling.moe.context import MoESpec

_LAYER = re.compile(r"^(encoder|decoder)\.(\d+)$")


def moe_spec_from_cfg(cfg, dataset_names: Union[Sequence[str], int]) -> Optional[MoESpec]:
    """Read ``MODEL.GEM.*``; None when ``MOE_LAYERS`` is empty.

    dataset_names: DATASETS.TRAIN in order (dataset index = position; it sizes the statistics and
    defines the unified label space for class-level plans); an int n stands for the n datasets of
    ``cfg.DATASETS.TRAIN`` and must equal its length. Router arguments come from the router class's
    ``kwargs_from_cfg``. Errors name the offending key and value.
    """
    g = cfg.MODEL.GEM
    layers = list(g.MOE_LAYERS)
    if not layers:
        return None
    depth = {"encoder": int(cfg.MODEL.DINO.ENC_LAYERS), "decoder": int(cfg.MODEL.DINO.DEC_LAYERS)}
    for name in layers:
        m = _LAYER.match(str(name))
        if m is None:
            raise ValueError(f"MODEL.GEM.MOE_LAYERS entry {name!r}: expected 'encoder.<i>' or 'decoder.<i>'")
        if int(m.group(2)) >= depth[m.group(1)]:
            key = "ENC_LAYERS" if m.group(1) == "encoder" else "DEC_LAYERS"
            raise ValueError(f"MODEL.GEM.MOE_LAYERS entry {name!r}: index must be < MODEL.DINO.{key}="
                             f"{depth[m.group(1)]}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"MODEL.GEM.MOE_LAYERS={layers} repeats a layer")
    num_experts = check_positive_int(g.NUM_EXPERTS, "MODEL.GEM.NUM_EXPERTS")
    if g.ROUTER not in ROUTER_REGISTRY:
        raise KeyError(f"MODEL.GEM.ROUTER={g.ROUTER!r} is not a registered router; registered: "
                       f"{sorted(name for name, _ in ROUTER_REGISTRY)}")
    if isinstance(dataset_names, int):
        if dataset_names != len(cfg.DATASETS.TRAIN):
            raise ValueError(f"moe_spec_from_cfg: {dataset_names} datasets given but DATASETS.TRAIN has "
                             f"{len(cfg.DATASETS.TRAIN)}: {list(cfg.DATASETS.TRAIN)}")
        dataset_names = cfg.DATASETS.TRAIN
    dataset_names: List[str] = list(dataset_names)
    if not dataset_names:
        raise ValueError("moe_spec_from_cfg: dataset_names (DATASETS.TRAIN) is empty")
    kwargs = ROUTER_REGISTRY.get(g.ROUTER).kwargs_from_cfg(cfg, dataset_names)
    return MoESpec(layers=layers, num_experts=num_experts, router=g.ROUTER, router_kwargs=kwargs,
                   num_datasets=len(dataset_names))
