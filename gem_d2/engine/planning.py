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
Unit prototypes (from the planner or the checkpoint) are written to ``OUTPUT_DIR/unit_prototypes.npz``
and ``MODEL.GEM.PROTOTYPES`` points there when it was empty.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import numpy as np
import torch.distributed as dist
from detectron2.config import CfgNode
from detectron2.utils import comm

from gem_d2.engine.checkpoint import (
    MAPPING_KEY,
    PROTOTYPES_KEY,
    MappingMismatchError,
    atomic_write,
    gem_mapping_from_cfg,
    mapping_differences,
    normalize_prototypes,
    read_checkpoint_gem,
)

__all__ = ["resolve_gem_mapping", "checkpoint_to_load", "needs_planning", "mapping_record_from_planner",
           "validate_mapping", "write_config", "PROTOTYPES_FILE"]

PROTOTYPES_FILE = "unit_prototypes.npz"
PLAN_DIR = "plan"  # planner outputs (plan.yaml, plan_report.json, plan_heatmap.png) under OUTPUT_DIR
logger = logging.getLogger(__name__)


def needs_planning(cfg: CfgNode) -> bool:
    """True when the ``gem`` router has MoE layers but ``MODEL.GEM.MAPPING`` is empty."""
    g = cfg.MODEL.GEM
    return str(g.ROUTER) == "gem" and len(g.MOE_LAYERS) > 0 and len(g.MAPPING) == 0


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


def validate_mapping(record: Dict[str, Any], source: str = "MODEL.GEM") -> None:
    """Check units/mapping/weights agree in length and expert ids are in ``[0, num_experts)``."""
    units, mapping, weights, n = record["units"], record["mapping"], record["mapping_weights"], record["num_experts"]
    if not mapping:
        return
    if len(units) != len(mapping):
        raise ValueError(f"{source}: {len(units)} UNITS {units} but {len(mapping)} MAPPING rows; expected one "
                         "row of expert ids per unit")
    if len(set(units)) != len(units):
        raise ValueError(f"{source}.UNITS={units}: unit names must be unique")
    for unit, experts in zip(units, mapping):
        if not experts or any(not 0 <= e < n for e in experts) or len(set(experts)) != len(experts):
            raise ValueError(f"{source}.MAPPING for unit {unit!r} is {experts}: expected distinct expert ids in "
                             f"[0, NUM_EXPERTS={n})")
    if weights and (len(weights) != len(mapping) or any(len(w) != len(m) for w, m in zip(weights, mapping))):
        raise ValueError(f"{source}.MAPPING_WEIGHTS={weights}: expected one weight per mapped expert "
                         f"(same shape as MAPPING={mapping}) or []")


def mapping_record_from_planner(mapping: Any, cfg: CfgNode) -> Dict[str, Any]:
    """The ``gem_mapping`` record of the planner's mapping object, via the config keys it round-trips into."""
    probe = cfg.clone()
    probe.defrost()
    if hasattr(mapping, "to_cfg"):
        mapping.to_cfg(probe)
    elif hasattr(mapping, "apply_to_cfg"):
        mapping.apply_to_cfg(probe)
    else:
        d = mapping if isinstance(mapping, dict) else {
            "units": getattr(mapping, "units", None), "mapping": getattr(mapping, "mapping", None),
            "mapping_weights": getattr(mapping, "mapping_weights", getattr(mapping, "weights", None))}
        if d.get("units") is None or d.get("mapping") is None:
            raise TypeError(f"planner mapping {type(mapping).__name__}: expected to_cfg(cfg) or units/mapping fields")
        probe.MODEL.GEM.UNITS = [str(u) for u in d["units"]]
        probe.MODEL.GEM.MAPPING = [[int(e) for e in row] for row in d["mapping"]]
        probe.MODEL.GEM.MAPPING_WEIGHTS = [[float(w) for w in row] for row in (d.get("mapping_weights") or [])]
    return gem_mapping_from_cfg(probe)


def _decide(cfg: CfgNode, resume: bool, eval_only: bool) -> Dict[str, Any]:
    current = gem_mapping_from_cfg(cfg)
    path = checkpoint_to_load(cfg, resume)
    found = read_checkpoint_gem(path) if path else {}
    ckpt_mapping = found.get(MAPPING_KEY)
    prototypes = found.get(PROTOTYPES_KEY)
    if ckpt_mapping is not None:
        diffs = mapping_differences(current, ckpt_mapping)
        if not diffs:
            return {"mapping": None, "prototypes": prototypes, "source": f"config (matches {path})"}
        layout_same = (current["num_experts"] == ckpt_mapping["num_experts"]
                       and current["moe_layers"] == ckpt_mapping["moe_layers"])
        if cfg.MODEL.GEM.LOAD_CHECKPOINT_MAPPING or (not current["mapping"] and layout_same):
            return {"mapping": ckpt_mapping, "prototypes": prototypes, "source": f"checkpoint {path}"}
        raise MappingMismatchError(
            f"The GEM mapping of checkpoint {path} disagrees with the config:\n  " + "\n  ".join(diffs)
            + "\nSet MODEL.GEM.LOAD_CHECKPOINT_MAPPING True to take the checkpoint's mapping, "
            "or use a matching config.")
    if path and cfg.MODEL.GEM.LOAD_CHECKPOINT_MAPPING:
        logger.warning(f"MODEL.GEM.LOAD_CHECKPOINT_MAPPING is set but {path} holds no GEM mapping")
    if not needs_planning(cfg):
        return {"mapping": None, "prototypes": prototypes, "source": "config"}
    if eval_only:
        raise ValueError(f"--eval-only with MODEL.GEM.ROUTER gem and an empty MODEL.GEM.MAPPING, but MODEL.WEIGHTS="
                         f"{cfg.MODEL.WEIGHTS!r} holds no GEM mapping: pass a gem_d2 checkpoint or set the mapping")
    from gem_d2.planner import plan_from_cfg

    logger.info("MODEL.GEM.MAPPING is empty: planning the dataset->expert mapping (rank 0)")
    _plan, mapping, planned_prototypes = plan_from_cfg(cfg, os.path.join(cfg.OUTPUT_DIR, PLAN_DIR))
    record = mapping_record_from_planner(mapping, cfg)
    if not record["mapping"]:
        raise RuntimeError("the planner returned an empty mapping")
    return {"mapping": record, "prototypes": normalize_prototypes(planned_prototypes, record["units"]),
            "source": "planner"}


def _broadcast(obj: Any) -> Any:
    if comm.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_gem_mapping(cfg: CfgNode, resume: bool = False, eval_only: bool = False) -> CfgNode:
    """Fix ``MODEL.GEM.UNITS/MAPPING/MAPPING_WEIGHTS`` (and prototypes) before the model is built.

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
        if decision.get("prototypes") is not None:  # plain arrays pickle smaller and anywhere
            decision["prototypes"] = {"units": decision["prototypes"]["units"],
                                      "features": decision["prototypes"]["features"].numpy()}
    decision = _broadcast(decision)
    if "error" in decision:
        if error is not None:
            raise error
        raise RuntimeError(f"GEM mapping resolution failed on rank 0: {decision['error']}")

    was_frozen = cfg.is_frozen()
    cfg.defrost()
    record = decision["mapping"]
    if record is not None:
        g = cfg.MODEL.GEM
        g.UNITS, g.MAPPING, g.MAPPING_WEIGHTS = record["units"], record["mapping"], record["mapping_weights"]
        g.NUM_EXPERTS, g.MOE_LAYERS = record["num_experts"], record["moe_layers"]
    validate_mapping(gem_mapping_from_cfg(cfg))
    prototypes = decision.get("prototypes")
    npz = os.path.join(cfg.OUTPUT_DIR, PROTOTYPES_FILE)
    if prototypes is not None and not cfg.MODEL.GEM.PROTOTYPES:
        if comm.is_main_process():
            units = np.asarray(prototypes["units"], dtype=str)
            atomic_write(npz, lambda f: np.savez(f, units=units, features=prototypes["features"]))
        cfg.MODEL.GEM.PROTOTYPES = npz
    if was_frozen:
        cfg.freeze()
    if comm.is_main_process():
        logger.info(f"GEM mapping from {decision['source']}: " + ", ".join(
            f"{u}->{m}" for u, m in zip(cfg.MODEL.GEM.UNITS, cfg.MODEL.GEM.MAPPING)))
        if cfg.OUTPUT_DIR:
            write_config(cfg, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
    comm.synchronize()  # the other ranks may read unit_prototypes.npz next
    return cfg


def write_config(cfg: CfgNode, path: str) -> None:
    """Dump ``cfg`` to ``path`` atomically (yacs YAML, loadable with ``merge_from_file``)."""
    text = cfg.dump()
    atomic_write(path, lambda f: f.write(text), binary=False)
