"""eval: gem_d2's UODBEvaluator vs detectron2's PascalVOCDetectionEvaluator on the same detections.

Writes a seeded VOC tree (Annotations/*.xml, ImageSets/Main/test.txt) and seeded detections
(jittered copies of the objects plus random boxes; coordinates on a 0.5 px grid and scores on a
1/1000 grid, so detectron2's %.1f / %.3f text files lose nothing), then times:

- ours: ``UODBEvaluator`` construction (ground truth from DatasetCatalog) + process + evaluate,
  i.e. VOC07 11-point AP50 *and* COCO AP/AP50/AP75 (pycocotools); and with ``compute_coco=False``;
- detectron2: ``PascalVOCDetectionEvaluator`` construction + process + evaluate (AP at IoU
  0.50:0.95, 10 ``voc_eval`` runs per class), cold (parsing the XML) and warm (its parse cache
  filled); and detectron2's ``voc_eval`` at IoU 0.5 alone (the strictest like-for-like).

detectron2 is given the boxes with x2 + 1, y2 + 1 (see gem_d2/evaluation/uodb_evaluator.py: that
is what makes its AP50 the UODB protocol for gem_d2's loader convention); the two AP50 must be equal.

    python tools/benchmark.py eval [--images 500 --classes 20 --dets-per-image 100]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.common import add_output, machine_context, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``eval`` subcommand."""
    parser.add_argument("--images", type=int, default=500, help="images in the generated split")
    parser.add_argument("--classes", type=int, default=20, help="classes of the generated dataset")
    parser.add_argument("--dets-per-image", type=int, default=100, help="detections per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each evaluator (the minimum is kept)")
    add_output(parser, "eval")


def generate(root: Path, rng, num_images: int, num_classes: int, dets_per_image: int):
    """Write the VOC tree; return (records in gem_d2's frame, per-image detections)."""
    import numpy as np

    classes = [f"class{c:02d}" for c in range(num_classes)]
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    ids = [f"{i:06d}" for i in range(num_images)]
    (root / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i}\n" for i in ids))
    records, dets = [], {}
    for image_id in ids:
        ann = ET.Element("annotation")
        objs = []
        for _ in range(rng.integers(1, 9)):
            x1, y1 = (int(v) for v in rng.integers(1, 400, size=2))
            x2, y2 = x1 + int(rng.integers(10, 200)), y1 + int(rng.integers(10, 200))
            c, difficult = int(rng.integers(num_classes)), int(rng.random() < 0.1)
            obj = ET.SubElement(ann, "object")
            for tag, v in (("name", classes[c]), ("pose", "Unspecified"), ("truncated", 0), ("difficult", difficult)):
                ET.SubElement(obj, tag).text = str(v)
            bb = ET.SubElement(obj, "bndbox")
            for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
                ET.SubElement(bb, tag).text = str(v)
            objs.append(([x1 - 1, y1 - 1, x2 - 1, y2 - 1], c, difficult))  # the UODB loader's -1 on all four
        ET.ElementTree(ann).write(root / "Annotations" / f"{image_id}.xml")
        records.append({"image_id": image_id, "file_name": f"{image_id}.jpg", "height": 600, "width": 600,
                        "annotations": [{"bbox": b, "bbox_mode": 0, "category_id": c, "difficult": d}
                                        for b, c, d in objs]})
        # About a third: jittered copies of objects (true class 80% of the time); the rest random.
        n_near = min(dets_per_image, len(objs) * int(rng.integers(2, 6)))
        src = rng.integers(0, len(objs), size=n_near)
        near = np.array([objs[k][0] for k in src], float) + rng.integers(-16, 17, size=(n_near, 4)) / 2
        near_cls = np.where(rng.random(n_near) < 0.8, [objs[k][1] for k in src], rng.integers(num_classes, size=n_near))
        n_far = dets_per_image - n_near
        xy = rng.integers(0, 500, size=(n_far, 2)).astype(float)
        far = np.hstack([xy, xy + rng.integers(10, 150, size=(n_far, 2)) + 0.5])
        boxes = np.vstack([near, far])
        scores = np.concatenate([rng.integers(500, 1000, n_near), rng.integers(1, 700, n_far)]) / 1000
        dets[image_id] = (boxes, scores, np.concatenate([near_cls, rng.integers(num_classes, size=n_far)]))
    return classes, records, dets


def detector_outputs(dets, shift):
    """(input, output) pairs for an evaluator's ``process``: the detections as Instances, boxes + ``shift``."""
    import numpy as np
    import torch
    from detectron2.structures import Boxes, Instances

    out = []
    for image_id, (boxes, scores, classes) in dets.items():
        inst = Instances((600, 600))
        inst.pred_boxes = Boxes(torch.as_tensor(boxes + np.array(shift), dtype=torch.float32))
        inst.scores = torch.as_tensor(scores, dtype=torch.float32)
        inst.pred_classes = torch.as_tensor(classes, dtype=torch.int64)
        out.append(({"image_id": image_id, "height": 600, "width": 600}, {"instances": inst}))
    return out


def evaluate(make, pairs):
    """Construct an evaluator, feed it every image, return its results."""
    ev = make()
    ev.reset()
    for inp, out in pairs:
        ev.process([inp], [out])
    return ev.evaluate()


def measure(fn, repeats):
    """``(min wall s, min CPU s, result)`` of ``fn()`` over ``repeats`` runs. CPU time (this process,
    all threads) is the figure to compare on a shared machine: other processes do not inflate it."""
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu, result


def d2_voc_eval_ap50(name, pairs):
    """detectron2's own evaluate() loop restricted to IoU 0.5 (same files, same voc_eval); its AP50."""
    import numpy as np
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.evaluation.pascal_voc_evaluation import voc_eval

    ev = PascalVOCDetectionEvaluator(name)
    ev.reset()
    for inp, out in pairs:
        ev.process([inp], [out])
    with tempfile.TemporaryDirectory() as tmp:
        aps = []
        for cls_id, cls_name in enumerate(ev._class_names):
            with open(os.path.join(tmp, f"{cls_name}.txt"), "w") as f:
                f.write("\n".join(ev._predictions.get(cls_id, [""])))
            _, _, ap = voc_eval(os.path.join(tmp, "{}.txt"), ev._anno_file_template, ev._image_set_path, cls_name,
                                ovthresh=0.5, use_07_metric=True)
            aps.append(ap * 100)
    return float(np.mean(aps))


def machine_info() -> dict:
    """Date, machine, library versions (numpy and pycocotools too) and the command line."""
    from importlib.metadata import version

    import numpy

    info = machine_context()
    info["versions"] += f", numpy {numpy.__version__}, pycocotools {version('pycocotools')}"
    return info


def run(args) -> dict:
    """Generate, time both evaluators, print the table, write ``args.output``; returns the JSON dict."""
    import numpy as np

    import gem_d2  # noqa: F401  (compat shims before detectron2)

    # isort: split
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    from gem_d2.evaluation import UODBEvaluator

    rng = np.random.default_rng(args.seed)
    name = f"bench_eval_{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        t0 = time.perf_counter()
        classes, records, dets = generate(Path(tmp), rng, args.images, args.classes, args.dets_per_image)
        gen_s = time.perf_counter() - t0
        DatasetCatalog.register(name, lambda: records)
        MetadataCatalog.get(name).set(thing_classes=classes, dirname=tmp, split="test", year=2007)
        try:
            ours_pairs, d2_pairs = detector_outputs(dets, [0, 0, 0, 0]), detector_outputs(dets, [0, 0, 1, 1])
            r = args.repeats
            t = {}  # label -> (wall, cpu)
            *t["ours_total"], ours = measure(
                lambda: evaluate(lambda: UODBEvaluator(name, distributed=False), ours_pairs), r)
            *t["ours_voc07_only"], voc_only = measure(
                lambda: evaluate(lambda: UODBEvaluator(name, distributed=False, compute_coco=False), ours_pairs), r)
            *t["d2_cold"], _ = measure(lambda: evaluate(lambda: PascalVOCDetectionEvaluator(name), d2_pairs), 1)
            *t["d2_warm"], d2 = measure(lambda: evaluate(lambda: PascalVOCDetectionEvaluator(name), d2_pairs), r)
            *t["d2_iou50_only"], d2_ap50_only = measure(lambda: d2_voc_eval_ap50(name, d2_pairs), r)
        finally:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)

    n_dets = sum(len(s) for _, s, _ in dets.values())
    ours, d2_ap50 = ours["uodb"], float(d2["bbox"]["AP50"])
    equal = ours["AP50_voc07"] == voc_only["uodb"]["AP50_voc07"] == d2_ap50 == d2_ap50_only

    def speedup(theirs, mine):
        return {"wall": t[theirs][0] / t[mine][0], "cpu": t[theirs][1] / t[mine][1]}

    result = {
        **machine_info(),
        "setup": {"images": args.images, "classes": args.classes, "detections": n_dets,
                  "objects": sum(len(r["annotations"]) for r in records), "seed": args.seed,
                  "repeats": args.repeats, "generate_s": gen_s},
        "seconds": {k: {"wall": w, "cpu": c} for k, (w, c) in t.items()},
        "speedup": {"d2_warm_vs_ours_total": speedup("d2_warm", "ours_total"),
                    "d2_cold_vs_ours_total": speedup("d2_cold", "ours_total"),
                    "d2_warm_vs_ours_voc07_only": speedup("d2_warm", "ours_voc07_only"),
                    "d2_iou50_only_vs_ours_voc07_only": speedup("d2_iou50_only", "ours_voc07_only")},
        "AP50": {"ours_AP50_voc07": ours["AP50_voc07"], "d2_AP50": d2_ap50,
                 "d2_voc_eval_iou50_only": d2_ap50_only, "equal": bool(equal)},
        "ours_coco": {k: ours[k] for k in ("AP", "AP50", "AP75")},
    }
    labels = {
        "ours_total": "gem_d2 UODBEvaluator: VOC07 AP50 + COCO AP/AP50/AP75 (pycocotools)",
        "ours_voc07_only": "gem_d2 UODBEvaluator: VOC07 AP50 only (compute_coco=False)",
        "d2_cold": "detectron2 PascalVOCDetectionEvaluator, cold (parses the XML)",
        "d2_warm": "detectron2 PascalVOCDetectionEvaluator, warm (XML cached)",
        "d2_iou50_only": "detectron2 at IoU 0.5 only (its process + files + voc_eval, warm)",
    }
    print(f"\n{args.images} images x {args.classes} classes, {n_dets} detections, "
          f"{result['setup']['objects']} objects (seed {args.seed}, min of {args.repeats} run(s))")
    print("| evaluator (construct + process + evaluate) | wall s | CPU s |\n|---|---:|---:|")
    for key, label in labels.items():
        print(f"| {label} | {t[key][0]:.3f} | {t[key][1]:.3f} |")
    print("\n| speed-up | wall | CPU |\n|---|---:|---:|")
    for key, v in result["speedup"].items():
        print(f"| {key} | {v['wall']:.1f}x | {v['cpu']:.1f}x |")
    print(f"\nAP50: ours {ours['AP50_voc07']!r}, detectron2 {d2_ap50!r}, "
          f"detectron2 IoU-0.5-only {d2_ap50_only!r} -> {'EQUAL' if equal else 'DIFFERENT'}")
    print(f"ours COCO: AP {ours['AP']:.3f}, AP50 {ours['AP50']:.3f}, AP75 {ours['AP75']:.3f}")

    write_json(args.output, result)
    print(f"wrote {args.output}")
    if not equal:
        raise SystemExit("AP50 differs between gem_d2 and detectron2")
    return result
