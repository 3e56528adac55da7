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

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from gem_d2 import add_gem_config
from gem_d2.data import ensure_synthetic
from gem_d2.engine import GemCheckpointer, GemTrainer, launch, resolve_gem_mapping


def build_cfg(args):
    """get_cfg + add_gem_config + the config file + command-line overrides (not frozen, no side effects)."""
    cfg = get_cfg()
    add_gem_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    return cfg


def prepare_datasets(cfg):
    """Generate the ``synth_*`` data if the config uses it (once per machine) and register UODB if configured."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(str(n).startswith("synth_") for n in names):
        if comm.get_local_rank() == 0:
            ensure_synthetic(cfg)
        comm.synchronize()
        if comm.get_local_rank() != 0:
            ensure_synthetic(cfg)  # finds the data written above; registers it in this process
    if cfg.DATASETS.UODB_ROOT:
        from gem_d2.data import register_uodb

        register_uodb(cfg.DATASETS.UODB_ROOT)


def _tolerate_missing_compiled_extension():
    # default_setup logs detectron2's environment table, which asks detectron2._C for its compiler
    # version; with the pure-Python stand-in of a build without _C (tools/bootstrap.py) that raises.
    # The table is informational only, so report the gap instead of failing the run.
    from detectron2.engine import defaults

    collect = defaults.collect_env_info
    if getattr(collect, "_gem_tolerant", False):
        return

    def collect_env_info():
        try:
            return collect()
        except NotImplementedError as e:
            return f"(detectron2 environment table unavailable: {e})"

    collect_env_info._gem_tolerant = True
    defaults.collect_env_info = collect_env_info


def setup(args):
    """The resolved, frozen config of this run (logging, output folder, datasets, GEM mapping)."""
    cfg = build_cfg(args)
    cfg.freeze()
    _tolerate_missing_compiled_extension()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gem_d2", abbrev_name="gem")
    prepare_datasets(cfg)
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
