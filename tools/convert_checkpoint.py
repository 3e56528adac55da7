#!/usr/bin/env python3
"""Convert an IDEA-Research/DINO or detrex DINO (R-50, 4-scale) checkpoint into a gem-d2 checkpoint.

    python tools/convert_checkpoint.py --config-file configs/gem_dino_uodb.yaml --input dino_r50.pth \\
        --output dino_r50_gem.pth [--format auto|idea|detrex] [--match name|index] [--voc-aliases] [KEY VALUE ...]

The output holds ``{"model": state dict}`` for ``MODEL.WEIGHTS``: backbone, neck, transformer, heads and DN label
embedding from the checkpoint; MoE layers of the config start with every expert a copy of the checkpoint's
FFN; class rows whose names match COCO's are copied, the others initialised as DINO does; routers keep
their initialisation. The checkpoint is read as data only. Rules: gem_d2/model_zoo/convert.py.
"""
from __future__ import annotations

import argparse
import logging
import sys

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
import torch
from detectron2.utils.logger import setup_logger

from gem_d2.engine.setup import build_cfg, prepare_datasets
from gem_d2.model_zoo.convert import FORMATS, VOC_COCO_ALIASES, convert_checkpoint_file
from gem_d2.utils.files import atomic_write

logger = logging.getLogger("gem_d2.convert_checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config of the gem-d2 model to fill")
    parser.add_argument("--input", required=True, metavar="FILE", help="the reference checkpoint")
    parser.add_argument("--output", required=True, metavar="FILE", help="the gem-d2 checkpoint to write")
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="checkpoint layout")
    parser.add_argument("--match", default="name", choices=("name", "index"),
                        help="class rows: by COCO class name (default) or row i <- row i")
    parser.add_argument("--voc-aliases", action="store_true",
                        help="also match VOC's names of COCO classes (aeroplane, motorbike, sofa, tvmonitor)")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logger(name="gem_d2")
    cfg = build_cfg(args.config_file, args.opts)
    prepare_datasets(cfg)
    state, report, mismatches = convert_checkpoint_file(args.input, cfg, args.format, args.match,
                                                        VOC_COCO_ALIASES if args.voc_aliases else None)
    logger.info(report.summary())
    for line in mismatches:
        logger.warning("config differs from the checkpoint's reference: %s", line)
    atomic_write(args.output, lambda f: torch.save({"model": state, "__author__": "gem_d2 convert_checkpoint",
                                                    "matching_heuristics": False}, f))
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
