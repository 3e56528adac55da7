"""adapt: few-shot adaptation to a held-out generated domain, GEM vs learned routers (old-domain interference).

    python tools/benchmark.py adapt                     # hold out sketch; gem, topk, damex; K = 1, 5, 10
    python tools/benchmark.py adapt --quick             # tiny model and data (for a smoke run)

1. For each router, train the demo model (``configs/gem_dino_synth_demo.yaml``) on the generated domains
   except ``--holdout`` for ``--iters`` iterations (``tools/train_net.py --resume``; skipped when finished).
2. For each K in ``--shots``, run ``tools/adapt.py`` on the trained model with the held-out domain's
   K-shot subset: gem with ``MODEL.GEM.ADAPT.NEW_EXPERTS`` = ``--new-experts`` (old paths frozen), the learned
   routers fine-tuning their MoE layers and heads, ``--adapt-iters`` iterations each.
3. Collect every test set's VOC07 AP50 before and after into ``adapt_report.json``/``adapt_report.md`` and plot
   ``adapt_report.png`` (new-domain AP50 vs K; largest old-domain |change| vs K).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List

from benchmarks.common import (
    DEMO_CONFIG,
    QUICK_TRAIN_OPTS,
    REPO,
    run_logged,
    synth_damex_opts,
    write_json,
    write_text,
)

ROOT = str(REPO)
CONFIG = os.path.join(ROOT, DEMO_CONFIG)
DOMAINS = ("photo", "cartoon", "medical", "aerial", "sketch")


def add_arguments(parser):
    parser.add_argument("--routers", default="gem,topk,damex", help="comma-separated routers")
    parser.add_argument("--shots", default="1,5,10", help="comma-separated K values")
    parser.add_argument("--holdout", default="sketch", choices=DOMAINS, help="the domain left out of training")
    parser.add_argument("--iters", type=int, default=300, help="training iterations of each base model")
    parser.add_argument("--adapt-iters", type=int, default=60, help="fine-tuning iterations per adaptation")
    parser.add_argument("--adapt-lr", type=float, default=2e-4, help="fine-tuning learning rate")
    parser.add_argument("--new-experts", type=int, default=1, help="experts appended for gem's new unit")
    parser.add_argument("--output-dir", default="output/adapt_study")
    parser.add_argument("--quick", action="store_true", help="tiny model and data, 4 + 4 iterations")
    parser.add_argument("opts", nargs="*", default=[], help="extra KEY VALUE overrides for every run")


def run_tool(cmd: List[str], log: str) -> None:
    """Run one tools/ script in its own process (see :func:`benchmarks.common.run_logged`)."""
    run_logged(cmd, log, f"{' '.join(cmd[:3])} ...")


def run(args) -> dict:
    routers = [r for r in args.routers.split(",") if r]
    shots = [int(k) for k in args.shots.split(",") if k]
    if args.quick:
        args.iters = 4 if args.iters == 300 else args.iters
        args.adapt_iters = 4 if args.adapt_iters == 60 else args.adapt_iters
        if args.output_dir == "output/adapt_study":
            args.output_dir = "output/adapt_study_quick"
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    common = list(QUICK_TRAIN_OPTS) + ["DATASETS.SYNTH.ROOT", os.path.join(out, "synth")] if args.quick else []
    common += list(args.opts)
    keep = [d for d in DOMAINS if d != args.holdout]
    train = "(" + ",".join(f"'synth_{d}_train'" for d in keep) + ",)"
    test = "(" + ",".join(f"'synth_{d}_test'" for d in keep) + ",)"
    # damex trains toward a hand-written map; the K-shot dataset joins the expert of its closest domain
    keep_train = [f"synth_{d}_train" for d in keep]
    from gem_d2.data.fewshot import few_shot_name
    t0 = time.time()
    rows = []
    for router in routers:
        base = os.path.join(out, f"base_{router}")
        if not os.path.isfile(os.path.join(base, "model_final.pth")):
            print(f"[adapt] training {router} on {keep} for {args.iters} iterations ...", flush=True)
            os.makedirs(base, exist_ok=True)
            run_tool([sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--resume",
                      "--config-file", CONFIG, *common,
                      *(synth_damex_opts(keep_train, len(keep)) if router == "damex" else []),
                      "OUTPUT_DIR", base, "MODEL.GEM.ROUTER", router,
                      "MODEL.GEM.NUM_EXPERTS", str(len(keep)), "DATASETS.TRAIN", train, "DATASETS.TEST", test,
                      "SOLVER.MAX_ITER", str(args.iters),
                      "SOLVER.STEPS", f"({int(0.9 * args.iters)},)" if args.iters >= 10 else "()",
                      "SOLVER.CHECKPOINT_PERIOD", str(args.iters), "TEST.EVAL_PERIOD", "0", "SEED", "0"],
                     os.path.join(base, "study_stdout.log"))
        for k in shots:
            adapted = os.path.join(out, f"{router}_{k}shot")
            result_file = os.path.join(adapted, "adapt_result.json")
            few = few_shot_name(f"synth_{args.holdout}_train", k, 0)  # MODEL.GEM.ADAPT.SEED's default
            damex_adapt = synth_damex_opts(keep_train, len(keep), [few]) if router == "damex" else []
            if not os.path.isfile(result_file):
                print(f"[adapt] {router}: {k}-shot adaptation to {args.holdout} ...", flush=True)
                os.makedirs(adapted, exist_ok=True)
                run_tool([sys.executable, os.path.join(ROOT, "tools", "adapt.py"), "--config-file",
                          os.path.join(base, "config.yaml"), "--weights", os.path.join(base, "model_final.pth"),
                          "--new-dataset", f"synth_{args.holdout}_train", "--new-test", f"synth_{args.holdout}_test",
                          "--shots", str(k), "--output-dir", adapted, *common, *damex_adapt,
                          "MODEL.GEM.ADAPT.MAX_ITER", str(args.adapt_iters),
                          "MODEL.GEM.ADAPT.BASE_LR", str(args.adapt_lr),
                          "MODEL.GEM.ADAPT.NEW_EXPERTS", str(args.new_experts if router == "gem" else 0)],
                         os.path.join(adapted, "study_stdout.log"))
            with open(result_file) as f:
                r = json.load(f)
            old = {d: (r["before"][d]["AP50"], r["after"][d]["AP50"]) for d in r["old_test"]}
            rows.append({"router": router, "shots": k, "images": r["images"], "mapping_new": r["mapping"][-1] if
                         router == "gem" else None, "new_before": r["before"][r["new_test"]]["AP50"],
                         "new_after": r["after"][r["new_test"]]["AP50"], "old": old,
                         "old_max_abs_change": max(abs(a - b) for b, a in old.values()),
                         "old_mean_change": sum(a - b for b, a in old.values()) / len(old)})
    report = {"holdout": args.holdout, "routers": routers, "shots": shots, "iters": args.iters,
              "adapt_iters": args.adapt_iters, "adapt_lr": args.adapt_lr, "new_experts": args.new_experts,
              "quick": bool(args.quick), "rows": rows, "minutes": (time.time() - t0) / 60}
    text = markdown(report)
    print(text)
    write_text(os.path.join(out, "adapt_report.md"), text)
    write_json(os.path.join(out, "adapt_report.json"), report, indent=1)
    plot(report, os.path.join(out, "adapt_report.png"))
    print(f"written: {out}/adapt_report.md, adapt_report.json, adapt_report.png")
    return report


def markdown(report: dict) -> str:
    olds = list(report["rows"][0]["old"]) if report["rows"] else []
    short = [d.replace("synth_", "").replace("_test", "") for d in olds]
    lines = [f"Few-shot adaptation to held-out `{report['holdout']}` (base: {report['iters']} iterations on the other "
             f"domains; {report['adapt_iters']} fine-tuning iterations at LR {report['adapt_lr']}; gem appends "
             f"{report['new_experts']} expert(s)). VOC07 AP50, before -> after:", "",
             "| router | K | images | new domain | " + " | ".join(short) + " | old max abs change | old mean change |",
             "|---" * (5 + len(olds) + 1) + "|"]
    for r in report["rows"]:
        cells = [f"{b:.2f} -> {a:.2f}" for b, a in (r["old"][d] for d in olds)]
        lines.append(f"| {r['router']} | {r['shots']} | {r['images']} | {r['new_before']:.2f} -> {r['new_after']:.2f} "
                     f"| " + " | ".join(cells) + f" | {r['old_max_abs_change']:.4f} | {r['old_mean_change']:+.4f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for router in report["routers"]:
        rows = [r for r in report["rows"] if r["router"] == router]
        ks = [r["shots"] for r in rows]
        axes[0].plot(ks, [r["new_after"] for r in rows], marker="o", label=router)
        axes[1].plot(ks, [r["old_max_abs_change"] for r in rows], marker="o", label=router)
    axes[0].set(xlabel="K (shots per class)", ylabel="AP50", title=f"new domain ({report['holdout']}) after")
    axes[1].set(xlabel="K (shots per class)", ylabel="|AP50 change|", title="largest old-domain change")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
