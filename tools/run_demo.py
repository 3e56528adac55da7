#!/usr/bin/env python
"""The embedded demo behind ``make demo``: the whole GEM pipeline on generated multi-domain data, on CPU.

    python tools/run_demo.py [--config-file configs/gem_dino_synth_demo.yaml] [KEY VALUE ...]

1. generates the 5-domain dataset (once; UODB VOC layout, read back by the real loader) and prints
   its per-domain summary;
2. runs gem_d2.engine.setup.train_main (what tools/train_net.py launches): plans the dataset->expert
   mapping (LP + rounding; report and heatmap in OUTPUT_DIR/plan), trains GEM-DINO,
   evaluates every domain (UODB protocol + COCO AP);
3. prints the per-domain table and where every artefact is (OUTPUT_DIR, default output/demo).

Re-running resumes from OUTPUT_DIR's last checkpoint (a finished run is only re-evaluated). Training
holds OUTPUT_DIR's run lock; Ctrl-C prints one line naming the last complete checkpoint (exit status 130).
"""
import gem_d2  # noqa: F401,I001  (first: compatibility shims, registrations)

import sys
import time
from pathlib import Path

from detectron2.engine import default_argument_parser

from gem_d2.data import ensure_synthetic, summarize_datasets
from gem_d2.engine.interrupt import exit_on_interrupt
from gem_d2.engine.run_lock import OutputDirLock
from gem_d2.engine.setup import build_cfg, train_main

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "gem_dino_synth_demo.yaml"


def main(argv=None) -> None:
    t0 = time.time()
    args = default_argument_parser().parse_args(argv)
    if not args.config_file:
        args.config_file = str(DEFAULT_CONFIG)
    args.resume = True  # idempotent: a second run continues (or only re-evaluates) the first
    cfg = build_cfg(args.config_file, args.opts)

    with exit_on_interrupt(cfg.OUTPUT_DIR):  # Ctrl-C: one line naming the last complete checkpoint, exit 130
        print("== 1/3 generated multi-domain data ==", flush=True)
        ensure_synthetic(cfg)
        print(summarize_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)), flush=True)

        print("== 2/3 plan, train and evaluate GEM-DINO (progress and ETA lines below) ==", flush=True)
        with OutputDirLock(cfg.OUTPUT_DIR):  # one run per OUTPUT_DIR
            train_main(args)

        out = Path(cfg.OUTPUT_DIR)
        print("== 3/3 results ==", flush=True)
        table = out / "results_table.md"
        print(table.read_text() if table.exists() else f"(no {table}: evaluation did not run)")
        print("artefacts:")
        for rel in ("config.yaml", "plan/plan.yaml", "plan/plan_heatmap.png", "plan/plan_report.json",
                    "training_curves.png", "results_table.md", "results.json", "model_final.pth", "log.txt"):
            path = out / rel
            print(f"  {'ok ' if path.exists() else 'MISSING'} {path}")
    print(f"demo finished in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
