"""Plan report: summary dict (-> ``plan_report.json``), a printable table, and the x*/mapping heatmap PNG."""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from gem_d2.planner.affinity import cosine_matrix
from gem_d2.utils.files import atomic_write, atomic_write_text

__all__ = ["plan_summary", "format_plan_table", "affinity_evidence", "save_heatmap", "write_report", "REPORT_JSON",
           "HEATMAP_PNG", "FLAT_COSINE_STD"]

REPORT_JSON = "plan_report.json"
HEATMAP_PNG = "plan_heatmap.png"
FLAT_COSINE_STD = 0.02  # std of the unit-key cosines below which the report calls the features flat
_MAX_LABELLED_UNITS = 60  # beyond this the heatmap's unit axis is unlabelled (names would be unreadable)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else float(a / b)


def plan_summary(plan) -> dict:
    """JSON-serialisable report of an :class:`~gem_d2.planner.plan.ExpertPlan`.

    Keys: sizes and settings, ``lp_value``, ``rounded_value``, ``milp_value`` (None unless solved to optimality),
    ``milp_status``, the ratios ``rounded_over_lp``, ``rounded_over_milp``, ``milp_over_lp``, ``times`` (s),
    ``all_units_assigned``, ``max_overflow_over_max_load`` (largest expert overflow / largest unit load),
    ``dead_experts``, and per expert (load, capacity, overflow, units) and per unit (load, importance, experts,
    weights) tables. Objective values use the LP's importance weights.
    """
    p = plan.problem
    loads = plan.expert_loads
    overflow = plan.overflow
    names = plan.unit_names
    mapping = plan.mapping
    experts = []
    for j in range(p.n):
        experts.append({"expert": j, "load": float(loads[j]), "capacity": float(p.capacities[j]),
                        "utilisation": _ratio(float(loads[j]), float(p.capacities[j])),
                        "overflow": float(overflow[j]),
                        "units": [names[u] for u in range(p.m) if plan.assignment[u, j] > 0.5]})
    units = [{"unit": names[u], "load": float(p.loads[u]), "importance": float(p.importance[u]), "k": int(p.k[u]),
              "experts": mapping[u], "weights": [float(w) for w in plan.weights[u]],
              "lp_experts": {str(j): float(plan.x_lp[u, j]) for j in np.flatnonzero(plan.x_lp[u] > 1e-9)}}
             for u in range(p.m)]
    return {
        "units_count": p.m, "experts_count": p.n, "k": sorted({int(k) for k in p.k}),
        "rounding": plan.rounding, "solver": plan.solver, "no_dead_expert_constraint": bool(p.no_dead),
        "lp_value": float(plan.lp_value), "rounded_value": float(plan.rounded_value),
        "milp_value": None if plan.milp_value is None else float(plan.milp_value), "milp_status": plan.milp_status,
        "rounded_over_lp": _ratio(plan.rounded_value, plan.lp_value),
        "rounded_over_milp": _ratio(plan.rounded_value, plan.milp_value),
        "milp_over_lp": _ratio(plan.milp_value, plan.lp_value),
        "times": {k: float(v) for k, v in plan.times.items()},
        "all_units_assigned": bool(np.array_equal(plan.assignment.sum(axis=1), p.k)),
        "total_overflow": float(overflow.sum()),
        "max_overflow_over_max_load": float(overflow.max() / p.loads.max()),
        "dead_experts": plan.dead_experts,
        "lp_fractional_units": int(np.sum(np.any((plan.x_lp > 1e-9) & (plan.x_lp < 1 - 1e-9), axis=1))),
        "experts": experts, "units": units,
    }


def _fmt(v: Optional[float], spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def format_plan_table(plan, max_units: int = 40) -> str:
    """Printable report: objective values and ratios, per-expert load vs capacity, the mapping (first units)."""
    s = plan_summary(plan)
    lines = [
        f"GEM plan: {s['units_count']} units x {s['experts_count']} experts, k={s['k']}, rounding={s['rounding']}, "
        f"solver={s['solver']}",
        f"  LP bound {_fmt(s['lp_value'])} | rounded {_fmt(s['rounded_value'])} | MILP {_fmt(s['milp_value'])} "
        f"({s['milp_status']})",
        f"  rounded/LP {_fmt(s['rounded_over_lp'])} | rounded/MILP {_fmt(s['rounded_over_milp'])} | "
        f"MILP/LP {_fmt(s['milp_over_lp'])}",
        "  times (s): " + ", ".join(f"{k} {v:.3f}" for k, v in s["times"].items()),
        f"  all units assigned: {s['all_units_assigned']} | total overflow {s['total_overflow']:.4g} | "
        f"max overflow / max unit load {s['max_overflow_over_max_load']:.3f} | dead experts {s['dead_experts']}",
        "",
        f"  {'expert':>6} {'load':>10} {'capacity':>10} {'util':>6} {'overflow':>9}  units",
    ]
    for e in s["experts"]:
        shown = ", ".join(e["units"][:6]) + (f", ... (+{len(e['units']) - 6})" if len(e["units"]) > 6 else "")
        lines.append(f"  {e['expert']:>6} {e['load']:>10.4g} {e['capacity']:>10.4g} {e['utilisation']:>6.2f} "
                     f"{e['overflow']:>9.3g}  {shown}")
    lines += ["", f"  {'unit':<32} {'load':>10} {'a_u':>6}  experts (weights)"]
    for u in s["units"][:max_units]:
        ew = ", ".join(f"{e} ({w:.2f})" for e, w in zip(u["experts"], u["weights"]))
        lines.append(f"  {u['unit'][:32]:<32} {u['load']:>10.4g} {u['importance']:>6.3f}  {ew}")
    if s["units_count"] > max_units:
        lines.append(f"  ... ({s['units_count'] - max_units} more units in {REPORT_JSON})")
    return "\n".join(lines)


def affinity_evidence(affinity) -> dict:
    """Why units share experts: the affinity ``w`` (m, n), the unit-prototype cosines (m, m), the unit-key cosines
    (m, n) and their standard deviation, the softmax temperature, and each affinity row's spread
    (``max_j w_uj - min_j w_uj``).

    ``affinity``: a :class:`~gem_d2.planner.affinity.AffinityResult`. The temperature is scaled by the cosines'
    spread, so the affinity rows look just as decided for a backbone whose features barely differ; the report
    therefore judges flatness on the cosines themselves: a standard deviation under :data:`FLAT_COSINE_STD`
    (a random-init backbone gives ~0.008, the ImageNet MobileNetV2 ~0.19 on the generated domains) means the
    plan follows noise, loads and capacities, not the data.
    """
    w = np.asarray(affinity.affinity, dtype=np.float64)
    proto = cosine_matrix(affinity.prototypes, affinity.prototypes)
    off = proto[~np.eye(len(proto), dtype=bool)] if len(proto) > 1 else np.zeros(0)
    spread = w.max(axis=1) - w.min(axis=1)
    unit_key = cosine_matrix(affinity.prototypes, affinity.keys)
    return {
        "units": list(affinity.unit_names),
        "affinity": np.round(w, 6).tolist(),
        "prototype_cosine": np.round(proto, 6).tolist(),
        "unit_key_cosine": np.round(unit_key, 6).tolist(),
        "unit_key_cosine_std": float(unit_key.std()),
        "temperature": float(affinity.temperature),
        "row_spread": np.round(spread, 6).tolist(),
        "mean_row_spread": float(spread.mean()),
        "prototype_cosine_off_diagonal": {"min": float(off.min()), "max": float(off.max()),
                                          "mean": float(off.mean())} if off.size else None,
        "flat": bool(unit_key.std() < FLAT_COSINE_STD),
    }


def save_heatmap(plan, path: str, evidence: Optional[dict] = None) -> str:
    """Save the plan as a PNG: LP solution x* and the final mapping (units x experts), preceded, when ``evidence``
    (:func:`affinity_evidence`) is given, by the unit-prototype cosines (units x units) and the affinity ``w``.
    Returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = plan.problem
    panels = [(plan.x_lp, f"LP x* (value {plan.lp_value:.3f})", "expert", 0.0),
              (plan.assignment, f"{plan.rounding} mapping (value {plan.rounded_value:.3f})", "expert", 0.0)]
    if evidence is not None:
        panels = [(np.asarray(evidence["prototype_cosine"]), "unit-prototype cosine", "unit", -1.0),
                  (np.asarray(evidence["affinity"]),
                   f"affinity w (T {evidence['temperature']:.3g}, mean row spread {evidence['mean_row_spread']:.2f})",
                   "expert", 0.0)] + panels
    height = min(24.0, max(3.0, 0.22 * p.m + 1.5))
    width = min(32.0, max(8.0, 0.35 * p.n * len(panels) + 2.0 * len(panels)))
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), sharey=True, constrained_layout=True)
    for ax, (mat, title, xlabel, vmin) in zip(axes, panels):
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=vmin, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        if mat.shape[1] <= 64:
            ax.set_xticks(range(mat.shape[1]))
            ax.tick_params(axis="x", labelsize=6 if mat.shape[1] > 16 else 8)
    if p.m <= _MAX_LABELLED_UNITS:
        axes[0].set_yticks(range(p.m))
        axes[0].set_yticklabels(plan.unit_names, fontsize=7)
    axes[0].set_ylabel("unit")
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)
    return path


def write_report(plan, output_dir: str, heatmap: bool = True, affinity=None) -> dict:
    """Write ``plan_report.json`` (and ``plan_heatmap.png``) into ``output_dir`` atomically; with ``affinity`` (an
    :class:`~gem_d2.planner.affinity.AffinityResult`) both carry its :func:`affinity_evidence` (the report under
    ``"evidence"``). Returns {"report": path, "heatmap": path}."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"report": os.path.join(output_dir, REPORT_JSON)}
    summary = plan_summary(plan)
    evidence = None if affinity is None else affinity_evidence(affinity)
    if evidence is not None:
        summary["evidence"] = evidence
    atomic_write_text(paths["report"], json.dumps(summary, indent=1))
    if heatmap:
        paths["heatmap"] = save_heatmap(plan, os.path.join(output_dir, HEATMAP_PNG), evidence)
    return paths
