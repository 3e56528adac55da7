"""Resolving the GEM mapping before the model is built: from the config, a checkpoint, or the planner.

``resolve_gem_mapping(cfg, resume, eval_only)`` runs on every rank after ``default_setup``. Rank 0
decides, all ranks receive the same decision (``torch.distributed.broadcast_object_list``), the
config is updated, and rank 0 writes the resolved config to ``OUTPUT_DIR/config.yaml`` atomically
(overwriting the unresolved copy ``default_setup`` wrote), so ``config.yaml`` always reproduces the run.

Decision, in order:
1. The checkpoint that will be loaded (``OUTPUT_DIR/last_checkpoint`` when resuming and present,
   else ``MODEL.WEIGHTS``) carries a ``gem_mapping``:
   - equal to the config's: nothing changes;
   - different and ``MODEL.GEM.LOAD_CHECKPOINT_MAPPING``: the checkpoint's units, mapping, weights,
     expert count and MoE layers replace the config's;
   - the config's mapping is empty and the expert layout agrees: the checkpoint's mapping is taken
     (empty means "not fixed yet"; this is how ``--resume`` and ``--eval-only`` find it);
   - otherwise: :class:`MappingMismatchError` naming both.
2. Otherwise, router ``gem`` with MoE layers and an empty ``MODEL.GEM.MAPPING``: rank 0 runs
   ``gem_d2.planner.plan_from_cfg(cfg, OUTPUT_DIR/plan)`` (plan.yaml, report, heatmap there); an
   error for ``--eval-only``, since a fresh plan would not match any trained experts.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch.distributed as dist
from detectron2.config import CfgNode
from detectron2.utils import comm

from gem_d2.engine.checkpoint import MappingMismatchError, read_checkpoint_mapping
from gem_d2.planner import plan_from_cfg
from gem_d2.planner.ablations import PLANNED_ROUTERS
from gem_d2.planner.mapping import GemMapping
from gem_d2.utils.files import atomic_write_text

__all__ = ["resolve_gem_mapping", "checkpoint_to_load", "needs_planning", "write_config", "PLAN_DIR"]

PLAN_DIR = "plan"  # planner outputs (plan.yaml, plan_report.json, plan_heatmap.png) under OUTPUT_DIR
logger = logging.getLogger(__name__)


def needs_planning(cfg: CfgNode) -> bool:
    """True when a planned router (``gem`` or an ablation, ``PLANNED_ROUTERS``) has MoE layers but an empty mapping."""
    g = cfg.MODEL.GEM
    return str(g.ROUTER) in PLANNED_ROUTERS and len(g.MOE_LAYERS) > 0 and len(g.MAPPING) == 0


def checkpoint_to_load(cfg: CfgNode, resume: bool) -> str:
    """The file ``DefaultTrainer.resume_or_load(resume)`` (or ``--eval-only``) will load; "" if none."""
    if resume:
        tag = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
        if os.path.isfile(tag):
            with open(tag) as f:
                name = f.read().strip()
            if name:
                return os.path.join(cfg.OUTPUT_DIR, name)
    return str(cfg.MODEL.WEIGHTS or "")


def _decide(cfg: CfgNode, resume: bool, eval_only: bool) -> Dict[str, Any]:
    current = GemMapping.from_cfg(cfg)
    path = checkpoint_to_load(cfg, resume)
    found = read_checkpoint_mapping(path) if path else None
    if found is not None:
        diffs = current.diff(found)
        if not diffs:
            return {"mapping": None, "source": f"config (matches {path})"}
        layout_same = current.num_experts == found.num_experts and current.moe_layers == found.moe_layers
        if cfg.MODEL.GEM.LOAD_CHECKPOINT_MAPPING or (current.is_empty and layout_same):
            return {"mapping": found.to_record(), "source": f"checkpoint {path}"}
        raise MappingMismatchError(
            f"The GEM mapping of checkpoint {path} disagrees with the config (config vs checkpoint):\n  "
            + "\n  ".join(diffs) + "\nSet MODEL.GEM.LOAD_CHECKPOINT_MAPPING True to take the checkpoint's mapping, "
            "or use a matching config.")
    if path and cfg.MODEL.GEM.LOAD_CHECKPOINT_MAPPING:
        logger.warning(f"MODEL.GEM.LOAD_CHECKPOINT_MAPPING is set but {path} holds no GEM mapping")
    if not needs_planning(cfg):
        return {"mapping": None, "source": "config"}
    if eval_only:
        raise ValueError(f"--eval-only with MODEL.GEM.ROUTER gem and an empty MODEL.GEM.MAPPING, but MODEL.WEIGHTS="
                         f"{cfg.MODEL.WEIGHTS!r} holds no GEM mapping: pass a gem_d2 checkpoint or set the mapping")
    logger.info("MODEL.GEM.MAPPING is empty: planning the dataset->expert mapping (rank 0)")
    _plan, mapping = plan_from_cfg(cfg, os.path.join(cfg.OUTPUT_DIR, PLAN_DIR))
    return {"mapping": mapping.to_record(), "source": "planner"}


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
    cfg.defrost()
    if decision["mapping"] is not None:
        GemMapping.from_record(decision["mapping"], source=decision["source"]).to_cfg(cfg)
    GemMapping.from_cfg(cfg)  # raises naming the key when the config's mapping is malformed
    if was_frozen:
        cfg.freeze()
    if comm.is_main_process():
        logger.info(f"GEM mapping from {decision['source']}: " + ", ".join(
            f"{u}->{m}" for u, m in zip(cfg.MODEL.GEM.UNITS, cfg.MODEL.GEM.MAPPING)))
        if cfg.OUTPUT_DIR:
            write_config(cfg, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
    return cfg


def write_config(cfg: CfgNode, path: str) -> None:
    """Dump ``cfg`` to ``path`` atomically (yacs YAML, loadable with ``merge_from_file``)."""
    atomic_write_text(path, cfg.dump())
