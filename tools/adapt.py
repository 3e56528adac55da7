#!/usr/bin/env python
"""Few-shot adaptation of a trained GEM-DINO (or learned-router) model to a new dataset.

    python tools/adapt.py --config-file output/run/config.yaml --weights output/run/model_final.pth \\
        --new-dataset synth_medical_train [--new-test synth_medical_test] [--shots 5] [--output-dir DIR] [KEY VALUE ...]

1. registers the seeded K-shot-per-class subset of ``--new-dataset`` (``MODEL.GEM.ADAPT.SHOTS``/``SEED``);
2. gem: re-plans with the old units' mapping rows fixed (``gem_d2.planner.plan_new_units``): the new unit's
   prototype (the trained backbone's pooled features) against expert keys = mean prototype of each expert's
   old units; residual capacities under ``PLANNER.SLACK``; with ``MODEL.GEM.ADAPT.NEW_EXPERTS > 0`` that many
   experts are appended (keyed by the new prototype, initialised as copies of the new unit's best old expert);
3. extends the label space with the new class block (last, so old class ids do not move);
4. gem: freezes everything old datasets use and fine-tunes only the new class rows and the experts no old
   unit is mapped to; other routers: fine-tune every MoE layer (experts + gates) and the detection heads;
5. evaluates every test dataset before and after (``before/`` and the output folder) and writes
   ``adapt_result.json`` and ``model_final.pth`` whose mapping holds every unit.

The fine-tuning schedule is ``MODEL.GEM.ADAPT.MAX_ITER`` iterations at ``ADAPT.BASE_LR`` (constant),
batch ``SOLVER.IMS_PER_BATCH``, on the K-shot subset only.
"""
import gem_d2  # noqa: F401,I001  (first: compatibility shims, then detectron2 registrations)

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from gem_d2.data import UnifiedLabelSpace, register_few_shot
from gem_d2.data.catalog import require_registered, strip_split_suffix
from gem_d2.engine import GemTrainer, resolve_gem_mapping
from gem_d2.engine import setup as engine_setup
from gem_d2.engine.adaptation import AdaptTrainer, adapted_config, experts_of_units, load_extended_weights, select_trainable
from gem_d2.engine.checkpoint import atomic_write
from gem_d2.engine.planning import write_config

logger = logging.getLogger("gem_d2.adapt")


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


def default_test_name(train_name: str):
    base = strip_split_suffix(train_name)
    for split in ("test", "val"):
        if f"{base}_{split}" in DatasetCatalog.list():
            return f"{base}_{split}"
    return None


def plan_new_unit(cfg, few_name: str, num_new: int):
    """(experts, weights, best old expert, plan summary) of the new unit, old rows fixed."""
    from gem_d2.planner import affinity_from_prototypes, compute_affinity, expert_keys_from_mapping, plan_new_units
    from gem_d2.planner.pipeline import dataset_load_shares

    g = cfg.MODEL.GEM
    if g.PLANNER.LEVEL != "dataset":
        raise ValueError(f"MODEL.GEM.PLANNER.LEVEL={g.PLANNER.LEVEL!r}: adaptation plans dataset-level units only")
    aff_cfg = cfg.clone()
    aff_cfg.defrost()
    aff_cfg.DATASETS.TRAIN = tuple(cfg.DATASETS.TRAIN) + (few_name,)
    aff = compute_affinity(aff_cfg)
    units = list(g.UNITS)
    index = {u: aff.unit_names.index(u) for u in units + [few_name]}
    protos_old = aff.prototypes[[index[u] for u in units]]
    proto_new = aff.prototypes[index[few_name]]
    n_old = int(g.NUM_EXPERTS)
    keys = expert_keys_from_mapping(protos_old, list(g.MAPPING), n_old + num_new, fill=proto_new)
    w_new = affinity_from_prototypes(proto_new[None], keys, float(g.PLANNER.TAU))
    shares = dataset_load_shares(aff_cfg)
    ext = plan_new_units(w_new, [shares[few_name]], list(g.MAPPING), [shares[u] for u in units],
                         k=int(g.EXPERTS_PER_UNIT), slack=float(g.PLANNER.SLACK), beta=float(g.PLANNER.BETA),
                         num_new_experts=num_new, solver=g.PLANNER.SOLVER,
                         rounding="exact" if g.PLANNER.ROUNDING == "exact" else "hierarchical",
                         unit_names=[few_name])
    best_old = int(np.argmax(w_new[0, :n_old]))
    summary = {"affinity": w_new[0].tolist(), "capacities": ext.capacities.tolist(),
               "fixed_load": ext.fixed_load.tolist(), "experts": ext.experts[0], "lp_value": ext.plan.lp_value,
               "rounded_value": ext.plan.rounded_value}
    return ext.experts[0], ext.weights[0], best_old, summary


def ap_table(results) -> dict:
    return {name: {"AP50": float(r["uodb"]["AP50_voc07"]), "AP": float(r["uodb"].get("AP", float("nan")))}
            for name, r in results.items()}


def adapt(args) -> dict:
    """The whole adaptation; returns the result dict also written to ``adapt_result.json``."""
    t0 = time.time()
    cfg = engine_setup.build_cfg(args.config_file, args.opts)
    engine_setup.prepare_datasets(cfg)
    a = cfg.MODEL.GEM.ADAPT
    shots = int(args.shots if args.shots is not None else a.SHOTS)
    require_registered(args.new_dataset)
    new_test = args.new_test or default_test_name(args.new_dataset)
    if new_test is None:
        raise ValueError(f"no test dataset found for {args.new_dataset!r}; pass --new-test")
    require_registered(new_test)
    out_dir = args.output_dir or f"{cfg.OUTPUT_DIR.rstrip('/')}_adapt_{args.new_dataset}_{shots}shot"
    os.makedirs(out_dir, exist_ok=True)
    setup_logger(out_dir, name="gem_d2", abbrev_name="gem")
    setup_logger(out_dir, name="detectron2", abbrev_name="d2")
    cfg.MODEL.WEIGHTS = args.weights
    cfg.OUTPUT_DIR = out_dir
    seed_all_rng(int(cfg.SEED) if int(cfg.SEED) >= 0 else int(a.SEED))  # new class rows' init, data order
    resolve_gem_mapping(cfg, resume=False, eval_only=True)  # the trained mapping, from the config or checkpoint
    few = register_few_shot(args.new_dataset, shots, int(a.SEED))
    logger.info(f"{few}: {len(DatasetCatalog.get(few))} images ({shots}-shot per class, seed {a.SEED})")

    router = cfg.MODEL.GEM.ROUTER
    gem = router == "gem" and len(cfg.MODEL.GEM.MOE_LAYERS) > 0
    old_classes = UnifiedLabelSpace(list(cfg.DATASETS.TRAIN)).num_classes
    old_experts = int(cfg.MODEL.GEM.NUM_EXPERTS)
    num_new = int(a.NEW_EXPERTS) if gem else 0
    if int(a.NEW_EXPERTS) and not gem:
        logger.info(f"MODEL.GEM.ADAPT.NEW_EXPERTS={a.NEW_EXPERTS} ignored: router {router!r} fine-tunes its "
                    f"own experts")
    plan = None
    experts = weights = None
    best_old = None
    if gem:
        experts, weights, best_old, plan = plan_new_unit(cfg, few, num_new)
        logger.info(f"new unit {few} -> experts {experts} (old rows fixed; appended experts: {num_new})")
    new_cfg = adapted_config(cfg, few, [new_test], experts, weights, num_new)
    new_cfg.SOLVER.MAX_ITER = int(a.MAX_ITER)
    new_cfg.SOLVER.BASE_LR = float(a.BASE_LR)
    new_cfg.SOLVER.STEPS = ()
    new_cfg.SOLVER.WARMUP_ITERS = 0
    new_cfg.SOLVER.CHECKPOINT_PERIOD = int(a.MAX_ITER)
    new_cfg.TEST.EVAL_PERIOD = 0
    new_cfg.freeze()
    write_config(new_cfg, os.path.join(out_dir, "config.yaml"))

    state = torch.load(args.weights, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    old_used = experts_of_units(list(cfg.MODEL.GEM.MAPPING)) if gem else None

    def prepare(model):
        load_extended_weights(model, state, old_classes, old_experts, best_old)
        return select_trainable(model, router, old_classes, old_used)

    trainer = AdaptTrainer(new_cfg, few, prepare)
    before_cfg = new_cfg.clone()
    before_cfg.defrost()
    before_cfg.OUTPUT_DIR = os.path.join(out_dir, "before")
    os.makedirs(before_cfg.OUTPUT_DIR, exist_ok=True)
    before = ap_table(GemTrainer.test(before_cfg, trainer.model))
    after = ap_table(trainer.train() or GemTrainer.test(new_cfg, trainer.model))
    result = {
        "router": router, "new_dataset": args.new_dataset, "few_shot_dataset": few, "new_test": new_test,
        "shots": shots, "seed": int(a.SEED), "images": len(DatasetCatalog.get(few)), "iterations": int(a.MAX_ITER),
        "new_experts": num_new, "plan": plan, "mapping": [list(r) for r in new_cfg.MODEL.GEM.MAPPING],
        "units": list(new_cfg.MODEL.GEM.UNITS),
        "trainable_tensors": sorted(trainer.trainable), "before": before, "after": after,
        "old_test": [t for t in new_cfg.DATASETS.TEST if t != new_test],
        "checkpoint": os.path.join(out_dir, "model_final.pth"), "minutes": (time.time() - t0) / 60,
    }
    atomic_write(os.path.join(out_dir, "adapt_result.json"), lambda f: f.write(json.dumps(result, indent=1)),
                 binary=False)
    logger.info("adaptation AP50 before -> after: " + ", ".join(
        f"{d}: {before[d]['AP50']:.1f} -> {after[d]['AP50']:.1f}" for d in after))
    return result


if __name__ == "__main__":
    adapt(parse_args(sys.argv[1:]))
