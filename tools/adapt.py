#!/usr/bin/env python
"""Few-shot adaptation of a trained GEM-DINO (or learned-router) model to a new dataset.

    python tools/adapt.py --config-file output/run/config.yaml --weights output/run/model_final.pth \\
        --new-dataset synth_medical_train [--new-test synth_medical_test] [--shots 5] [--output-dir DIR] [KEY VALUE ...]

1. registers the seeded K-shot-per-class subset of ``--new-dataset`` (``MODEL.GEM.ADAPT.SHOTS``/``SEED``);
2. gem: re-plans with the old units' mapping rows fixed (``gem_d2.planner.plan_new_unit_from_cfg``): the new unit's
   prototype (the trained backbone's pooled features) against expert keys = mean prototype of each expert's
   old units; residual capacities under ``PLANNER.SLACK``; with ``MODEL.GEM.ADAPT.NEW_EXPERTS > 0`` that many
   experts are appended (keyed by the new prototype, initialised as copies of the new unit's best old expert);
3. extends the label space with the new class block (last, so old class ids do not move);
4. gem: freezes everything old datasets use and fine-tunes only the new class rows and the experts no old
   unit is mapped to; other routers: fine-tune every MoE layer (experts + gates) and the detection heads;
5. evaluates every test dataset before and after (``before/`` and the output folder) and writes
   ``adapt_result.json`` and ``model_final.pth`` whose mapping holds every unit.

The fine-tuning schedule is ``MODEL.GEM.ADAPT.MAX_ITER`` iterations at ``ADAPT.BASE_LR`` (constant),
batch ``SOLVER.IMS_PER_BATCH``, on the K-shot subset only. The output folder is locked for the run
(``OutputDirLock``); Ctrl-C prints one line and exits with status 130.
"""
import gem_d2  # noqa: F401,I001  (first: compatibility shims, then detectron2 registrations)

import argparse
import sys

from gem_d2.engine.adaptation import adaptation_output_dir, run_adaptation
from gem_d2.engine.interrupt import exit_on_interrupt


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="the trained run's config (e.g. its OUTPUT_DIR/config.yaml)")
    p.add_argument("--weights", required=True, help="the trained checkpoint (model_final.pth)")
    p.add_argument("--new-dataset", required=True, help="registered training dataset of the new domain")
    p.add_argument("--new-test", default=None,
                   help="its test dataset (default: the same name with _test or _val instead of _train, if registered)")
    p.add_argument("--shots", type=int, default=None, help="K images per class (default MODEL.GEM.ADAPT.SHOTS)")
    p.add_argument("--output-dir", default=None, help="default: <OUTPUT_DIR>_adapt_<new dataset>_<K>shot")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    with exit_on_interrupt(lambda: adaptation_output_dir(args)):  # Ctrl-C: one line, exit status 130
        run_adaptation(args)
