"""planner: solve times and solution quality of GEM's planner (LP) and compilers (docs/design/planner.md).

Cases:

- structured instances at UODB size (11 x 8), LVIS class level (1203 x 64) and 5000 x 256: affinity
  ``softmax(cos(prototype, key) / 0.1)`` with prototypes scattered around random keys in 32-d, log-normal unit
  loads (sigma 1), slack 0.1, beta 0.5; ``plan_mapping`` end to end with the default compiler, plus every
  compiler on the same LP solution;
- random weighted instances: m in [4, 16), n in [2, 9), w ~ U(0, 1), loads ~ U(0.5, 2), slack 0.1,
  beta 0; per compiler: mean rounded/LP, mean rounded/MILP where the MILP is feasible, how often the MILP is
  infeasible, the largest capacity overflow relative to the largest unit load, and how many MILP-feasible
  instances the compiler leaves over capacity.

Compilers: ``hierarchical`` (docs/design/planner.md steps 1-3 + the repair and improvement passes, the default),
``hierarchical_norepair`` (steps 1-3 only, as the paper prints the algorithm), ``shmoys_tardos`` (the yardstick),
``shmoys_tardos+repair`` (both passes), ``exact`` (the MILP; defined only where it is feasible).

    python tools/benchmark.py planner [--solver CBC] [--seeds 0] [--skip-5000] [--output output/benchmarks/planner.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from benchmarks.common import add_output, write_json

COMPILERS = ("hierarchical", "hierarchical_norepair", "shmoys_tardos", "shmoys_tardos+repair", "exact")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``planner`` subcommand."""
    parser.add_argument("--solver", default="CBC", help="LP/MILP solver: CBC (PuLP) or HIGHS (scipy)")
    parser.add_argument("--large-solvers", default="CBC,HIGHS", help="LP solvers timed on 5000 x 256 (comma list)")
    parser.add_argument("--seeds", default="0", help="seeds of the 50-instance random sets (comma list)")
    parser.add_argument("--instances", type=int, default=50, help="random instances per seed")
    parser.add_argument("--milp-time-limit", type=float, default=20.0,
                        help="seconds for the MILP at 1203 x 64 (0 = skip it there)")
    parser.add_argument("--skip-5000", action="store_true", help="skip the 5000 x 256 case")
    add_output(parser, "planner")


def cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children (CBC runs as a child process)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def structured_instance(m: int, n: int, seed: int = 0):
    """(affinity (m, n), loads (m,)) of the structured cases (see module docstring)."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, 32))
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    protos = keys[rng.integers(0, n, m)] + 0.7 * rng.normal(size=(m, 32)) / np.sqrt(32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    z = protos @ keys.T / 0.1
    w = np.exp(z - z.max(axis=1, keepdims=True))
    return w / w.sum(axis=1, keepdims=True), rng.lognormal(0.0, 1.0, m)


def random_instances(seed: int, count: int):
    """The issue's random weighted instances: list of (affinity, loads)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        m, n = int(rng.integers(4, 16)), int(rng.integers(2, 9))
        out.append((rng.uniform(0, 1, (m, n)), rng.uniform(0.5, 2.0, m)))
    return out


def compile_all(p, x_lp, milp):
    from gem_d2.planner.plan import compile_assignment
    from gem_d2.planner.repair import repair_assignment
    from gem_d2.planner.shmoys_tardos import shmoys_tardos_round

    out = {}
    for name in COMPILERS:
        t0 = time.perf_counter()  # wall time of the compiler alone (numpy/scipy, in process)
        if name == "hierarchical_norepair":
            a = compile_assignment(p, x_lp, "hierarchical", repair=False)
        elif name == "shmoys_tardos+repair":
            a = repair_assignment(p, shmoys_tardos_round(p, x_lp))
        elif name == "exact":
            a = None if milp is None or milp.x is None or milp.status != "optimal" else milp.x
        else:
            a = compile_assignment(p, x_lp, name)
        out[name] = (a, time.perf_counter() - t0)
    return out


def quality(p, a, lp_value, milp_value):
    over = p.overflow(a)
    return {"value": p.value(a), "over_lp": p.value(a) / lp_value,
            "over_milp": None if milp_value is None else p.value(a) / milp_value,
            "max_overflow_over_max_load": float(over.max() / p.loads.max()),
            "total_overflow_over_max_load": float(over.sum() / p.loads.max()),
            "all_assigned": bool(np.array_equal(a.sum(axis=1), p.k)),
            "dead_experts": int((a.sum(axis=0) == 0).sum()) if p.no_dead else 0}


def run_random(seed: int, count: int, solver: str) -> dict:
    """Per-compiler aggregates over one seed's random instances."""
    from gem_d2.planner import build_problem, solve_lp, solve_milp

    rows = {c: [] for c in COMPILERS}
    milp_infeasible = 0
    lp_time = milp_time = 0.0
    for w, s in random_instances(seed, count):
        p = build_problem(w, s, slack=0.1, beta=0.0)
        lp = solve_lp(p, solver)
        milp = solve_milp(p, solver)
        lp_time += lp.seconds
        milp_time += milp.seconds
        feasible = milp.status == "optimal"
        milp_infeasible += milp.status == "infeasible"
        for name, (a, dt) in compile_all(p, lp.x, milp).items():
            if a is None:
                continue
            q = quality(p, a, lp.value, milp.value if feasible else None)
            q.update(seconds=dt, milp_feasible=feasible)
            rows[name].append(q)
    agg = {}
    for name, qs in rows.items():
        feas = [q for q in qs if q["milp_feasible"]]
        agg[name] = {
            "instances": len(qs),
            "mean_rounded_over_lp": float(np.mean([q["over_lp"] for q in qs])),
            "min_rounded_over_lp": float(np.min([q["over_lp"] for q in qs])),
            "mean_rounded_over_milp": float(np.mean([q["over_milp"] for q in feas])) if feas else None,
            "max_overflow_over_max_load": float(np.max([q["max_overflow_over_max_load"] for q in qs])),
            "mean_total_overflow_over_max_load": float(np.mean([q["total_overflow_over_max_load"] for q in qs])),
            "instances_over_capacity": int(sum(q["max_overflow_over_max_load"] > 0 for q in qs)),
            "milp_feasible_left_over_capacity": int(sum(q["max_overflow_over_max_load"] > 0 for q in feas)),
            "all_units_assigned": all(q["all_assigned"] for q in qs),
            "instances_with_dead_experts": int(sum(q["dead_experts"] > 0 for q in qs)),
            "mean_seconds": float(np.mean([q["seconds"] for q in qs])),
        }
    return {"seed": seed, "instances": count, "milp_infeasible": milp_infeasible, "milp_status_counted_by": solver,
            "lp_seconds_total": lp_time, "milp_seconds_total": milp_time, "compilers": agg}


def run_structured(m: int, n: int, solver: str, milp_time_limit: float, lp_solvers=None) -> dict:
    """End-to-end plan_mapping (default compiler) plus every compiler on the same LP solution."""
    from gem_d2.planner import build_problem, plan_mapping, solve_lp, solve_milp

    w, s = structured_instance(m, n)
    res = {"m": m, "n": n, "solver": solver}
    if lp_solvers:
        p = build_problem(w, s, slack=0.1, beta=0.5)
        res["lp_seconds_by_solver"], res["lp_cpu_seconds_by_solver"] = {}, {}
        for sv in lp_solvers:
            t0, c0 = time.perf_counter(), cpu_seconds()
            lp = solve_lp(p, sv)
            secs = res["lp_seconds_by_solver"][sv] = time.perf_counter() - t0
            cpu = res["lp_cpu_seconds_by_solver"][sv] = cpu_seconds() - c0
            print(f"  {m}x{n}: LP with {sv}: {secs:.1f} s wall, {cpu:.1f} s CPU (value {lp.value:.6f})", flush=True)
        x_lp, lp_value = lp.x, lp.value
    else:
        t0, c0 = time.perf_counter(), cpu_seconds()
        plan = plan_mapping(w, s, slack=0.1, beta=0.5, solver=solver, milp=None, milp_time_limit=milp_time_limit)
        res["end_to_end_seconds"] = time.perf_counter() - t0
        res["end_to_end_cpu_seconds"] = cpu_seconds() - c0
        res["end_to_end_times"] = plan.times
        res["milp_status_end_to_end"] = plan.milp_status
        p, x_lp, lp_value = plan.problem, plan.x_lp, plan.lp_value
    milp = None
    if m * n <= 20_000:
        milp = solve_milp(p, solver)
    elif milp_time_limit > 0 and not lp_solvers:
        milp = solve_milp(p, solver, time_limit=milp_time_limit)
    res["milp_status"] = "skipped" if milp is None else milp.status
    res["milp_seconds"] = None if milp is None else milp.seconds
    milp_value = milp.value if milp is not None and milp.status == "optimal" else None
    res["milp_over_lp"] = None if milp_value is None else milp_value / lp_value
    res["lp_fractional_units"] = int(np.sum(np.any((x_lp > 1e-9) & (x_lp < 1 - 1e-9), axis=1)))
    res["compilers"] = {}
    for name, (a, dt) in compile_all(p, x_lp, milp).items():
        if a is None:
            continue
        q = quality(p, a, lp_value, milp_value)
        q["seconds"] = dt
        res["compilers"][name] = q
    return res


def fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def print_random(r: dict) -> None:
    print(f"\nrandom instances, seed {r['seed']}: {r['instances']} instances, MILP infeasible on "
          f"{r['milp_infeasible']} (LP total {r['lp_seconds_total']:.2f} s, "
          f"MILP total {r['milp_seconds_total']:.2f} s)")
    print(f"  {'compiler':<22} {'rnd/LP':>7} {'min':>6} {'rnd/MILP':>8} {'maxover':>7} {'over#':>5} "
          f"{'feas-left':>9} {'dead#':>5} {'all':>4} {'ms':>7}")
    for name, a in r["compilers"].items():
        print(f"  {name:<22} {fmt(a['mean_rounded_over_lp']):>7} {fmt(a['min_rounded_over_lp'], '.3f'):>6} "
              f"{fmt(a['mean_rounded_over_milp']):>8} {a['max_overflow_over_max_load']:>7.3f} "
              f"{a['instances_over_capacity']:>5} {a['milp_feasible_left_over_capacity']:>9} "
              f"{a['instances_with_dead_experts']:>5} {str(a['all_units_assigned']):>4} "
              f"{1e3 * a['mean_seconds']:>7.1f}")


def print_structured(r: dict) -> None:
    head = f"\n{r['m']} x {r['n']} (solver {r['solver']})"
    if "end_to_end_seconds" in r:
        t = r["end_to_end_times"]
        head += (f": plan_mapping end to end {r['end_to_end_seconds']:.2f} s wall, {r['end_to_end_cpu_seconds']:.2f} "
                 f"s CPU (LP {t.get('lp', 0):.2f}, MILP {t.get('milp', 0):.2f}, rounding {t.get('rounding', 0):.2f})")
    print(head)
    print(f"  MILP {r['milp_status']}" + (f" in {r['milp_seconds']:.1f} s" if r["milp_seconds"] else "")
          + f", MILP/LP {fmt(r['milp_over_lp'])}, LP fractional units {r['lp_fractional_units']}")
    for name, q in r["compilers"].items():
        print(f"  {name:<22} rnd/LP {q['over_lp']:.4f} rnd/MILP {fmt(q['over_milp'])} max overflow/max load "
              f"{q['max_overflow_over_max_load']:.3f} total {q['total_overflow_over_max_load']:.3f} dead "
              f"{q['dead_experts']} all {q['all_assigned']} ({q['seconds']:.2f} s)")


def run(args) -> dict:
    """Run every case, print the tables, write JSON to ``args.output``; returns the result dict."""
    import gem_d2  # noqa: F401
    from gem_d2.planner.repair import KICK_BUDGET, PENALTY_SCHEDULE

    result = {"argv": list(sys.argv), "solver": args.solver, "repair_penalty_schedule": list(PENALTY_SCHEDULE),
              "improve_kick_budget": KICK_BUDGET, "structured": [], "random": []}
    for m, n in ((11, 8), (1203, 64)):
        r = run_structured(m, n, args.solver, args.milp_time_limit)
        print_structured(r)
        result["structured"].append(r)
    if not args.skip_5000:
        r = run_structured(5000, 256, args.solver, 0.0, lp_solvers=args.large_solvers.split(","))
        print_structured(r)
        result["structured"].append(r)
    for seed in [int(s) for s in args.seeds.split(",")]:
        r = run_random(seed, args.instances, args.solver)
        print_random(r)
        result["random"].append(r)
    write_json(args.output, result, indent=1, default=float)
    print(f"\nwritten {args.output}")
    return result
