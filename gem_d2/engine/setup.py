"""What the command-line tools share: the config, the datasets, and train_net's setup and main.

``tools/train_net.py`` is a thin ``launch(train_main, ...)``; ``tools/run_demo.py`` and the router study
call the same :func:`train_main` in-process.
"""
from __future__ import annotations

from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from gem_d2 import _compat
from gem_d2.config import add_gem_config, merge_config_file
from gem_d2.data import ensure_synthetic, register_few_shot_names, register_uodb
from gem_d2.engine.checkpoint import GemCheckpointer
from gem_d2.engine.planning import resolve_gem_mapping
from gem_d2.engine.trainer import GemTrainer, results_source

__all__ = ["build_cfg", "prepare_datasets", "setup_run", "train_main"]


def build_cfg(config_file: str, opts) -> CfgNode:
    """get_cfg + add_gem_config + ``config_file`` (may be empty) + ``opts`` (KEY VALUE list); not frozen."""
    cfg = add_gem_config(get_cfg())
    if config_file:
        merge_config_file(cfg, config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def prepare_datasets(cfg: CfgNode) -> None:
    """Generate the ``synth_*`` data if the config uses it (once per machine); register UODB under UODB_ROOT
    and the K-shot subsets (``<source>_<K>shot_seed<S>``) the config names."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(str(n).startswith("synth_") for n in names):
        if comm.get_local_rank() == 0:
            ensure_synthetic(cfg)
        comm.synchronize()
        if comm.get_local_rank() != 0:
            ensure_synthetic(cfg)  # finds the data written above; registers it in this process
    if cfg.DATASETS.UODB_ROOT:
        register_uodb(cfg.DATASETS.UODB_ROOT)
    register_few_shot_names(names)  # K-shot subsets named in an adapted model's config


def setup_run(args) -> CfgNode:
    """The resolved, frozen config of a train_net run (``args`` from detectron2's ``default_argument_parser``):
    logging and output folder (``default_setup``), datasets, and the GEM mapping (planned on rank 0 if empty)."""
    cfg = build_cfg(args.config_file, args.opts)
    cfg.freeze()
    _compat.tolerate_missing_compiled_extension()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gem_d2", abbrev_name="gem")
    prepare_datasets(cfg)
    resolve_gem_mapping(cfg, resume=args.resume, eval_only=args.eval_only)
    return cfg


def train_main(args):
    """Train (``--resume`` continues OUTPUT_DIR's last checkpoint) or, with ``--eval-only``, evaluate
    ``MODEL.WEIGHTS``; returns the evaluation results ``{dataset: metrics}``. Runs in every process of a launch."""
    cfg = setup_run(args)
    if args.eval_only:
        model = GemTrainer.build_model(cfg)
        checkpointer = GemCheckpointer.from_config(cfg, model)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return GemTrainer.test(cfg, model, source=results_source(checkpointer))
    trainer = GemTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
