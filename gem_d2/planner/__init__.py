"""gem_d2.planner: GEM's planner (affinity -> LP relaxation) and compiler (rounding -> mapping), docs/design/planner.md.

Standalone use on any affinity matrix::

    from gem_d2.planner import plan_mapping
    plan = plan_mapping(affinity, loads, k=1, slack=0.1, beta=0.5)
    plan.mapping, plan.weights, plan.lp_value, plan.rounded_value, plan.milp_value, plan.report()

From a detectron2 config (what the trainer calls): ``plan_from_cfg(cfg, output_dir) -> (plan, mapping)``, the
mapping a :class:`GemMapping` (mapping.py, the one owner of units -> experts -> weights). The LP, rounding and
MILP modules take plain arrays; the affinity and the pipeline read a detectron2 config and backbone.
"""
from gem_d2.planner.affinity import (
    AffinityResult,
    FeatureExtractor,
    affinity_from_features,
    affinity_from_prototypes,
    build_frozen_backbone,
    compute_affinity,
)
from gem_d2.planner.extend import ExtensionPlan, expert_keys_from_mapping, plan_new_units
from gem_d2.planner.kmeans import kmeans
from gem_d2.planner.lp import solve_lp, solve_milp
from gem_d2.planner.mapping import GemMapping
from gem_d2.planner.pipeline import dataset_load_shares, plan_from_cfg
from gem_d2.planner.plan import ROUNDINGS, ExpertPlan, compile_assignment, plan_mapping
from gem_d2.planner.problem import PlanInfeasibleError, PlanProblem, build_problem
from gem_d2.planner.report import format_plan_table, plan_summary, save_heatmap, write_report

__all__ = [
    "ExtensionPlan", "expert_keys_from_mapping", "plan_new_units",
    "AffinityResult", "ExpertPlan", "FeatureExtractor", "GemMapping", "PlanInfeasibleError", "PlanProblem",
    "ROUNDINGS", "affinity_from_features", "affinity_from_prototypes", "build_frozen_backbone", "build_problem",
    "compile_assignment", "compute_affinity", "dataset_load_shares", "format_plan_table", "kmeans", "plan_from_cfg",
    "plan_mapping", "plan_summary", "save_heatmap", "solve_lp", "solve_milp", "write_report",
]
