"""Text tables for the end of a run: images / boxes / classes per split, what was dropped, check problems."""
from typing import List, Sequence

from gem_d2.data.uodb import UODB_DATASETS
from gem_d2.prepare.records import DatasetReport

MAX_PROBLEMS_SHOWN = 20
MAX_CLASSES_SHOWN = 6


def format_reports(reports: Sequence[DatasetReport], status: Sequence[str] = ()) -> str:
    """One row per (dataset, split): images, boxes, difficult boxes, classes present / total, status."""
    rows = [("dataset", "split", "images", "boxes", "difficult", "classes", "status")]
    for i, r in enumerate(reports):
        n_classes = len(UODB_DATASETS[r.key].classes)
        state = status[i] if i < len(status) else ("up to date (skipped)" if r.skipped else "converted")
        for split, st in r.splits.items():
            present = sum(1 for v in st.classes.values() if v > 0)
            rows.append((r.key, split, str(st.images), str(st.boxes), str(st.difficult), f"{present}/{n_classes}",
                         state))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if 2 <= c <= 5 else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             .rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in reports:
        if r.dropped:
            items = ", ".join(f"{reason}: {n}" for reason, n in sorted(r.dropped.items()))
            lines.append(f"{r.key} dropped: {items}")
        for split, st in r.splits.items():
            absent = [c for c in UODB_DATASETS[r.key].classes if st.classes.get(c, 0) == 0]
            if absent and st.images:
                shown = ", ".join(absent[:MAX_CLASSES_SHOWN])
                more = f" and {len(absent) - MAX_CLASSES_SHOWN} more" if len(absent) > MAX_CLASSES_SHOWN else ""
                lines.append(f"{r.key} {split}: no box of {len(absent)} class(es): {shown}{more}")
    return "\n".join(lines)


def format_problems(key: str, problems: List[str], limit: int = MAX_PROBLEMS_SHOWN) -> str:
    """The first ``limit`` problems of a dataset, then how many more there are."""
    lines = [f"{key}: {len(problems)} problem(s)"] + [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
