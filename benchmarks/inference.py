"""inference: images/s and latency (median, p90) of the GEM model, known-dataset vs auto test-time routing.

    python tools/benchmark.py inference [--batch-sizes 1 8] [--repeats 30] [--device cpu] [--amp] [KEY VALUE ...]

The model is ``--config-file`` (default configs/gem_dino_synth_demo.yaml: the small GEM-DINO, MoE FFNs
in decoder layers 0 and 2, 4 experts) in eval mode under ``torch.inference_mode``. Its GEM mapping is
the config's, or when that is empty the fixed valid mapping dataset i -> expert i % NUM_EXPERTS (the
planner is not run). Weights: ``MODEL.WEIGHTS`` when set (a gem_d2 checkpoint, loaded with
``GemCheckpointer``), else the random initialisation after ``torch.manual_seed(--seed)``; speed does
not depend on the weights (fixed image size, queries and detections per image).

Two routings, the same model and weights:

- ``dataset``: ``MODEL.GEM.TEST_ROUTING dataset``, each image's dataset is known (the UODB protocol);
- ``auto``: ``MODEL.GEM.TEST_ROUTING auto``, the model's linear dataset classifier on the backbone's
  pooled mean/std features picks the dataset (gem_d2.modeling.auto_routing). The classifier is the
  checkpoint's when it carries one, else fitted at start-up by
  ``gem_d2.engine.fit_dataset_classifier`` on ``--classifier-images`` training images per dataset
  (default ``MODEL.GEM.PLANNER.SAMPLES_PER_UNIT``: 16 in the demo config) with the (random-init)
  model, as GemTrainer does before evaluating; that start-up time is reported, not included in the
  latencies. "routed right" is the share of the timed images sent to their own domain (with random
  weights it says little about a trained model: BENCHMARKS.md "Training").

The images come from ``DATASETS.TEST`` (the datasets taken in turn, ``--pool`` images), decoded and
mapped once (``GemDatasetMapper``, test resolution) before timing: a latency is one ``model(inputs)``
call (normalisation and padding, backbone, transformer, top-k post-processing and rescaling to the
original size), not image decoding. Each setting (routing x batch size) runs ``--warmup`` untimed calls,
then ``--repeats`` rounds each time every setting once (round-robin, the first rotating; a setting
steps through the pool batch by batch). Reported: median and p90 latency per call in ms, images/s =
batch / median latency, and the median process CPU time per call. ``--threads 1`` by default, as in
the ``step`` benchmark (OpenMP spin-waiting on cores shared with other jobs makes multi-threaded
timings erratic); ``--threads 0`` uses all cores.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

from benchmarks.common import (
    add_config_opts,
    add_model_arguments,
    add_output,
    add_threads,
    autocast_dtype,
    device_name,
    fixed_gem_mapping,
    load_average,
    set_threads,
    timed,
    write_json,
)

ROUTINGS = ("dataset", "auto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--amp", action="store_true",
                        help="run the model under torch.autocast with SOLVER.AMP.DTYPE (CUDA only)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--routings", nargs="+", choices=ROUTINGS, default=list(ROUTINGS))
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (one call of every setting each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per setting before the rounds")
    parser.add_argument("--pool", type=int, default=16, help="test images cycled through (decoded once)")
    parser.add_argument("--classifier-images", type=int, default=0,
                        help="training images per dataset to fit the auto-routing classifier when the weights hold "
                             "none (0 = MODEL.GEM.PLANNER.SAMPLES_PER_UNIT, as GemTrainer)")
    parser.add_argument("--seed", type=int, default=0)
    add_threads(parser)
    add_output(parser, "inference")
    add_config_opts(parser, "MODEL.WEIGHTS output/demo/model_final.pth")


def build_cfg(config_file: str, opts, device: str):
    """File + overrides + device; router gem with the config's mapping or the fixed one (dataset i -> i % E)."""
    from gem_d2.engine.setup import build_cfg as gem_build_cfg

    cfg = gem_build_cfg(config_file, opts)
    if device:
        cfg.MODEL.DEVICE = device
    g = cfg.MODEL.GEM
    if g.ROUTER == "gem" and g.MOE_LAYERS and not g.MAPPING:
        fixed_gem_mapping(cfg)
        g.EXPERTS_PER_UNIT = 1
    g.TEST_ROUTING = "auto"  # builds the dataset router; the routing is switched per call (see run)
    return cfg


def image_pool(cfg, size: int) -> list:
    """``size`` mapped test images, the DATASETS.TEST datasets taken in turn."""
    from detectron2.data import DatasetCatalog

    from gem_d2.data import GemDatasetMapper

    per_dataset = [DatasetCatalog.get(name) for name in cfg.DATASETS.TEST]
    if not per_dataset or not any(per_dataset):
        raise ValueError(f"DATASETS.TEST={list(cfg.DATASETS.TEST)} holds no images")
    mapper = GemDatasetMapper(cfg, is_train=False)
    pool, i = [], 0
    while len(pool) < size:
        for records in per_dataset:
            if i < len(records) and len(pool) < size:
                pool.append(mapper(records[i]))
        i += 1
        if all(i >= len(r) for r in per_dataset) and len(pool) < size:
            pool += pool[:size - len(pool)]  # fewer test images than the pool: cycle them
    return pool


def p90(values) -> float:
    if len(values) == 1:
        return values[0]
    s = sorted(values)
    pos = 0.9 * (len(s) - 1)  # linear interpolation between closest ranks (numpy's default)
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def run(args) -> dict:
    """Run the benchmark; returns the report (also written to ``--output``)."""
    import torch

    import gem_d2  # noqa: F401  (first: compatibility shims before detectron2)

    # isort: split
    from detectron2.modeling import build_model

    from gem_d2.engine import GemCheckpointer, fit_dataset_classifier
    from gem_d2.engine.setup import prepare_datasets

    set_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        raise ValueError("--repeats and --batch-sizes must be >= 1, --warmup >= 0")
    cfg = build_cfg(args.config_file, args.opts, args.device)
    prepare_datasets(cfg)
    device = torch.device(cfg.MODEL.DEVICE)
    amp = autocast_dtype(cfg, args.amp)  # a clear error off CUDA
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        GemCheckpointer.from_config(cfg, model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    if model.dataset_classifier is None:
        raise ValueError("the model has no dataset classifier (no label space): auto routing cannot be measured")
    classifier_s, classifier_source = 0.0, "from the checkpoint"
    if not bool(model.dataset_classifier.ready):
        t0 = time.perf_counter()
        n = args.classifier_images or int(cfg.MODEL.GEM.PLANNER.SAMPLES_PER_UNIT)
        fit_dataset_classifier(model, cfg, samples_per_dataset=n)
        classifier_s = time.perf_counter() - t0
        classifier_source = f"fitted on {n} training images per dataset at start-up"
    pool = image_pool(cfg, max(args.pool, max(args.batch_sizes)))
    own = [model.dataset_names[int(x["dataset_id"])] for x in pool]
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, mapping "
          f"{dict(zip(cfg.MODEL.GEM.UNITS, cfg.MODEL.GEM.MAPPING))}; auto-routing classifier {classifier_source} "
          f"({classifier_s:.1f} s); pool {len(pool)} test images {tuple(pool[0]['image'].shape[1:])}", flush=True)

    settings = [(r, b) for r in ROUTINGS if r in args.routings for b in args.batch_sizes]
    cursor = {s: 0 for s in settings}
    wall = {s: [] for s in settings}
    cpu = {s: [] for s in settings}
    routed = {s: [0, 0] for s in settings}  # right, total

    def call(setting, record: bool) -> None:
        routing, b = setting
        idx = [(cursor[setting] + j) % len(pool) for j in range(b)]
        cursor[setting] = (cursor[setting] + b) % len(pool)
        inputs = [pool[i] for i in idx]
        model.test_routing = routing  # what MODEL.GEM.TEST_ROUTING sets at build time; same weights

        def forward():
            with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=amp or torch.float32,
                                                        enabled=amp is not None):
                return model(inputs)

        outputs, w, c = timed(forward, device)
        if len(outputs) != b:
            raise RuntimeError(f"{setting}: {len(outputs)} outputs for {b} images")
        if record:
            wall[setting].append(w)
            cpu[setting].append(c)
            if routing == "auto":
                routed[setting][0] += sum(o["routed_dataset"] == own[i] for o, i in zip(outputs, idx))
                routed[setting][1] += b

    for s in settings:
        for _ in range(args.warmup):
            call(s, record=False)
    for rep in range(args.repeats):
        shift = rep % len(settings)
        for s in settings[shift:] + settings[:shift]:
            call(s, record=True)
        print(f"round {rep + 1}/{args.repeats}: " + ", ".join(f"{r} b{b} {wall[(r, b)][-1]:.0f}" for r, b in settings)
              + " ms", flush=True)

    rows = []
    for routing, b in settings:
        w, c = wall[(routing, b)], cpu[(routing, b)]
        med = statistics.median(w)
        right, total = routed[(routing, b)]
        rows.append({"routing": routing, "batch": b, "latency_ms": w, "cpu_ms": c, "median_ms": med, "p90_ms": p90(w),
                     "min_ms": min(w), "max_ms": max(w), "cpu_median_ms": statistics.median(c),
                     "images_per_s": b / (med / 1e3), "images_per_s_cpu": b / (statistics.median(c) / 1e3),
                     "routed_right": (right / total) if total else None, "routed_images": total})
    header = (f"{'routing':<8} {'batch':>5} {'images/s':>9} {'median ms':>10} {'p90 ms':>9} {'ms/image':>9} "
              f"{'CPU ms':>9} {'routed right':>13}")
    print(header)
    print("-" * len(header))
    for row in rows:
        rr = f"{100 * row['routed_right']:.0f}% of {row['routed_images']}" if row["routed_right"] is not None else "-"
        print(f"{row['routing']:<8} {row['batch']:>5} {row['images_per_s']:>9.2f} {row['median_ms']:>10.0f} "
              f"{row['p90_ms']:>9.0f} {row['median_ms'] / row['batch']:>9.0f} {row['cpu_median_ms']:>9.0f} {rr:>13}")

    report = {
        "benchmark": "inference", "config_file": args.config_file, "opts": list(args.opts),
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "amp": str(amp) if amp else None,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed, "statistic": "median, p90",
        "schedule": "round-robin over (routing, batch) per repeat, first rotating",
        "weights": cfg.MODEL.WEIGHTS or "random init", "auto_router": classifier_source,
        "auto_router_fit_s": classifier_s,
        "units": list(cfg.MODEL.GEM.UNITS), "mapping": [list(m) for m in cfg.MODEL.GEM.MAPPING],
        "image_hw": list(pool[0]["image"].shape[1:]), "pool": len(pool),
        "load_average": load_average(),
        "rows": rows,
    }
    if args.output:
        write_json(args.output, report)
        print(f"wrote {args.output}")
    return report
