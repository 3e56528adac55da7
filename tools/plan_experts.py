#!/usr/bin/env python3
"""Plan GEM's unit -> experts mapping for a config (docs/design/planner.md) and write it as a config fragment.

    python tools/plan_experts.py --config-file configs/dino_synth_small.yaml [--output DIR] [KEY VALUE ...]

Writes into ``--output`` (default ``OUTPUT_DIR``):

- ``plan.yaml``: MODEL.GEM.{NUM_EXPERTS, EXPERTS_PER_UNIT, UNITS, MAPPING, MAPPING_WEIGHTS, MOE_LAYERS}; merge
  it after your config (``cfg.merge_from_file``, or ``train_net.py --config-file cfg.yaml`` with
  ``MODEL.GEM.MAPPING`` etc. taken from it) or name it as ``_BASE_``;
- ``planned_config.yaml``: the full config with the mapping filled in (``train_net.py --config-file`` it);
- ``plan_report.json``, ``plan_heatmap.png`` (x* and the final mapping).

The output folder is locked while planning (``OutputDirLock``: a second run on it fails at once);
Ctrl-C prints one line and exits with status 130.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
from detectron2.utils.logger import setup_logger

from gem_d2.engine.interrupt import exit_on_interrupt
from gem_d2.engine.run_lock import OutputDirLock
from gem_d2.engine.setup import build_cfg, prepare_datasets
from gem_d2.planner import plan_from_cfg
from gem_d2.planner.pipeline import PLAN_YAML
from gem_d2.utils.files import atomic_write_text

logger = logging.getLogger("gem_d2.plan_experts")

PLANNED_CONFIG = "planned_config.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to the config file")
    parser.add_argument("--output", default="", metavar="DIR", help="output folder (default: the config's OUTPUT_DIR)")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.GEM.NUM_EXPERTS 4")
    return parser


def _interrupted(output: str) -> str:
    return f"interrupted; {output} keeps only complete plan files (each is written atomically)"


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = build_cfg(args.config_file, args.opts)
    output = args.output or cfg.OUTPUT_DIR
    with exit_on_interrupt(output, _interrupted), OutputDirLock(output):  # one writer per folder
        setup_logger(output, name="gem_d2", abbrev_name="gem")
        prepare_datasets(cfg)
        plan, mapping = plan_from_cfg(cfg, output)
        planned = cfg.clone()
        mapping.to_cfg(planned)
        atomic_write_text(os.path.join(output, PLANNED_CONFIG), planned.dump())
    print(plan.format_report())
    paths = {name: os.path.join(output, name) for name in
             (PLAN_YAML, PLANNED_CONFIG, "plan_report.json", "plan_heatmap.png")}
    print("\nwritten:\n" + "\n".join(f"  {p}" for p in paths.values()))
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
