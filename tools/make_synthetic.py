#!/usr/bin/env python
"""Write gem_d2's generated multi-domain dataset (UODB VOC layout) and print a per-domain summary.

    python tools/make_synthetic.py [--root R] [--images-per-domain N] [--test-images-per-domain M]
                                   [--image-size S] [--seed SEED]

Defaults come from gem_d2's config (``DATASETS.SYNTH.*``); the root defaults to
``<$DETECTRON2_DATASETS or datasets>/gem_synth``. Re-running with the same parameters does nothing.
"""
import argparse
import sys
import time

import gem_d2  # noqa: F401  (applies the compatibility shims before detectron2 is used)

# isort: split
from detectron2.config import get_cfg

from gem_d2.config import add_gem_config
from gem_d2.data.synthetic import RARE_DOMAIN, format_summary, generate_synthetic, synthetic_root


def main(argv=None) -> int:
    cfg = add_gem_config(get_cfg())
    s = cfg.DATASETS.SYNTH
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="output folder (default: <datasets root>/gem_synth)")
    parser.add_argument("--images-per-domain", type=int, default=s.IMAGES_PER_DOMAIN,
                        help=f"training images of a regular domain ({RARE_DOMAIN} gets a quarter)")
    parser.add_argument("--test-images-per-domain", type=int, default=s.TEST_IMAGES_PER_DOMAIN)
    parser.add_argument("--image-size", type=int, default=s.IMAGE_SIZE)
    parser.add_argument("--seed", type=int, default=s.SEED)
    args = parser.parse_args(argv)
    root = args.root or synthetic_root(cfg)
    start = time.perf_counter()
    summary = generate_synthetic(root, args.images_per_domain, args.test_images_per_domain, args.image_size,
                                 args.seed)
    took = time.perf_counter() - start
    action = f"generated in {took:.1f} s" if summary["generated"] else "already present with these parameters"
    print(f"Synthetic multi-domain dataset at {summary['root']} ({action}); parameters {summary['params']}")
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
