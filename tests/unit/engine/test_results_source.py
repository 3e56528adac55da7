"""results.json and uodb_metrics_<dataset>.json record the iteration and the checkpoint they come from:
the trainer's iteration and last checkpoint during training, MODEL.WEIGHTS and its stored iteration for
--eval-only (the tiny GEM-DINO, in-process)."""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import argparse
import json
import os

import torch

from gem_d2 import evaluation as gem_evaluation
from gem_d2.data import synthetic
from gem_d2.engine.setup import build_cfg, train_main
from gem_d2.engine.trainer import GemTrainer

TRAIN = ("synth_photo_train", "synth_medical_train")


def _opts(out, **extra):
    opts = ["OUTPUT_DIR", str(out), "DATASETS.SYNTH.ROOT", synthetic.registered_synthetic_root(),
            "DATASETS.TRAIN", str(TRAIN), "DATASETS.TEST", "('synth_photo_test',)", "MODEL.GEM.UNITS",
            str(list(TRAIN)), "MODEL.GEM.MAPPING", "[[0], [1]]", "TEST.UODB_COCO_AP", "False"]
    for k, v in extra.items():
        opts += [k.replace("__", "."), str(v)]
    return opts


def _sources(out):
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)["source"]
    with open(os.path.join(out, "inference", "synth_photo_test", "uodb_metrics_synth_photo_test.json")) as f:
        metrics = json.load(f)["source"]
    return results, metrics


def test_training_and_eval_only_results_name_their_iteration_and_checkpoint(small_synth, tiny_config, tmp_path,
                                                                           monkeypatch):
    seen = []
    real = gem_evaluation.summarize_results
    monkeypatch.setattr(gem_evaluation, "summarize_results",
                        lambda results, output_dir=None, source=None: seen.append(source) or real(
                            results, output_dir, source=source))
    out = tmp_path / "train"
    cfg = build_cfg(tiny_config, _opts(out, SOLVER__MAX_ITER=3, SOLVER__CHECKPOINT_PERIOD=2, TEST__EVAL_PERIOD=1))
    cfg.freeze()
    torch.manual_seed(0)
    trainer = GemTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    final = os.path.abspath(os.path.join(out, "model_final.pth"))
    second = os.path.abspath(os.path.join(out, "model_0000001.pth"))
    # iteration 0 was evaluated but not saved; iteration 1 was saved before its evaluation; then the final model
    assert seen == [{"iteration": 0, "checkpoint": None}, {"iteration": 1, "checkpoint": second},
                    {"iteration": 2, "checkpoint": final}]
    assert _sources(out) == ({"iteration": 2, "checkpoint": final},) * 2

    evaluated = tmp_path / "eval"
    args = argparse.Namespace(config_file=tiny_config, eval_only=True, resume=False, num_gpus=1, num_machines=1,
                              machine_rank=0, dist_url="auto", opts=_opts(evaluated, MODEL__WEIGHTS=final))
    train_main(args)
    assert _sources(evaluated) == ({"iteration": 2, "checkpoint": final},) * 2
    with open(os.path.join(out, "results.json")) as a, open(os.path.join(evaluated, "results.json")) as b:
        assert json.load(a) == json.load(b)  # same weights, same file: the same record
