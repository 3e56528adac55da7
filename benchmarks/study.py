"""study: does the plan matter? Every router and every GEM planner ablation, trained on the generated domains with
the same schedule and seeds, in two settings, compared seed by seed.

    python tools/benchmark.py study                        # default: 2 settings x 12 routers x 3 seeds, ~2 h
    python tools/benchmark.py study --quick                # tiny model and data, 2 iterations, seeds 0,1, 6 routers
    python tools/benchmark.py study --settings 5on2 --routers gem,gem_random,topk --seeds 0 --iters 40

Settings (``--settings``; the five generated domains, ``medical`` the rare one, ~6% of the training images):

- ``5on2``: 5 domains on 2 experts per MoE layer. Capacity allows two large domains (+ the rare one) per expert, so
  there are 12 capacity-respecting mappings (6 up to renaming the experts): which domains share an expert is the
  plan's decision, and the ablations differ.
- ``5on4``: 5 domains on 4 experts, the demo's layout: every capacity-respecting mapping gives each large domain its
  own expert, so a plan only decides which one the rare domain joins.

Routers (``--routers``): the baselines ``dense`` (no MoE layer: the plain FFN), ``gem``, ``topk``, ``softmoe``,
``remoe``, ``moepp``, ``damex`` and the planner ablations ``gem_random``, ``gem_inverse``, ``gem_worst``,
``gem_k2``, ``gem_nocap`` (``gem``'s dispatch with another mapping, gem_d2/planner/ablations.py). Experts start
exchangeable, so what a mapping decides is its grouping (which domains share an expert); the report says on how
many seeds each ablation's grouping is GEM's (``gem_inverse``'s is whenever there are 2 experts). Compute-matched:
every sparse router is set to at most one FFN evaluation per token on average (:data:`COMPUTE_MATCHED`: topk and moepp
top-1, remoe's target of 1 active expert with a per-layer-call cap of 1 computed expert per token, softmoe one
slot per expert); ``gem_k2`` is the exception by definition (2 experts per token). The measured FFN evaluations
per token of every run (the expert banks' counter, ``routing/<layer>/ffn_evals_per_token`` in ``metrics.json``,
its mean over the training steps) are in the table. ``damex`` trains its gate toward a hand-written map
(``benchmarks.common.synth_damex_map``).

Each (setting, router, seed) run is ``tools/train_net.py --resume`` in its own process on ``--config-file``
(default ``configs/gem_dino_synth_demo.yaml``: the small DINO on the ImageNet MobileNetV2, MoE FFNs in decoder
layers 0 and 2) with ``SEED``/``PLANNER.SEED`` = seed, ``SOLVER.MAX_ITER`` = ``--iters`` (LR drop at 90%), images
resized to ``--image-size``. Planned routers plan their mapping first (in the run's ``plan/``). A finished run
leaves ``run_result.json`` and is not repeated: an interrupted study resumes where it stopped.

Results per run: per-domain VOC07 AP50 and COCO AP, their unweighted averages, the rare domain's, the mutual
information (bits) between a token's dataset and its expert per MoE layer (over the whole training from
``routing_stats.json``, and over the last 10% of the iterations from the logged per-dataset shares), the FFN
evaluations per token, the seconds per iteration. Written to ``--output-dir``: ``study.json``, ``study.md`` (per
setting: mean +- std over seeds, and GEM against every baseline and every ablation, paired by seed), and the
figures ``study_ap50.png``, ``study_paired.png``, ``study_specialisation_<setting>.png``.

Default size: 2 settings x 12 routers x 3 seeds = 72 runs of ``DEFAULT_ITERS`` (160) iterations, estimated at ~100 s
per run on 2 idle cores (~20 s of start-up, planning and evaluation, ~0.5 s per iteration), ~2.0 h in all
(BENCHMARKS.md "Router study": how it was estimated); each run prints its seconds per iteration.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from typing import Dict, List, Optional

import numpy as np

from benchmarks.common import (
    DEMO_CONFIG,
    QUICK_TRAIN_OPTS,
    REPO,
    read_metrics,
    run_logged,
    step_weighted_mean,
    synth_damex_opts,
    write_json,
    write_text,
)

ROOT = str(REPO)
BASELINES = ("dense", "gem", "topk", "softmoe", "remoe", "moepp", "damex")
ABLATIONS = ("gem_random", "gem_inverse", "gem_worst", "gem_k2", "gem_nocap")
ROUTERS = BASELINES + ABLATIONS
# --quick's default: one router of each kind the study handles differently (no MoE layer, the planned mapping,
# a hand-written map, a capped learned gate, a planned ablation, two experts per unit)
QUICK_ROUTERS = ("gem", "dense", "damex", "remoe", "gem_random", "gem_k2")
SETTINGS = {
    "5on2": {"experts": 2, "title": "5 domains on 2 experts: the plan decides which domains share an expert"},
    "5on4": {"experts": 4, "title": "5 domains on 4 experts (the demo's layout): the plan only places the rare domain"},
}
CONFIG = os.path.join(ROOT, DEMO_CONFIG)
RARE = "synth_medical_test"
RESULT_FILE = "run_result.json"
DEFAULT_ITERS = 160
FFN_STAT = "ffn_evals_per_token"
# at most one FFN evaluation per token for every sparse router (gem_k2 excepted: two experts per unit)
COMPUTE_MATCHED = ["MODEL.GEM.TOPK.K", "1", "MODEL.GEM.MOEPP.K", "1", "MODEL.GEM.REMOE.TARGET_K", "1",
                   "MODEL.GEM.REMOE.ACTIVE_CAP", "1.0", "MODEL.GEM.SOFTMOE.SLOTS_PER_EXPERT", "1"]
END_FRACTION = 0.1  # "MI end": the last 10% of the iterations


def add_arguments(parser):
    parser.add_argument("--routers", default="", help=f"comma-separated router names (default: all; with --quick "
                                                      f"{','.join(QUICK_ROUTERS)})")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {list(SETTINGS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (SEED and PLANNER.SEED)")
    parser.add_argument("--iters", type=int, default=DEFAULT_ITERS, help="SOLVER.MAX_ITER of every run")
    parser.add_argument("--image-size", type=int, default=160,
                        help="train and test short side (and max size) in pixels; the generated images are 256")
    parser.add_argument("--config-file", default=CONFIG, help="base config of every run")
    parser.add_argument("--output-dir", default="output/study", help="runs, tables and plots go here")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and data (own synth root under --output-dir), 2 iterations, seeds 0,1, "
                             "one router of each kind, 2 runs at a time")
    parser.add_argument("--jobs", type=int, default=0,
                        help="runs at a time (default 1, 2 with --quick, whose runs are mostly start-up; full runs "
                             "use both cores each, and their times are only comparable one at a time)")
    parser.add_argument("opts", nargs="*", default=[], help="extra KEY VALUE config overrides for every run")


def parse_list(text: str, name: str, cast=str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise SystemExit(f"study: --{name} is empty")
    try:
        return [cast(t) for t in items]
    except ValueError as e:
        raise SystemExit(f"study: --{name}={text!r}: {e}") from e


def train_datasets() -> List[str]:
    from gem_d2.data.synthetic import train_dataset_names

    return train_dataset_names()


def router_opts(router: str, num_experts: int) -> List[str]:
    """Config overrides that select ``router`` compute-matched (dense: no expert layers at all)."""
    if router == "dense":
        return ["MODEL.GEM.ROUTER", "dense", "MODEL.GEM.MOE_LAYERS", "[]"]
    opts = ["MODEL.GEM.ROUTER", router] + COMPUTE_MATCHED
    if router == "gem_k2":
        opts += ["MODEL.GEM.EXPERTS_PER_UNIT", "2"]
    if router == "damex":
        opts += synth_damex_opts(train_datasets(), num_experts)
    return opts


def run_opts(router: str, seed: int, iters: int, out_dir: str, quick_root: Optional[str], image_size: int = 160,
             setting: str = "5on2") -> List[str]:
    """Every override of one (setting, router, seed) run."""
    experts = SETTINGS[setting]["experts"]
    opts = ["OUTPUT_DIR", out_dir, "SEED", str(seed), "MODEL.GEM.PLANNER.SEED", str(seed),
            "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(round(0.9 * iters))},)" if iters >= 10 else "()",
            "SOLVER.CHECKPOINT_PERIOD", str(max(1, iters // 2) if iters >= 10 else iters), "TEST.EVAL_PERIOD", "0",
            "MODEL.GEM.NUM_EXPERTS", str(experts)]
    if quick_root is not None:
        opts += QUICK_TRAIN_OPTS + ["DATASETS.SYNTH.ROOT", quick_root]
    else:
        opts += ["INPUT.MIN_SIZE_TRAIN", f"({image_size},)", "INPUT.MAX_SIZE_TRAIN", str(image_size),
                 "INPUT.MIN_SIZE_TEST", str(image_size), "INPUT.MAX_SIZE_TEST", str(image_size)]
    return opts + router_opts(router, experts)


def mutual_information_bits(counts) -> float:
    """I(dataset; expert) in bits of a (datasets, experts) table of non-negative token counts."""
    p = np.asarray(counts, dtype=np.float64)
    if p.ndim != 2 or (p < 0).any():
        raise ValueError(f"routing counts must be a non-negative 2-D table, got shape {p.shape}")
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p / total
    pd, pe = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / (pd @ pe)[nz])).sum())


def ffn_evals_from_metrics(records: List[dict]) -> Dict[str, float]:
    """Per MoE layer, the FFN evaluations per token the expert-bank counter logged, averaged over training steps."""
    layers = sorted({k[len("routing/"):-len(FFN_STAT) - 1] for r in records for k in r
                     if k.startswith("routing/") and k.endswith("/" + FFN_STAT)})
    return {layer: step_weighted_mean(records, f"routing/{layer}/{FFN_STAT}") for layer in layers}


def end_mutual_information(records: List[dict], counts: Dict[str, list], datasets: List[str],
                           fraction: float = END_FRACTION) -> Dict[str, float]:
    """Per layer, I(dataset; expert) at the end of training: P(expert | dataset) = the mean of the logged shares
    (``routing/<layer>/<dataset>/expert<j>``) over the records logged in the last ``fraction`` of the iterations
    (at least the last one), P(dataset) from the whole run's counts."""
    if not records:
        return {}
    last = int(records[-1]["iteration"])
    tail = [r for r in records if int(r["iteration"]) >= last + 1 - max(1, int(fraction * (last + 1)))]
    out = {}
    for layer, table in counts.items():
        table = np.asarray(table, dtype=np.float64)
        p_d = table.sum(axis=1) / max(table.sum(), 1e-12)
        rows = np.zeros_like(table)
        for d, name in enumerate(datasets[: table.shape[0]]):
            shares = [[r.get(f"routing/{layer}/{name}/expert{j}", 0.0) for j in range(table.shape[1])] for r in tail
                      if any(k.startswith(f"routing/{layer}/{name}/") for k in r)]
            if shares:
                rows[d] = np.mean(shares, axis=0)
        out[layer] = mutual_information_bits(rows * p_d[:, None])
    return out


def grouping(config_path: str) -> Optional[List[List[str]]]:
    """The units sharing each expert in a run's resolved mapping (sorted; independent of the experts' names), or
    None when the run has no planned mapping."""
    import yaml

    if not os.path.isfile(config_path):
        return None
    with open(config_path) as f:
        g = (yaml.safe_load(f) or {}).get("MODEL", {}).get("GEM", {})
    if not g.get("MAPPING") or not g.get("MOE_LAYERS"):
        return None
    members = [sorted(u for u, row in zip(g["UNITS"], g["MAPPING"]) if e in row) for e in range(int(g["NUM_EXPERTS"]))]
    return sorted(members)


def collect_run(out_dir: str) -> dict:
    """One finished run's metrics from its results.json, routing_stats.json and metrics.json."""
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    per = results["datasets"]
    counts: Dict[str, list] = {}
    datasets: List[str] = []
    routing_path = os.path.join(out_dir, "routing_stats.json")
    if os.path.isfile(routing_path):
        with open(routing_path) as f:
            routing = json.load(f)
        counts, datasets = routing["tokens_per_dataset_expert"], routing["datasets"]
    records = read_metrics(os.path.join(out_dir, "metrics.json"))
    ffn = ffn_evals_from_metrics(records)
    times = [float(r["time"]) for r in records if "time" in r]
    return {
        "ap50": {d: float(m["AP50_voc07"]) for d, m in per.items()},
        "ap": {d: float(m["AP"]) for d, m in per.items()},
        "avg_ap50": float(results["average"]["AP50_voc07"]),
        "avg_ap": float(results["average"]["AP"]),
        "mi_bits": {layer: mutual_information_bits(c) for layer, c in counts.items()},
        "mi_end_bits": end_mutual_information(records, counts, datasets),
        "ffn_evals_per_token": ffn,
        "ffn_evals": float(np.mean(list(ffn.values()))) if ffn else 1.0,  # dense: one FFN per token, by definition
        "seconds_per_iter": float(np.median(times)) if times else None,
        "grouping": grouping(os.path.join(out_dir, "config.yaml")),
        "routing_counts": counts,
    }


def run_dir(args, setting: str, router: str, seed: int) -> str:
    """The OUTPUT_DIR of one run."""
    size = "quick" if args.quick else f"px{args.image_size}"
    return os.path.join(args.output_dir, setting, f"it{args.iters}_{size}", router, f"seed{seed}")


def train_one(setting: str, router: str, seed: int, args, quick_root: Optional[str]) -> dict:
    """Train + evaluate one run in a subprocess (resumable); returns its collected metrics."""
    out_dir = run_dir(args, setting, router, seed)
    done = os.path.join(out_dir, RESULT_FILE)
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--resume", "--config-file", args.config_file,
           *run_opts(router, seed, args.iters, out_dir, quick_root, args.image_size, setting), *args.opts]
    t0, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    run_logged(cmd, os.path.join(out_dir, "study_stdout.log"), f"study run {setting}/{router}/seed{seed}")
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = collect_run(out_dir)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)  # children's CPU: exact with one job
    result.update(setting=setting, router=router, seed=seed, iters=args.iters, seconds=time.time() - t0,
                  cpu_seconds=cpu if args.jobs == 1 else None, load_average=list(os.getloadavg()), command=cmd)
    write_json(done, result, indent=1)
    return result


def mean_std(values: List[float]):
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return (float("nan"), 0.0)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def paired_differences(by_router: Dict[str, List[dict]], other: str, metric) -> List[float]:
    """Per-seed differences GEM - ``other`` of ``metric(run)``, over the seeds both have."""
    gem = {x["seed"]: metric(x) for x in by_router["gem"]}
    base = {x["seed"]: metric(x) for x in by_router[other]}
    return [gem[s] - base[s] for s in sorted(gem) if s in base]


def verdict(gem, base, paired: Optional[List[float]] = None) -> dict:
    """GEM vs another router on one metric: ``gem``/``base`` are (mean, std) over seeds, ``paired`` the
    per-seed differences GEM - other. Returns the word (beats / ties / does not beat), whether the
    difference exceeds the seeds' combined spread, on how many seeds GEM is ahead, and the mean and std of
    the paired differences."""
    diff = gem[0] - base[0]
    spread = math.hypot(gem[1], base[1])
    word = "beats" if diff > 0 else ("ties" if diff == 0 else "does not beat")
    paired = list(paired or [])
    return {"gem": gem, "baseline": base, "difference": diff, "spread": spread, "word": word,
            "beyond_spread": abs(diff) > spread, "seeds_ahead": sum(d > 0 for d in paired),
            "seeds_compared": len(paired), "paired": paired, "paired_mean_std": mean_std(paired) if paired else None}


def summarize(runs: List[dict], routers: List[str], seeds: List[int]) -> dict:
    """One setting: mean/std over seeds of every metric, per router, and GEM's paired verdict against every
    baseline and every ablation (average AP50 and the rare domain's AP50)."""
    by_router = {r: [x for x in runs if x["router"] == r] for r in routers}
    domains = list(runs[0]["ap50"])
    layers = sorted({layer for x in runs for layer in x["mi_bits"]})
    summary = {}
    for r, rs in by_router.items():
        summary[r] = {
            "avg_ap50": mean_std([x["avg_ap50"] for x in rs]), "avg_ap": mean_std([x["avg_ap"] for x in rs]),
            "ap50": {d: mean_std([x["ap50"][d] for x in rs]) for d in domains},
            "ap": {d: mean_std([x["ap"][d] for x in rs]) for d in domains},
            "mi_bits": {layer: mean_std([x["mi_bits"][layer] for x in rs]) for layer in layers
                        if all(layer in x["mi_bits"] for x in rs)},
            "mi_end_bits": {layer: mean_std([x["mi_end_bits"][layer] for x in rs]) for layer in layers
                            if all(layer in x.get("mi_end_bits", {}) for x in rs)},
            "ffn_evals": mean_std([x["ffn_evals"] for x in rs]),
            "seconds_per_iter": mean_std([x.get("seconds_per_iter") for x in rs]),
            "minutes": mean_std([x["seconds"] / 60 for x in rs])}
    verdicts = []
    if "gem" in summary:
        g = summary["gem"]
        rare = RARE if RARE in domains else None
        for r in routers:
            if r == "gem":
                continue
            same = [x["seed"] for x in by_router[r] for y in by_router["gem"]
                    if x["seed"] == y["seed"] and x.get("grouping") and x.get("grouping") == y.get("grouping")]
            row = {"other": r, "kind": "ablation" if r in ABLATIONS else "baseline",
                   "same_grouping_seeds": same if r in ABLATIONS else None,
                   "avg": verdict(g["avg_ap50"], summary[r]["avg_ap50"],
                                  paired_differences(by_router, r, lambda x: x["avg_ap50"]))}
            if rare:
                row["rare"] = verdict(g["ap50"][rare], summary[r]["ap50"][rare],
                                      paired_differences(by_router, r, lambda x: x["ap50"][rare]))
            verdicts.append(row)
    return {"domains": domains, "layers": layers, "routers": routers, "seeds": seeds, "summary": summary,
            "verdicts": verdicts}


def run(args) -> dict:
    from benchmarks.study_report import markdown, plot

    routers = parse_list(args.routers or ",".join(QUICK_ROUTERS if args.quick else ROUTERS), "routers")
    unknown = [r for r in routers if r not in ROUTERS]
    if unknown:
        raise SystemExit(f"study: --routers has unknown {unknown}; expected names from {list(ROUTERS)}")
    settings = parse_list(args.settings, "settings")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"study: --settings has unknown {unknown}; expected names from {list(SETTINGS)}")
    seeds = parse_list("0,1" if args.quick and args.seeds == "0,1,2" else args.seeds, "seeds", int)
    if args.quick and args.iters == DEFAULT_ITERS:
        args.iters = 2
    if args.iters < 1:
        raise SystemExit(f"study: --iters={args.iters}: expected >= 1")
    if args.quick and args.output_dir == "output/study":
        args.output_dir = "output/study_quick"
    args.output_dir = os.path.abspath(args.output_dir)
    quick_root = os.path.join(args.output_dir, "synth") if args.quick else None
    os.makedirs(args.output_dir, exist_ok=True)
    args.jobs = args.jobs or (2 if args.quick else 1)
    t0 = time.time()
    # setting-major, then seed-major: after the first pass of a setting every router has one result
    todo = [(setting, seed, r) for setting in settings for seed in seeds for r in routers]

    def one(job):
        setting, seed, r = job
        finished = os.path.isfile(os.path.join(run_dir(args, setting, r, seed), RESULT_FILE))
        print(f"[study] {setting} {r} seed {seed}: " + ("finished earlier, reusing its result" if finished
              else f"training {args.iters} iterations ..."), flush=True)
        x = train_one(setting, r, seed, args, quick_root)
        spi = x.get("seconds_per_iter")
        print(f"[study] {setting} {r} seed {seed}: average AP50 {x['avg_ap50']:.1f}, FFN evals/token "
              f"{x['ffn_evals']:.2f} ({x['seconds'] / 60:.1f} min" + (f", {spi:.2f} s/it" if spi else "") + ")",
              flush=True)
        return x

    if args.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        from gem_d2.data.synthetic import ensure_synthetic
        from gem_d2.engine.setup import build_cfg

        data_opts = (QUICK_TRAIN_OPTS + ["DATASETS.SYNTH.ROOT", quick_root]) if quick_root else []
        ensure_synthetic(build_cfg(args.config_file, data_opts + list(args.opts)))  # once, before parallel runs

        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(one, todo))
    else:
        runs = [one(job) for job in todo]
    study = {"settings": {}, "routers": routers, "seeds": seeds, "iters": args.iters, "quick": bool(args.quick),
             "config_file": args.config_file, "opts": list(args.opts)}
    for setting in settings:
        part = summarize([x for x in runs if x["setting"] == setting], routers, seeds)
        part.update(SETTINGS[setting], run_minutes=sum(x["seconds"] for x in runs if x["setting"] == setting) / 60)
        study["settings"][setting] = part
    study.update(minutes=(time.time() - t0) / 60, run_minutes=sum(x["seconds"] for x in runs) / 60)
    text = markdown(study, args)
    print(text)
    study["figures"] = plot(study, runs, args.output_dir)
    study["runs"] = [{k: v for k, v in x.items() if k != "routing_counts"} for x in runs]
    write_text(os.path.join(args.output_dir, "study.md"), text)
    write_json(os.path.join(args.output_dir, "study.json"), study, indent=1)
    print(f"written: {args.output_dir}/study.md, study.json, "
          + ", ".join(os.path.basename(p) for p in study["figures"]))
    return study
