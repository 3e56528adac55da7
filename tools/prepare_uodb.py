#!/usr/bin/env python
"""Build the UODB tree from the original dataset releases, or check an existing one.

    python tools/prepare_uodb.py --source ~/downloads --output $DETECTRON2_DATASETS all
    python tools/prepare_uodb.py --output $DETECTRON2_DATASETS --check all

The expected source files of each dataset are listed by ``--list-sources`` and in docs/preparing_uodb.md;
the command line lives in gem_d2.prepare.cli.
"""
import sys

from gem_d2.prepare.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
