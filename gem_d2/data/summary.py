"""A text table describing datasets (images, boxes, classes, skipped boxes), for logs and the demo."""
from typing import Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from tabulate import tabulate

from gem_d2.data.catalog import require_registered


def summarize_datasets(names: Sequence[str]) -> str:
    """Load each dataset and return a table: images, boxes, difficult, classes, then what loading changed or skipped.

    The last five come from the load statistics (:class:`~gem_d2.data.voc.VocLoadStats`, VOC and COCO
    readers alike; ``-`` for datasets registered otherwise): boxes dropped for an unknown class (per
    name), clipped to the image, dropped as degenerate (zero/negative size, or empty after clipping),
    dropped for a NaN/inf coordinate, and COCO annotations of an image the file does not list.
    """
    if isinstance(names, str):
        names = [names]
    rows = []
    for name in names:
        require_registered(name)
        records = DatasetCatalog.get(name)
        meta = MetadataCatalog.get(name)
        boxes = sum(len(r.get("annotations", [])) for r in records)
        difficult = sum(int(bool(a.get("difficult", 0))) for r in records for a in r.get("annotations", []))
        stats = meta.get("load_stats")
        if stats is not None and stats.loaded:
            unknown = stats.num_dropped_unknown
            if stats.dropped_unknown:
                unknown = f"{unknown} ({', '.join(f'{k}: {v}' for k, v in sorted(stats.dropped_unknown.items()))})"
            skipped = [unknown, stats.clipped, stats.dropped_degenerate, stats.dropped_nonfinite,
                       stats.dropped_no_image]
        else:
            skipped = ["-"] * 5
        classes = meta.get("thing_classes") or []
        rows.append([name, len(records), boxes, difficult, len(classes), *skipped])
    headers = ["dataset", "images", "boxes", "difficult", "classes", "dropped unknown", "clipped", "dropped degenerate",
               "dropped non-finite", "dropped no image"]
    return tabulate(rows, headers=headers, tablefmt="github")
