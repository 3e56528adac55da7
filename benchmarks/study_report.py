"""The router study's report: the markdown tables and verdicts, and the figures (see :mod:`benchmarks.study`)."""
from __future__ import annotations

import os
from typing import List

import numpy as np

from benchmarks.study import ABLATIONS, RARE, ROOT


def pm(x, digits: int = 1) -> str:
    """``(mean, std)`` as "mean ± std"."""
    return f"{x[0]:.{digits}f} ± {x[1]:.{digits}f}"


def short(dataset: str) -> str:
    return dataset.replace("synth_", "").replace("_test", "").replace("_train", "")


def verdict_text(v) -> str:
    where = "beyond the spread" if v["beyond_spread"] else "within the spread"
    seeds = f", ahead on {v['seeds_ahead']}/{v['seeds_compared']} seeds" if v.get("seeds_compared") else ""
    paired = v.get("paired_mean_std")
    paired = f", paired difference {pm(paired)}" if paired and v.get("seeds_compared", 0) > 1 else ""
    return (f"GEM {v['word']} it ({pm(v['gem'])} vs {pm(v['baseline'])}, {v['difference']:+.1f}, {where}{seeds}"
            f"{paired})")


def setting_markdown(name: str, part: dict) -> List[str]:
    domains, layers = part["domains"], part["layers"]
    cols = [short(d) + (" (rare)" if d == RARE else "") for d in domains]
    lines = [f"### Setting {name}: {part['title']}", "",
             f"Per-domain VOC07 AP50, mean ± std over seeds {part['seeds']} ({part['run_minutes']:.1f} min of runs); "
             "MI = I(dataset; expert) in bits over the last 10% of the iterations (whole training in study.json); "
             "FFN/token = measured FFN evaluations per token (mean over the MoE layers and the steps):", "",
             "| router | " + " | ".join(cols) + " | **average AP50** | average AP | rare AP | "
             + " | ".join(f"MI {layer}" for layer in layers) + " | FFN/token | s/it | min/run |",
             "|---" * (len(domains) + 7 + len(layers)) + "|"]
    for r in part["routers"]:
        s = part["summary"][r]
        mi = [pm(s["mi_end_bits"][layer], 2) if layer in s["mi_end_bits"] else "—" for layer in layers]
        rare = pm(s["ap"][RARE]) if RARE in s["ap"] else "—"
        ffn = "1 (dense)" if r == "dense" else pm(s["ffn_evals"], 2)
        spi = s["seconds_per_iter"]
        lines.append(f"| {r} | " + " | ".join(pm(s["ap50"][d]) for d in domains)
                     + f" | **{pm(s['avg_ap50'])}** | {pm(s['avg_ap'])} | {rare} | " + " | ".join(mi)
                     + f" | {ffn} | {'—' if np.isnan(spi[0]) else f'{spi[0]:.2f}'} | {s['minutes'][0]:.1f} |")
    lines += ["", "Per-domain COCO AP, mean ± std:", "", "| router | " + " | ".join(cols) + " |",
              "|---" * (len(domains) + 1) + "|"]
    for r in part["routers"]:
        s = part["summary"][r]
        lines.append(f"| {r} | " + " | ".join(pm(s["ap"][d]) for d in domains) + " |")
    for kind, title in (("baseline", "GEM against each baseline"), ("ablation", "GEM against each planner ablation")):
        rows = [v for v in part["verdicts"] if v["kind"] == kind]
        if not rows:
            continue
        lines += ["", f"{title} (AP50, paired by seed; 'beyond the spread' = |difference| > the seeds' std of the "
                  "two combined):", ""]
        for v in rows:
            text = f"- vs **{v['other']}**: average {verdict_text(v['avg'])}"
            if "rare" in v:
                text += f"; rare domain {verdict_text(v['rare'])}"
            if v.get("same_grouping_seeds") is not None:
                text += (f"; its grouping is GEM's on {len(v['same_grouping_seeds'])}/{v['avg']['seeds_compared']} "
                         "seeds")
            lines.append(text)
    return lines


def markdown(study: dict, args) -> str:
    header = (f"Router study: {len(study['routers'])} routers x {len(study['seeds'])} seeds x "
              f"{len(study['settings'])} settings, {study['iters']} iterations each "
              f"({os.path.relpath(study['config_file'], ROOT)}{', quick' if study['quick'] else ''}); the runs took "
              f"{study['run_minutes']:.1f} min in total (sum of their own times), this invocation "
              f"{study['minutes']:.1f} min")
    lines = [header]
    for name, part in study["settings"].items():
        lines += [""] + setting_markdown(name, part)
    return "\n".join(lines) + "\n"


def _bars(ax, part: dict, title: str) -> None:
    domains, routers = part["domains"], part["routers"]
    cols = domains + ["average"]
    width = 0.8 / len(routers)
    for i, r in enumerate(routers):
        s = part["summary"][r]
        means = [s["ap50"][d][0] for d in domains] + [s["avg_ap50"][0]]
        stds = [s["ap50"][d][1] for d in domains] + [s["avg_ap50"][1]]
        ax.bar(np.arange(len(cols)) + (i - (len(routers) - 1) / 2) * width, means, width, yerr=stds, label=r,
               capsize=1.5, hatch="//" if r in ABLATIONS else None)
    ax.set_xticks(np.arange(len(cols)))
    ax.set_xticklabels([short(c) for c in cols])
    ax.set_ylabel("VOC07 AP50")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=min(len(routers), 6))


def _paired(ax, part: dict, title: str) -> None:
    rows = part["verdicts"]
    for i, v in enumerate(rows):
        diffs = v["avg"]["paired"]
        ax.scatter([i] * len(diffs), diffs, s=14, color="C1" if v["kind"] == "ablation" else "C0")
        if diffs:
            ax.plot([i - 0.3, i + 0.3], [np.mean(diffs)] * 2, color="k", lw=1)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([v["other"] for v in rows], rotation=30, fontsize=7)
    ax.set_ylabel("GEM - other, average AP50")
    ax.set_title(title, fontsize=9)


def _heatmaps(part: dict, runs: List[dict], path: str, plt) -> bool:
    layers, routers = part["layers"], part["routers"]
    moe = [r for r in routers if any(x["routing_counts"] for x in runs if x["router"] == r)]
    if not (moe and layers):
        return False
    fig, axes = plt.subplots(len(moe), len(layers), figsize=(3.2 * len(layers), 2.2 * len(moe)), squeeze=False)
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
            mi = part["summary"][r]["mi_bits"].get(layer, (0, 0))[0]
            ax.set_title(f"{r} {layer}: MI {mi:.2f} b", fontsize=8)
            ax.set_yticks(range(share.shape[0]))
            names = [short(d) for d in part["domains"]][: share.shape[0]]
            ax.set_yticklabels(names + [f"dataset{k}" for k in range(len(names), share.shape[0])], fontsize=7)
            ax.set_xticks(range(share.shape[1]))
            ax.set_xlabel("expert", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot(study: dict, runs: List[dict], output_dir: str) -> List[str]:
    """``study_ap50.png`` (per-domain bars per setting), ``study_paired.png`` (GEM - other per seed) and
    ``study_specialisation_<setting>.png`` (P(expert | dataset) per router and layer, summed over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = study["settings"]
    paths = []
    n_routers = max(len(p["routers"]) for p in settings.values())
    fig, axes = plt.subplots(len(settings), 1, figsize=(0.45 * 6 * n_routers / 3 + 4, 3.6 * len(settings)),
                             squeeze=False)
    for ax, (name, part) in zip(axes[:, 0], settings.items()):
        _bars(ax, part, f"{name}: mean ± std over seeds {part['seeds']}")
    fig.tight_layout()
    paths.append(os.path.join(output_dir, "study_ap50.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    if any(p["verdicts"] for p in settings.values()):
        fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 3.6), squeeze=False)
        for ax, (name, part) in zip(axes[0], settings.items()):
            _paired(ax, part, f"{name}: per seed (dots), mean (bar); blue baselines, orange ablations")
        fig.tight_layout()
        paths.append(os.path.join(output_dir, "study_paired.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    for name, part in settings.items():
        path = os.path.join(output_dir, f"study_specialisation_{name}.png")
        if _heatmaps(part, [x for x in runs if x["setting"] == name], path, plt):
            paths.append(path)
    return paths
