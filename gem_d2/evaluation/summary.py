"""The UODB results table: one row per dataset and their unweighted average (the benchmark score)."""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Any, Mapping, Optional

from gem_d2.evaluation.uodb_evaluator import RESULT_KEY, json_safe
from gem_d2.utils.files import atomic_write_text

# Table columns: metric key -> header naming the metric (docs/design/data.md: always name it).
COLUMNS = OrderedDict([
    ("AP50_voc07", "AP50 (VOC07 11-pt)"),
    ("AP", "AP (COCO)"),
    ("AP50", "AP50 (COCO)"),
    ("AP75", "AP75 (COCO)"),
])


def _metrics_of(dataset: str, value) -> Mapping[str, float]:
    if not isinstance(value, Mapping):
        raise TypeError(f"results[{dataset!r}] must be a mapping of metrics, got {type(value).__name__}")
    inner = value.get(RESULT_KEY, value)  # the evaluator's {"uodb": {...}} or the metrics themselves
    missing = [k for k in COLUMNS if k not in inner]
    if missing:
        raise KeyError(f"results[{dataset!r}] lacks metric(s) {missing}; expected UODBEvaluator output "
                       f"(keys {list(COLUMNS)}, optionally under {RESULT_KEY!r})")
    return inner


def _fmt(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}"


def summarize_results(results: Mapping[str, Mapping], output_dir: Optional[str] = None,
                      source: Optional[Mapping[str, Any]] = None) -> str:
    """Tabulate per-dataset UODB metrics and their unweighted mean over datasets.

    Args:
        results: dataset name -> that dataset's ``UODBEvaluator`` result (``{"uodb": metrics}``)
            or the metrics mapping itself; values in percent.
        output_dir: if given, ``results_table.md`` and ``results.json`` are written there atomically.
        source: where the evaluated weights come from, recorded as ``"source"`` in ``results.json``:
            ``{"iteration": the iteration stored with them, "checkpoint": the file holding them}`` (see
            ``gem_d2.engine.trainer.results_source``); None when unknown.
    Returns:
        The Markdown table (also printed). The average of a column is ``n/a`` when any dataset lacks a
        finite value for it, since a mean over fewer datasets would not be the benchmark score.
    """
    if not results:
        raise ValueError("summarize_results: no datasets given")
    per_dataset = OrderedDict((name, _metrics_of(name, value)) for name, value in results.items())
    average = OrderedDict()
    for key in COLUMNS:
        values = [float(m[key]) for m in per_dataset.values()]
        average[key] = sum(values) / len(values) if all(math.isfinite(v) for v in values) else float("nan")

    lines = [
        "| dataset | " + " | ".join(COLUMNS.values()) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for name, m in per_dataset.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(float(m[k])) for k in COLUMNS) + " |")
    lines.append(f"| **average ({len(per_dataset)} datasets, unweighted)** | "
                 + " | ".join(f"**{_fmt(average[k])}**" for k in COLUMNS) + " |")
    table = "\n".join(lines) + "\n"
    print(table, flush=True)

    if output_dir:
        atomic_write_text(os.path.join(output_dir, "results_table.md"), table)
        payload = {
            "metrics": dict(COLUMNS),
            "average": average,
            "datasets": {name: dict(m) for name, m in per_dataset.items()},
            "source": None if source is None else dict(source),
        }
        atomic_write_text(os.path.join(output_dir, "results.json"), json.dumps(json_safe(payload), indent=2) + "\n")
    return table
