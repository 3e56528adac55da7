"""study: every router trained on the generated domains with the same schedule and seeds, compared.

    python tools/benchmark.py study                       # default: 7 routers x 3 seeds, 300 iterations each
    python tools/benchmark.py study --quick               # tiny model and data, 2 iterations (for the tests)
    python tools/benchmark.py study --routers gem,topk --seeds 0 --iters 40

Each (router, seed) run is ``tools/train_net.py --resume`` in its own process on
``configs/gem_dino_synth_demo.yaml`` (the small DINO of ``make demo``, MoE FFNs in decoder layers 0
and 2, 4 experts for 5 domains) with ``SEED``/``PLANNER.SEED`` = seed, ``MODEL.GEM.ROUTER`` = router
(``dense`` = no MoE layer: the plain FFN), ``SOLVER.MAX_ITER`` = iters and the LR drop at 90%, images
resized to ``--image-size`` (160 px by default, from the generated 256 px, to fit the time budget).
Every router keeps its config defaults (``topk``/``damex`` top-1, ``moepp`` top-2 over 4 FFN + 4
parameter-free experts, ``remoe`` target 1 active expert, ``softmoe`` one slot per expert); ``gem``
plans its mapping first (LP + rounding, in the run's ``plan/``).

A finished run leaves ``run_result.json`` in its folder and is not repeated: an interrupted study
resumes where it stopped (the unfinished run from its last checkpoint). Results per run: per-domain
VOC07 AP50 and COCO AP on ``DATASETS.TEST``, their unweighted averages, the rare domain's
(``medical``) AP50 and AP, and the expert specialisation of every MoE layer: the mutual information
(bits) between the dataset of a token and the expert that processed it, from the training routing
counts (``routing_stats.json``; tokens weighted by their routing share). Written to
``--output-dir``: ``study.json``, ``study.md`` (mean +- std over seeds, and whether GEM beats each
baseline on the average and on the rare domain), ``study_ap50.png`` (bar plot) and
``study_specialisation.png`` (P(expert | dataset) per router and layer, summed over seeds).

Default size: 21 runs of 300 iterations at batch 4 on 160 px images: 58 min on 2 idle CPU cores
(2026-11-23, BENCHMARKS.md "Router study"); the measured time is printed in the table header.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np

from benchmarks.common import DEMO_CONFIG, QUICK_TRAIN_OPTS, REPO, run_logged, write_json, write_text

ROOT = str(REPO)
ROUTERS = ("dense", "gem", "topk", "softmoe", "remoe", "moepp", "damex")
CONFIG = os.path.join(ROOT, DEMO_CONFIG)
RARE = "synth_medical_test"
RESULT_FILE = "run_result.json"


def add_arguments(parser):
    parser.add_argument("--routers", default=",".join(ROUTERS), help="comma-separated router names")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (SEED and PLANNER.SEED)")
    parser.add_argument("--iters", type=int, default=300, help="SOLVER.MAX_ITER of every run")
    parser.add_argument("--image-size", type=int, default=160,
                        help="train and test short side (and max size) in pixels; the generated images are 256")
    parser.add_argument("--config-file", default=CONFIG, help="base config of every run")
    parser.add_argument("--output-dir", default="output/study", help="runs, tables and plots go here")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and data (own synth root under --output-dir), 2 iterations, seeds 0,1")
    parser.add_argument("opts", nargs="*", default=[], help="extra KEY VALUE config overrides for every run")


def parse_list(text: str, name: str, cast=str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise SystemExit(f"study: --{name} is empty")
    try:
        return [cast(t) for t in items]
    except ValueError as e:
        raise SystemExit(f"study: --{name}={text!r}: {e}") from e


def router_opts(router: str) -> List[str]:
    """Config overrides that select ``router`` (dense: no expert layers at all)."""
    if router == "dense":
        return ["MODEL.GEM.ROUTER", "dense", "MODEL.GEM.MOE_LAYERS", "[]"]
    return ["MODEL.GEM.ROUTER", router]


def run_opts(router: str, seed: int, iters: int, out_dir: str, quick_root: Optional[str],
             image_size: int = 160) -> List[str]:
    """Every override of one (router, seed) run."""
    opts = ["OUTPUT_DIR", out_dir, "SEED", str(seed), "MODEL.GEM.PLANNER.SEED", str(seed),
            "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(round(0.9 * iters))},)" if iters >= 10 else "()",
            "SOLVER.CHECKPOINT_PERIOD", str(max(1, iters // 2)), "TEST.EVAL_PERIOD", "0"]
    if quick_root is not None:
        opts += QUICK_TRAIN_OPTS + ["DATASETS.SYNTH.ROOT", quick_root]
    else:
        opts += ["INPUT.MIN_SIZE_TRAIN", f"({image_size},)", "INPUT.MAX_SIZE_TRAIN", str(image_size),
                 "INPUT.MIN_SIZE_TEST", str(image_size), "INPUT.MAX_SIZE_TEST", str(image_size)]
    return opts + router_opts(router)


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


def collect_run(out_dir: str) -> dict:
    """One finished run's metrics from its results.json and routing_stats.json."""
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    per = results["datasets"]
    routing_path = os.path.join(out_dir, "routing_stats.json")
    counts: Dict[str, list] = {}
    if os.path.isfile(routing_path):
        with open(routing_path) as f:
            counts = json.load(f)["tokens_per_dataset_expert"]
    return {
        "ap50": {d: float(m["AP50_voc07"]) for d, m in per.items()},
        "ap": {d: float(m["AP"]) for d, m in per.items()},
        "avg_ap50": float(results["average"]["AP50_voc07"]),
        "avg_ap": float(results["average"]["AP"]),
        "mi_bits": {layer: mutual_information_bits(c) for layer, c in counts.items()},
        "routing_counts": counts,
    }


def run_dir(args, router: str, seed: int) -> str:
    """The OUTPUT_DIR of one run."""
    size = "quick" if args.quick else f"px{args.image_size}"
    return os.path.join(args.output_dir, f"it{args.iters}_{size}", router, f"seed{seed}")


def train_one(router: str, seed: int, args, quick_root: Optional[str]) -> dict:
    """Train + evaluate one (router, seed) in a subprocess (resumable); returns its collected metrics."""
    out_dir = run_dir(args, router, seed)
    done = os.path.join(out_dir, RESULT_FILE)
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--resume", "--config-file",
           args.config_file, *run_opts(router, seed, args.iters, out_dir, quick_root, args.image_size), *args.opts]
    t0 = time.time()
    run_logged(cmd, os.path.join(out_dir, "study_stdout.log"), f"study run {router}/seed{seed}")
    result = collect_run(out_dir)
    result.update(router=router, seed=seed, iters=args.iters, seconds=time.time() - t0, command=cmd)
    write_json(done, result, indent=1)
    return result


def mean_std(values: List[float]):
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarize(runs: List[dict], routers: List[str], seeds: List[int]) -> dict:
    """Mean/std over seeds of every metric, per router, and GEM's verdict against each baseline."""
    by_router = {r: [x for x in runs if x["router"] == r] for r in routers}
    domains = list(runs[0]["ap50"])
    layers = sorted({layer for x in runs for layer in x["mi_bits"]})
    summary = {}
    for r, rs in by_router.items():
        s = {"avg_ap50": mean_std([x["avg_ap50"] for x in rs]), "avg_ap": mean_std([x["avg_ap"] for x in rs]),
             "ap50": {d: mean_std([x["ap50"][d] for x in rs]) for d in domains},
             "ap": {d: mean_std([x["ap"][d] for x in rs]) for d in domains},
             "mi_bits": {layer: mean_std([x["mi_bits"][layer] for x in rs]) for layer in layers
                         if all(layer in x["mi_bits"] for x in rs)},
             "minutes": mean_std([x["seconds"] / 60 for x in rs])}
        summary[r] = s
    verdicts = []
    if "gem" in summary:
        g = summary["gem"]
        rare = RARE if RARE in domains else None
        for r in routers:
            if r == "gem":
                continue
            b = summary[r]
            row = {"baseline": r, "avg": verdict(g["avg_ap50"], b["avg_ap50"],
                                                 paired_differences(by_router, r, lambda x: x["avg_ap50"]))}
            if rare:
                row["rare"] = verdict(g["ap50"][rare], b["ap50"][rare],
                                      paired_differences(by_router, r, lambda x: x["ap50"][rare]))
            verdicts.append(row)
    return {"domains": domains, "layers": layers, "routers": routers, "seeds": seeds, "summary": summary,
            "verdicts": verdicts}


def paired_differences(by_router: Dict[str, List[dict]], baseline: str, metric) -> List[float]:
    """Per-seed differences GEM - baseline of ``metric(run)``, over the seeds both have."""
    gem = {x["seed"]: metric(x) for x in by_router["gem"]}
    base = {x["seed"]: metric(x) for x in by_router[baseline]}
    return [gem[s] - base[s] for s in sorted(gem) if s in base]


def verdict(gem, base, paired: Optional[List[float]] = None) -> dict:
    """GEM vs a baseline on one metric: ``gem``/``base`` are (mean, std) over seeds, ``paired`` the
    per-seed differences GEM - baseline. Returns the word (beats / ties / does not beat), whether the
    difference exceeds the seeds' combined spread, and on how many seeds GEM is ahead."""
    diff = gem[0] - base[0]
    spread = math.hypot(gem[1], base[1])
    word = "beats" if diff > 0 else ("ties" if diff == 0 else "does not beat")
    paired = list(paired or [])
    return {"gem": gem, "baseline": base, "difference": diff, "spread": spread, "word": word,
            "beyond_spread": abs(diff) > spread, "seeds_ahead": sum(d > 0 for d in paired),
            "seeds_compared": len(paired)}


def pm(x) -> str:
    """``(mean, std)`` as "mean ± std" with one decimal."""
    return f"{x[0]:.1f} ± {x[1]:.1f}"


def markdown(study: dict, header: str) -> str:
    domains, layers = study["domains"], study["layers"]
    short = [d.replace("synth_", "").replace("_test", "") + (" (rare)" if d == RARE else "") for d in domains]
    lines = [header, "", f"Per-domain VOC07 AP50, mean ± std over seeds {study['seeds']}:", "",
             "| router | " + " | ".join(short) + " | **average AP50** | average AP | rare AP | "
             + " | ".join(f"MI {layer} (bits)" for layer in layers) + " | min/run |",
             "|---" * (len(domains) + 5 + len(layers)) + "|"]
    for r in study["routers"]:
        s = study["summary"][r]
        mi = [(f"{s['mi_bits'][layer][0]:.2f} ± {s['mi_bits'][layer][1]:.2f}" if layer in s["mi_bits"] else "—")
              for layer in layers]
        rare = pm(s["ap"][RARE]) if RARE in s["ap"] else "—"
        lines.append(f"| {r} | " + " | ".join(pm(s["ap50"][d]) for d in domains)
                     + f" | **{pm(s['avg_ap50'])}** | {pm(s['avg_ap'])} | {rare} | " + " | ".join(mi)
                     + f" | {s['minutes'][0]:.1f} |")
    lines += ["", "Per-domain COCO AP, mean ± std:", "", "| router | " + " | ".join(short) + " |",
              "|---" * (len(domains) + 1) + "|"]
    for r in study["routers"]:
        s = study["summary"][r]
        lines.append(f"| {r} | " + " | ".join(pm(s["ap"][d]) for d in domains) + " |")
    if study["verdicts"]:
        lines += ["", "GEM against each baseline (AP50; 'beyond the spread' = |difference| > the seeds' "
                  "std of the two combined):", ""]
        for v in study["verdicts"]:
            text = f"- vs **{v['baseline']}**: average {verdict_text(v['avg'])}"
            if "rare" in v:
                text += f"; rare domain {verdict_text(v['rare'])}"
            lines.append(text)
    return "\n".join(lines) + "\n"


def verdict_text(v) -> str:
    where = "beyond the spread" if v["beyond_spread"] else "within the spread"
    seeds = f", ahead on {v['seeds_ahead']}/{v['seeds_compared']} seeds" if v.get("seeds_compared") else ""
    return f"GEM {v['word']} it ({pm(v['gem'])} vs {pm(v['baseline'])}, {v['difference']:+.1f}, {where}{seeds})"


def plot(study: dict, runs: List[dict], output_dir: str) -> List[str]:
    """The AP50 bar plot and the specialisation heatmaps; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains, routers = study["domains"], study["routers"]
    cols = domains + ["average"]
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) * max(1, len(routers)) / 3 + 3, 4))
    width = 0.8 / len(routers)
    for i, r in enumerate(routers):
        s = study["summary"][r]
        means = [s["ap50"][d][0] for d in domains] + [s["avg_ap50"][0]]
        stds = [s["ap50"][d][1] for d in domains] + [s["avg_ap50"][1]]
        ax.bar(np.arange(len(cols)) + (i - (len(routers) - 1) / 2) * width, means, width, yerr=stds,
               label=r, capsize=2)
    ax.set_xticks(np.arange(len(cols)))
    ax.set_xticklabels([c.replace("synth_", "").replace("_test", "") for c in cols])
    ax.set_ylabel("VOC07 AP50")
    ax.set_title(f"router study: mean ± std over seeds {study['seeds']}")
    ax.legend(fontsize=7, ncol=min(len(routers), 4))
    fig.tight_layout()
    bars = os.path.join(output_dir, "study_ap50.png")
    fig.savefig(bars, dpi=110)
    plt.close(fig)

    layers = study["layers"]
    moe = [r for r in routers if any(x["routing_counts"] for x in runs if x["router"] == r)]
    paths = [bars]
    if moe and layers:
        fig, axes = plt.subplots(len(moe), len(layers), figsize=(3.2 * len(layers), 2.4 * len(moe)), squeeze=False)
        for i, r in enumerate(moe):
            for j, layer in enumerate(layers):
                tables = [np.asarray(x["routing_counts"][layer]) for x in runs
                          if x["router"] == r and layer in x["routing_counts"]]
                ax = axes[i][j]
                if not tables:
                    ax.axis("off")
                    continue
                c = sum(tables)
                share = c / np.maximum(c.sum(axis=1, keepdims=True), 1e-12)
                ax.imshow(share, vmin=0, vmax=1, cmap="viridis", aspect="auto")
                ax.set_title(f"{r} {layer}: MI {study['summary'][r]['mi_bits'].get(layer, (0, 0))[0]:.2f} b",
                             fontsize=8)
                ax.set_yticks(range(share.shape[0]))
                ax.set_yticklabels([d.replace("synth_", "").replace("_train", "") for d in
                                    train_names(runs, r, share.shape[0])], fontsize=7)
                ax.set_xticks(range(share.shape[1]))
                ax.set_xlabel("expert", fontsize=7)
        fig.tight_layout()
        heat = os.path.join(output_dir, "study_specialisation.png")
        fig.savefig(heat, dpi=110)
        plt.close(fig)
        paths.append(heat)
    return paths


def train_names(runs, router, rows) -> List[str]:
    names = [d.replace("_test", "_train") for d in runs[0]["ap50"]]
    return names[:rows] + [f"dataset{i}" for i in range(len(names), rows)]


def run(args) -> dict:
    routers = parse_list(args.routers, "routers")
    unknown = [r for r in routers if r not in ROUTERS]
    if unknown:
        raise SystemExit(f"study: --routers has unknown {unknown}; expected names from {list(ROUTERS)}")
    seeds = parse_list("0,1" if args.quick and args.seeds == "0,1,2" else args.seeds, "seeds", int)
    if args.quick and args.iters == 300:
        args.iters = 2
    if args.iters < 1:
        raise SystemExit(f"study: --iters={args.iters}: expected >= 1")
    if args.quick and args.output_dir == "output/study":
        args.output_dir = "output/study_quick"
    args.output_dir = os.path.abspath(args.output_dir)
    quick_root = os.path.join(args.output_dir, "synth") if args.quick else None
    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.time()
    runs = []
    for seed in seeds:  # seed-major: after the first pass every router has one result
        for r in routers:
            finished = os.path.isfile(os.path.join(run_dir(args, r, seed), RESULT_FILE))
            print(f"[study] {r} seed {seed}: " + ("finished earlier, reusing its result" if finished else
                  f"training {args.iters} iterations ..."), flush=True)
            runs.append(train_one(r, seed, args, quick_root))
            print(f"[study] {r} seed {seed}: average AP50 {runs[-1]['avg_ap50']:.1f} "
                  f"({runs[-1]['seconds'] / 60:.1f} min)", flush=True)
    study = summarize(runs, routers, seeds)
    study.update(iters=args.iters, quick=bool(args.quick), minutes=(time.time() - t0) / 60,
                 run_minutes=sum(x["seconds"] for x in runs) / 60,
                 config_file=args.config_file, opts=list(args.opts))
    header = (f"Router study: {len(routers)} routers x {len(seeds)} seeds, {args.iters} iterations each "
              f"({os.path.relpath(args.config_file, ROOT)}{', quick' if args.quick else ''}); "
              f"the runs took {study['run_minutes']:.1f} min in total (sum of their own times), "
              f"this invocation {study['minutes']:.1f} min")
    text = markdown(study, header)
    print(text)
    figures = plot(study, runs, args.output_dir)
    study["figures"] = figures
    study["runs"] = [{k: v for k, v in x.items() if k != "routing_counts"} for x in runs]
    write_text(os.path.join(args.output_dir, "study.md"), text)
    write_json(os.path.join(args.output_dir, "study.json"), study, indent=1)
    print(f"written: {args.output_dir}/study.md, study.json, " + ", ".join(os.path.basename(p) for p in figures))
    return study
