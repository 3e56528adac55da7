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
from the checkpoint); the resolved config is written to ``OUTPUT_DIR/config.yaml``.
"""
import gem_d2  # noqa: F401,I001  (first: compatibility shims, then detectron2 registrations)

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from gem_d2.engine import GemCheckpointer, GemTrainer, launch, resolve_gem_mapping
from gem_d2.engine import setup as engine_setup


def build_cfg(args):
    """The config of ``args`` (file + overrides), not frozen, no side effects."""
    return engine_setup.build_cfg(args.config_file, args.opts)


def setup(args):
    """The resolved, frozen config of this run (logging, output folder, datasets, GEM mapping)."""
    cfg = build_cfg(args)
    cfg.freeze()
    gem_d2._compat.tolerate_missing_compiled_extension()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gem_d2", abbrev_name="gem")
    engine_setup.prepare_datasets(cfg)
    resolve_gem_mapping(cfg, resume=args.resume, eval_only=args.eval_only)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = GemTrainer.build_model(cfg)
        GemCheckpointer.from_config(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return GemTrainer.test(cfg, model)
    trainer = GemTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    device = build_cfg(args).MODEL.DEVICE  # decides gloo (CPU) or NCCL (CUDA) for the workers
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,), device=device)
