"""Training curves (losses, learning rate, evaluation AP) from detectron2's ``metrics.json``, as a PNG."""
from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from typing import Dict, List, Tuple

__all__ = ["read_metrics", "plot_training_curves"]

# DINO emits one copy of each loss per decoder layer (_0.._4), for the encoder (_enc) and for the
# denoising queries (_dn...); the curves show the final layer's terms and the total.
_AUX_LOSS = re.compile(r"_(\d+|enc|dn.*|interm.*)$")


def read_metrics(path: str) -> Dict[str, List[Tuple[int, float]]]:
    """``key -> [(iteration, value)]`` from a JSON-lines ``metrics.json``, sorted by iteration.

    A resumed run appends to the same file; for a repeated iteration the last line wins. A
    truncated last line (the writer was killed mid-line) is skipped; any other bad line is an error.
    """
    series: Dict[str, Dict[int, float]] = OrderedDict()
    with open(path) as f:
        lines = f.read().splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                continue
            raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from e
        if "iteration" not in record:
            raise ValueError(f"{path}:{lineno}: record without 'iteration'")
        it = int(record["iteration"])
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, {})[it] = float(value)
    return OrderedDict((k, sorted(v.items())) for k, v in series.items())


def _eval_keys(series: Dict[str, list]) -> List[str]:
    # EvalHook flattens {dataset: {"uodb": {metric: v}}} into "dataset/uodb/metric".
    return [k for k in series if k.endswith("/AP50_voc07")]


def plot_training_curves(metrics_path: str, out_path: str) -> str:
    """Plot losses, LR and per-dataset AP50 from ``metrics_path`` into ``out_path`` (atomic); returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(metrics_path)
    losses = [k for k in series if (k == "total_loss" or k.startswith("loss_")) and not _AUX_LOSS.search(k)]
    if not losses:
        raise ValueError(f"{metrics_path}: no loss series (total_loss / loss_*) to plot")
    evals = _eval_keys(series)
    panels = 2 + bool(evals)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for key in losses:
        its, vals = zip(*series[key])
        ax.plot(its, vals, label=key, linewidth=2.0 if key == "total_loss" else 1.0,
                marker="." if len(its) < 30 else None)
    if all(v > 0 for k in losses for _, v in series[k]):
        ax.set_yscale("log")
    ax.set(title="training losses (last decoder layer + total)", xlabel="iteration")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    if "lr" in series:
        its, vals = zip(*series["lr"])
        ax.plot(its, vals, marker="." if len(its) < 30 else None)
    ax.set(title="learning rate", xlabel="iteration")
    if evals:
        ax = axes[0][2]
        for key in evals:
            its, vals = zip(*series[key])
            ax.plot(its, vals, marker="o", label=key.split("/")[0])
        ax.set(title="AP50 (VOC07 11-pt) per dataset", xlabel="iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(out_path))
    root, ext = os.path.splitext(os.path.basename(out_path))
    tmp = os.path.join(directory, f".{root}.tmp{ext}")  # keep the extension: savefig picks the format from it
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out_path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_path
