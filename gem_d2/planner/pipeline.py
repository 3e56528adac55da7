"""``plan_from_cfg``: the whole planner from a detectron2 config (affinity -> loads -> LP -> compiler -> files).

Called by the trainer before training when ``MODEL.GEM.MAPPING`` is empty, and by ``tools/plan_experts.py``.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Tuple

import numpy as np

from gem_d2.data.build import dataset_sampling_weights
from gem_d2.planner.ablations import check_router_cfg, plan_variant, planner_variant
from gem_d2.planner.affinity import AffinityResult, affinity_from_prototypes, compute_affinity, cosine_matrix
from gem_d2.planner.extend import expert_keys_from_mapping, plan_new_units
from gem_d2.planner.mapping import GemMapping
from gem_d2.planner.plan import ROUNDINGS, ExpertPlan
from gem_d2.planner.report import FLAT_COSINE_STD, affinity_evidence, write_report
from gem_d2.planner.solvers import check_solver

__all__ = ["plan_from_cfg", "plan_new_unit_from_cfg", "dataset_load_shares", "PLAN_YAML"]

logger = logging.getLogger(__name__)

PLAN_YAML = "plan.yaml"


def dataset_load_shares(cfg) -> Dict[str, float]:
    """Share of training draws per ``DATASETS.TRAIN`` dataset under the sampler, ``size^T / sum size^T``
    (``gem_d2.data.dataset_sampling_weights``, the sampler's own computation)."""
    return {str(k): float(v) for k, v in dataset_sampling_weights(cfg).items()}


def _check_planner_cfg(cfg) -> None:
    pl = cfg.MODEL.GEM.PLANNER
    if pl.ROUNDING not in ROUNDINGS:
        raise ValueError(f"MODEL.GEM.PLANNER.ROUNDING={pl.ROUNDING!r}; expected one of {ROUNDINGS}")
    if pl.LEVEL not in ("dataset", "class"):
        raise ValueError(f"MODEL.GEM.PLANNER.LEVEL={pl.LEVEL!r}; expected 'dataset' or 'class'")
    check_solver(pl.SOLVER)
    check_router_cfg(cfg)
    k, n = int(cfg.MODEL.GEM.EXPERTS_PER_UNIT), int(cfg.MODEL.GEM.NUM_EXPERTS)
    if not 1 <= k <= n:
        raise ValueError(f"MODEL.GEM.EXPERTS_PER_UNIT={k} must be in [1, MODEL.GEM.NUM_EXPERTS={n}]")


def plan_from_cfg(cfg, output_dir: Optional[str] = None, affinity: Optional[AffinityResult] = None
                  ) -> Tuple[ExpertPlan, GemMapping]:
    """Plan the unit -> experts mapping for ``cfg`` (docs/design/planner.md).

    The ``DATASETS.TRAIN`` datasets must be registered. Unit loads are ``s_u`` = the dataset's sampling share
    (:func:`dataset_load_shares`) times, at class level, the class's fraction of the dataset's boxes.

    Args:
        cfg: config with gem_d2's keys (``MODEL.GEM.*``, ``MODEL.GEM.PLANNER.*``).
        output_dir: if given, writes there ``plan.yaml`` (config fragment: MODEL.GEM.NUM_EXPERTS,
            EXPERTS_PER_UNIT, UNITS, MAPPING, MAPPING_WEIGHTS), ``plan_report.json`` and ``plan_heatmap.png``.
        affinity: a precomputed :func:`~gem_d2.planner.affinity.compute_affinity` result (skips the backbone).
    Returns:
        ``(plan, mapping)``: the :class:`ExpertPlan` and the :class:`GemMapping` (``mapping.to_cfg(cfg)`` writes it
        into a config; its ``moe_layers`` are ``MODEL.GEM.MOE_LAYERS``).
    """
    _check_planner_cfg(cfg)
    pl = cfg.MODEL.GEM.PLANNER
    aff = compute_affinity(cfg) if affinity is None else affinity
    shares = dataset_load_shares(cfg)
    loads = np.array([shares[d] for d in aff.datasets]) * aff.share_in_dataset
    time_limit = float(pl.MILP_TIME_LIMIT)
    variant = planner_variant(cfg.MODEL.GEM.ROUTER)  # GEM's plan, or an ablation's (gem_random, gem_inverse, ...)
    plan = plan_variant(variant, aff.affinity, loads, k=int(cfg.MODEL.GEM.EXPERTS_PER_UNIT), slack=float(pl.SLACK),
                        beta=float(pl.BETA), solver=pl.SOLVER, rounding=pl.ROUNDING, unit_names=aff.unit_names,
                        seed=int(pl.SEED), milp=None if time_limit > 0 else False,
                        milp_time_limit=time_limit if time_limit > 0 else None)
    plan.times["affinity"] = aff.seconds
    mapping = GemMapping.from_plan(plan, moe_layers=cfg.MODEL.GEM.MOE_LAYERS)
    logger.info("GEM planner result:\n" + plan.format_report())
    evidence = affinity_evidence(aff)
    logger.info(f"affinity: unit-key cosine std {evidence['unit_key_cosine_std']:.4g} (temperature "
                f"{evidence['temperature']:.4g}), mean row spread {evidence['mean_row_spread']:.3f}, unit-prototype "
                f"cosines (off-diagonal) {evidence['prototype_cosine_off_diagonal']}")
    if evidence["flat"]:
        logger.warning("the backbone's features barely tell the units apart (unit-key cosine std %.4f < %.2f): the "
                       "plan follows noise, loads and capacities. Plan with a pretrained MODEL.WEIGHTS.",
                       evidence["unit_key_cosine_std"], FLAT_COSINE_STD)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        header = (f"GEM expert mapping from gem_d2's planner (router={cfg.MODEL.GEM.ROUTER}, rounding={plan.rounding}, "
                  f"solver={plan.solver}, "
                  f"level={pl.LEVEL}).\nMerge into a config that had add_gem_config (cfg.merge_from_file) or name "
                  "this file as _BASE_.")
        mapping.save(os.path.join(output_dir, PLAN_YAML), header=header)
        write_report(plan, output_dir, affinity=aff)
        logger.info(f"GEM plan written to {os.path.join(output_dir, PLAN_YAML)}")
    return plan, mapping


def plan_new_unit_from_cfg(cfg, new_name: str, num_new: int):
    """Plan the experts of one new dataset-level unit ``new_name`` around ``cfg``'s fixed mapping rows.

    The new unit's prototype (``MODEL.WEIGHTS``' pooled features) is scored against expert keys = mean prototype
    of each expert's old units (``num_new`` appended experts are keyed by the new prototype); the LP uses the
    residual capacities under ``PLANNER.SLACK``. Returns ``(experts, weights, best old expert, summary dict)``.
    """
    g = cfg.MODEL.GEM
    if g.PLANNER.LEVEL != "dataset":
        raise ValueError(f"MODEL.GEM.PLANNER.LEVEL={g.PLANNER.LEVEL!r}: adaptation plans dataset-level units only")
    aff_cfg = cfg.clone()
    aff_cfg.defrost()
    aff_cfg.DATASETS.TRAIN = tuple(cfg.DATASETS.TRAIN) + (new_name,)
    aff = compute_affinity(aff_cfg)
    units = list(g.UNITS)
    index = {u: aff.unit_names.index(u) for u in units + [new_name]}
    protos_old = aff.prototypes[[index[u] for u in units]]
    proto_new = aff.prototypes[index[new_name]]
    n_old = int(g.NUM_EXPERTS)
    keys = expert_keys_from_mapping(protos_old, list(g.MAPPING), n_old + num_new, fill=proto_new)
    w_new = affinity_from_prototypes(proto_new[None], keys, float(g.PLANNER.TAU),
                                     reference_cosines=cosine_matrix(protos_old, keys))
    shares = dataset_load_shares(aff_cfg)
    ext = plan_new_units(w_new, [shares[new_name]], list(g.MAPPING), [shares[u] for u in units],
                         k=int(g.EXPERTS_PER_UNIT), slack=float(g.PLANNER.SLACK), beta=float(g.PLANNER.BETA),
                         num_new_experts=num_new, solver=g.PLANNER.SOLVER,
                         rounding="exact" if g.PLANNER.ROUNDING == "exact" else "hierarchical",
                         unit_names=[new_name])
    best_old = int(np.argmax(w_new[0, :n_old]))
    summary = {"affinity": w_new[0].tolist(), "capacities": ext.capacities.tolist(),
               "fixed_load": ext.fixed_load.tolist(), "experts": ext.experts[0], "lp_value": ext.plan.lp_value,
               "rounded_value": ext.plan.rounded_value}
    return ext.experts[0], ext.weights[0], best_old, summary
