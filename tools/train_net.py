#!/usr/bin/env python
"""Train or evaluate GEM-DINO with detectron2 (in the style of detectron2's projects/*/train_net.py).

    python tools/train_net.py --config-file configs/dino_synth_small.yaml
    python tools/train_net.py --config-file <cfg> --resume                      # continue OUTPUT_DIR's last checkpoint
    python tools/train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <ckpt>
    python tools/train_net.py --config-file <cfg> --num-gpus 2 MODEL.DEVICE cpu  # 2 CPU processes (gloo DDP)

``--num-gpus N`` starts N processes per machine: one per GPU on CUDA (NCCL), or N CPU processes
(gloo) when ``MODEL.DEVICE`` is cpu or no GPU is present. Before the model is built: the generated
``synth_*`` datasets are created if missing, UODB is registered when ``DATASETS.UODB_ROOT`` is set,
and the GEM mapping is resolved (planned on rank 0 when ``MODEL.GEM.MAPPING`` is empty, or taken
from the checkpoint); the resolved config is written to ``OUTPUT_DIR/config.yaml``. Ctrl-C prints one
line naming the last complete checkpoint in OUTPUT_DIR and exits with status 130.
"""
import gem_d2  # noqa: F401,I001  (first: compatibility shims, then detectron2 registrations)

import contextlib

from detectron2.engine import default_argument_parser

from gem_d2.engine import launch
from gem_d2.engine.interrupt import exit_on_interrupt
from gem_d2.engine.run_lock import OutputDirLock
from gem_d2.engine.setup import build_cfg, train_main

if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    cfg = build_cfg(args.config_file, args.opts)
    # Ctrl-C: one line naming the last complete checkpoint, exit status 130
    with exit_on_interrupt(cfg.OUTPUT_DIR):
        # one run per OUTPUT_DIR at a time (taken by the launching process of machine 0; the workers are its children)
        with OutputDirLock(cfg.OUTPUT_DIR) if args.machine_rank == 0 and cfg.OUTPUT_DIR else contextlib.nullcontext():
            launch(train_main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                   dist_url=args.dist_url, args=(args,), device=cfg.MODEL.DEVICE)  # gloo on CPU, NCCL on CUDA
