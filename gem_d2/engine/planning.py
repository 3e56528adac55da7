"""Resolving the GEM mapping before the model is built: from the config, a checkpoint, or the planner.

``resolve_gem_mapping(cfg, resume, eval_only)`` runs on every rank after ``default_setup``. Rank 0
decides, all ranks receive the same decision (``torch.distributed.broadcast_object_list``), the
config is updated, and rank 0 writes the resolved config to ``OUTPUT_DIR/config.yaml`` atomically
(overwriting the unresolved copy ``default_setup`` wrote), so ``config.yaml`` always reproduces the run.

Decision, in order, against the checkpoint that will be loaded (:func:`checkpoint_to_load`:
``--resume``'s choice of :func:`gem_d2.engine.resume.resume_checkpoint`, else ``MODEL.WEIGHTS``):
1. Label space (the checkpoint's ``gem_label_space``): another DATASETS.TRAIN order (or other datasets)
   is :class:`CheckpointLayoutError` naming both, unless ``MODEL.GEM.ADOPT_CHECKPOINT_LAYOUT``: then
   DATASETS.TRAIN becomes the checkpoint's. Different class lists are always an error.
2. Router/MoE layout (``gem_router`` and the mapping record's ``num_experts``/``moe_layers``): a
   difference is :class:`CheckpointLayoutError`, unless ``ADOPT_CHECKPOINT_LAYOUT`` (the checkpoint's
   ROUTER, NUM_EXPERTS and MOE_LAYERS are taken) or, for expert count and layers only,
   ``LOAD_CHECKPOINT_MAPPING`` (taken with the mapping in step 3).
3. The checkpoint carries a ``gem_mapping``:
   - equal to the config's: nothing changes;
   - different and ``MODEL.GEM.LOAD_CHECKPOINT_MAPPING`` (or ``ADOPT_CHECKPOINT_LAYOUT``): the
     checkpoint's units, mapping, weights, expert count and MoE layers replace the config's;
   - the config's mapping is empty and the expert layout agrees: the checkpoint's mapping is taken
     (empty means "not fixed yet"; this is how ``--resume`` and ``--eval-only`` find it);
   - otherwise: :class:`MappingMismatchError` naming both.
4. Otherwise, router ``gem`` with MoE layers and an empty ``MODEL.GEM.MAPPING``: rank 0 runs
   ``gem_d2.planner.plan_from_cfg(cfg, OUTPUT_DIR/plan)`` (plan.yaml, report, heatmap there); an
   error for ``--eval-only``, since a fresh plan would not match any trained experts.
Files without gem_d2's records (ImageNet or detectron2 weights) skip steps 1-3.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

import torch.distributed as dist
from detectron2.config import CfgNode
from detectron2.utils import comm

from gem_d2.engine.checkpoint import MappingMismatchError
from gem_d2.engine.checkpoint_records import (
    CheckpointLayoutError,
    CheckpointRecords,
    class_list_diffs,
    config_layout,
    label_space_diffs,
    label_space_record,
    layout_diffs,
    read_checkpoint_records,
)
from gem_d2.engine.resume import resume_checkpoint
from gem_d2.planner import plan_from_cfg
from gem_d2.planner.ablations import PLANNED_ROUTERS
from gem_d2.planner.mapping import GemMapping
from gem_d2.utils.files import atomic_write_text

__all__ = ["resolve_gem_mapping", "checkpoint_to_load", "needs_planning", "write_config", "PLAN_DIR",
           "CheckpointLayoutError"]

PLAN_DIR = "plan"  # planner outputs (plan.yaml, plan_report.json, plan_heatmap.png) under OUTPUT_DIR
logger = logging.getLogger(__name__)


def needs_planning(cfg: CfgNode) -> bool:
    """True when a planned router (``gem`` or an ablation, ``PLANNED_ROUTERS``) has MoE layers but an empty mapping."""
    g = cfg.MODEL.GEM
    return str(g.ROUTER) in PLANNED_ROUTERS and len(g.MOE_LAYERS) > 0 and len(g.MAPPING) == 0


def checkpoint_to_load(cfg: CfgNode, resume: bool) -> str:
    """The file ``GemTrainer.resume_or_load(resume)`` (or ``--eval-only``) will load; "" if none.

    With ``resume``: :func:`resume_checkpoint` (OUTPUT_DIR's newest readable checkpoint), as the
    checkpointer decides; ``MODEL.WEIGHTS`` when there is nothing to resume.
    """
    if resume:
        path = resume_checkpoint(cfg.OUTPUT_DIR)
        if path:
            return path
    return str(cfg.MODEL.WEIGHTS or "")


def _adopt_label_space(cfg: CfgNode, found: CheckpointRecords) -> Optional[List[str]]:
    """The DATASETS.TRAIN to take from the checkpoint (None: keep the config's); raises on a real mismatch."""
    current = label_space_record(cfg) if found.label_space is not None else None
    if current is None:
        return None
    diffs = label_space_diffs(current, found.label_space)
    if not diffs:
        return None
    adopt = bool(cfg.MODEL.GEM.ADOPT_CHECKPOINT_LAYOUT)
    if adopt and not class_list_diffs(current, found.label_space):
        trial = cfg.clone()
        trial.defrost()
        trial.DATASETS.TRAIN = tuple(found.label_space["datasets"])
        left = label_space_diffs(label_space_record(trial), found.label_space)
        if not left:
            return list(found.label_space["datasets"])
        diffs = [f"{d} (registered now)" for d in left]
    hint = ("The class lists differ: a model's class rows cannot be adopted for other classes; use the checkpoint's "
            "datasets." if any(d.startswith("classes of") for d in diffs) else
            "Set MODEL.GEM.ADOPT_CHECKPOINT_LAYOUT True to take the checkpoint's DATASETS.TRAIN order.")
    raise CheckpointLayoutError(
        f"The label space of checkpoint {found.path} disagrees with the config (config vs checkpoint):\n  "
        + "\n  ".join(diffs) + f"\n{hint}")


def _adopt_layout(cfg: CfgNode, found: CheckpointRecords) -> Optional[Dict[str, Any]]:
    """The router/MoE layout to take from the checkpoint (None: keep the config's); raises on a mismatch."""
    layout = found.layout
    diffs = layout_diffs(config_layout(cfg), layout) if layout is not None else []
    if not diffs:
        return None
    if cfg.MODEL.GEM.ADOPT_CHECKPOINT_LAYOUT:
        return {k: v for k, v in layout.items() if v is not None}
    if cfg.MODEL.GEM.LOAD_CHECKPOINT_MAPPING and not any(d.startswith("MODEL.GEM.ROUTER") for d in diffs):
        return None  # expert count and layers come with the checkpoint's mapping
    raise CheckpointLayoutError(
        f"The router/MoE layout of checkpoint {found.path} disagrees with the config (config vs checkpoint):\n  "
        + "\n  ".join(diffs) + "\nIts MoE weights would not fit the model (they would stay randomly initialised). "
        "Set MODEL.GEM.ADOPT_CHECKPOINT_LAYOUT True to build the model as the checkpoint records it, or use the "
        "checkpoint's config.")


def _decide(cfg: CfgNode, resume: bool, eval_only: bool) -> Dict[str, Any]:
    path = checkpoint_to_load(cfg, resume)
    records = read_checkpoint_records(path) if path else CheckpointRecords("")
    decision: Dict[str, Any] = {"train": _adopt_label_space(cfg, records), "layout": _adopt_layout(cfg, records)}
    work = _apply(cfg.clone(), decision)
    current = GemMapping.from_cfg(work)
    found = records.mapping
    g = cfg.MODEL.GEM
    if found is not None:
        diffs = current.diff(found)
        if not diffs:
            return dict(decision, mapping=None, source=f"config (matches {path})")
        layout_same = current.num_experts == found.num_experts and current.moe_layers == found.moe_layers
        if g.LOAD_CHECKPOINT_MAPPING or g.ADOPT_CHECKPOINT_LAYOUT or (current.is_empty and layout_same):
            return dict(decision, mapping=found.to_record(), source=f"checkpoint {path}")
        raise MappingMismatchError(
            f"The GEM mapping of checkpoint {path} disagrees with the config (config vs checkpoint):\n  "
            + "\n  ".join(diffs) + "\nSet MODEL.GEM.LOAD_CHECKPOINT_MAPPING True to take the checkpoint's mapping, "
            "or use a matching config.")
    if path and (g.LOAD_CHECKPOINT_MAPPING or g.ADOPT_CHECKPOINT_LAYOUT):
        logger.warning(f"MODEL.GEM.LOAD_CHECKPOINT_MAPPING/ADOPT_CHECKPOINT_LAYOUT is set but {path} holds no GEM "
                       f"mapping")
    if not needs_planning(work):
        return dict(decision, mapping=None, source="config")
    if eval_only:
        raise ValueError(f"--eval-only with MODEL.GEM.ROUTER gem and an empty MODEL.GEM.MAPPING, but MODEL.WEIGHTS="
                         f"{cfg.MODEL.WEIGHTS!r} holds no GEM mapping: pass a gem_d2 checkpoint or set the mapping")
    logger.info("MODEL.GEM.MAPPING is empty: planning the dataset->expert mapping (rank 0)")
    _plan, mapping = plan_from_cfg(work, os.path.join(cfg.OUTPUT_DIR, PLAN_DIR))
    return dict(decision, mapping=mapping.to_record(), source="planner")


def _apply(cfg: CfgNode, decision: Dict[str, Any]) -> CfgNode:
    """Write the adopted DATASETS.TRAIN, layout and mapping of ``decision`` into ``cfg`` (must be mutable)."""
    cfg.defrost()
    if decision.get("train") is not None:
        cfg.DATASETS.TRAIN = tuple(decision["train"])
    layout = decision.get("layout")
    if layout is not None:
        g = cfg.MODEL.GEM
        g.ROUTER = layout.get("router", g.ROUTER)
        g.NUM_EXPERTS = layout.get("num_experts", g.NUM_EXPERTS)
        g.MOE_LAYERS = list(layout.get("moe_layers", g.MOE_LAYERS))
    if decision.get("mapping") is not None:
        GemMapping.from_record(decision["mapping"], source=decision["source"]).to_cfg(cfg)
    return cfg


def _broadcast(obj: Any) -> Any:
    if comm.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_gem_mapping(cfg: CfgNode, resume: bool = False, eval_only: bool = False) -> CfgNode:
    """Fix ``MODEL.GEM.UNITS/MAPPING/MAPPING_WEIGHTS`` before the model is built.

    Call on every rank (collective). Returns ``cfg``, updated in place (frozen state preserved).
    Raises the same error on every rank when rank 0's decision fails, instead of leaving the
    others waiting in the broadcast.
    """
    decision: Optional[Dict[str, Any]] = None
    error: Optional[BaseException] = None
    if comm.is_main_process():
        try:
            decision = _decide(cfg, resume, eval_only)
        except Exception as e:  # noqa: BLE001 - re-raised below after telling the other ranks
            error = e
            decision = {"error": f"{type(e).__name__}: {e}"}
    decision = _broadcast(decision)
    if "error" in decision:
        if error is not None:
            raise error
        raise RuntimeError(f"GEM mapping resolution failed on rank 0: {decision['error']}")

    was_frozen = cfg.is_frozen()
    _apply(cfg, decision)
    GemMapping.from_cfg(cfg)  # raises naming the key when the config's mapping is malformed
    if was_frozen:
        cfg.freeze()
    if comm.is_main_process():
        if decision.get("train") is not None:
            logger.info(f"DATASETS.TRAIN from the checkpoint (label-space order): {decision['train']}")
        if decision.get("layout") is not None:
            logger.info(f"Router/MoE layout from the checkpoint: {decision['layout']}")
        logger.info(f"GEM mapping from {decision['source']}: " + ", ".join(
            f"{u}->{m}" for u, m in zip(cfg.MODEL.GEM.UNITS, cfg.MODEL.GEM.MAPPING)))
        if cfg.OUTPUT_DIR:
            write_config(cfg, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
    return cfg


def write_config(cfg: CfgNode, path: str) -> None:
    """Dump ``cfg`` to ``path`` atomically (yacs YAML, loadable with ``merge_from_file``)."""
    atomic_write_text(path, cfg.dump())
