"""``plan_from_cfg``: the whole planner from a detectron2 config (affinity -> loads -> LP -> compiler -> files).

Called by the trainer before training when ``MODEL.GEM.MAPPING`` is empty, and by ``tools/plan_experts.py``.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from gem_d2.planner.affinity import AffinityResult, compute_affinity
from gem_d2.planner.mapping import GemMapping
from gem_d2.planner.plan import ROUNDINGS, ExpertPlan, plan_mapping
from gem_d2.planner.report import write_report
from gem_d2.planner.solvers import check_solver

__all__ = ["plan_from_cfg", "dataset_load_shares", "write_prototypes", "PLAN_YAML", "PROTOTYPES_NPZ"]

logger = logging.getLogger(__name__)

PLAN_YAML = "plan.yaml"
PROTOTYPES_NPZ = "plan_prototypes.npz"


def dataset_load_shares(cfg) -> Dict[str, float]:
    """Share of training draws per ``DATASETS.TRAIN`` dataset under the sampler, ``size^T / sum size^T``.

    Uses ``gem_d2.data.dataset_sampling_weights`` (the sampler's own computation, which honours
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``) when available, else the dataset sizes from ``DatasetCatalog``.
    """
    try:
        from gem_d2.data import dataset_sampling_weights
    except ImportError:
        dataset_sampling_weights = None
    if dataset_sampling_weights is not None:
        return {str(k): float(v) for k, v in dataset_sampling_weights(cfg).items()}
    from detectron2.data import DatasetCatalog

    temperature = float(cfg.DATALOADER.DATASET_TEMPERATURE)
    sizes = np.array([len(DatasetCatalog.get(n)) for n in cfg.DATASETS.TRAIN], dtype=np.float64)
    if np.any(sizes == 0):
        raise ValueError(f"DATASETS.TRAIN has an empty dataset: sizes {dict(zip(cfg.DATASETS.TRAIN, sizes))}")
    w = sizes ** temperature
    return {n: float(v) for n, v in zip(cfg.DATASETS.TRAIN, w / w.sum())}


def write_prototypes(path: str, units: Sequence[str], prototypes: np.ndarray, keys: Optional[np.ndarray] = None,
                     extra: Optional[dict] = None) -> str:
    """Save ``units`` (U,) str and ``features`` (U, D) float32 (the format ``MODEL.GEM.PROTOTYPES`` reads), plus
    ``expert_keys`` (n, D) and any ``extra`` arrays, to an .npz; returns the path."""
    arrays = {"units": np.asarray(list(units), dtype=str), "features": np.asarray(prototypes, dtype=np.float32)}
    if keys is not None:
        arrays["expert_keys"] = np.asarray(keys, dtype=np.float32)
    arrays.update(extra or {})
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _check_planner_cfg(cfg) -> None:
    pl = cfg.MODEL.GEM.PLANNER
    if pl.ROUNDING not in ROUNDINGS:
        raise ValueError(f"MODEL.GEM.PLANNER.ROUNDING={pl.ROUNDING!r}; expected one of {ROUNDINGS}")
    if pl.LEVEL not in ("dataset", "class"):
        raise ValueError(f"MODEL.GEM.PLANNER.LEVEL={pl.LEVEL!r}; expected 'dataset' or 'class'")
    check_solver(pl.SOLVER)
    k, n = int(cfg.MODEL.GEM.EXPERTS_PER_UNIT), int(cfg.MODEL.GEM.NUM_EXPERTS)
    if not 1 <= k <= n:
        raise ValueError(f"MODEL.GEM.EXPERTS_PER_UNIT={k} must be in [1, MODEL.GEM.NUM_EXPERTS={n}]")


def plan_from_cfg(cfg, output_dir: Optional[str] = None, affinity: Optional[AffinityResult] = None
                  ) -> Tuple[ExpertPlan, GemMapping, dict]:
    """Plan the unit -> experts mapping for ``cfg`` (DESIGN §1).

    The ``DATASETS.TRAIN`` datasets must be registered. Unit loads are ``s_u`` = the dataset's sampling share
    (:func:`dataset_load_shares`) times, at class level, the class's fraction of the dataset's boxes.

    Args:
        cfg: config with gem_d2's keys (``MODEL.GEM.*``, ``MODEL.GEM.PLANNER.*``).
        output_dir: if given, writes there ``plan.yaml`` (config fragment: MODEL.GEM.NUM_EXPERTS,
            EXPERTS_PER_UNIT, UNITS, MAPPING, MAPPING_WEIGHTS, PROTOTYPES), ``plan_report.json``,
            ``plan_heatmap.png`` and ``plan_prototypes.npz`` (units, features = prototypes, expert_keys,
            affinity, loads).
        affinity: a precomputed :func:`~gem_d2.planner.affinity.compute_affinity` result (skips the backbone).
    Returns:
        ``(plan, mapping, prototypes)``: the :class:`ExpertPlan`, the :class:`GemMapping` (``mapping.to_cfg(cfg)``
        writes it into a config) and ``{"units": [names], "features": (m, C) float32 array}``.
    """
    _check_planner_cfg(cfg)
    pl = cfg.MODEL.GEM.PLANNER
    aff = compute_affinity(cfg) if affinity is None else affinity
    shares = dataset_load_shares(cfg)
    loads = np.array([shares[d] for d in aff.datasets]) * aff.share_in_dataset
    time_limit = float(pl.MILP_TIME_LIMIT)
    plan = plan_mapping(aff.affinity, loads, k=int(cfg.MODEL.GEM.EXPERTS_PER_UNIT), slack=float(pl.SLACK),
                        beta=float(pl.BETA), solver=pl.SOLVER, rounding=pl.ROUNDING, unit_names=aff.unit_names,
                        milp=None if time_limit > 0 else False, milp_time_limit=time_limit if time_limit > 0 else None)
    plan.times["affinity"] = aff.seconds
    mapping = GemMapping.from_plan(plan)
    prototypes = {"units": list(aff.unit_names), "features": aff.prototypes}
    logger.info("GEM planner result:\n" + plan.format_report())
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        npz = write_prototypes(os.path.join(output_dir, PROTOTYPES_NPZ), aff.unit_names, aff.prototypes, aff.keys,
                               {"affinity": aff.affinity, "loads": loads})
        header = (f"GEM expert mapping from gem_d2's planner (rounding={plan.rounding}, solver={plan.solver}, "
                  f"level={pl.LEVEL}).\nMerge into a config that had add_gem_config (cfg.merge_from_file) or name "
                  "this file as _BASE_.")
        mapping.save(os.path.join(output_dir, PLAN_YAML), prototypes=os.path.abspath(npz), header=header)
        write_report(plan, output_dir)
        logger.info(f"GEM plan written to {os.path.join(output_dir, PLAN_YAML)}")
    return plan, mapping, prototypes
