"""A diverged run stops with an error naming the iteration and the values, and saves, tags and evaluates nothing
after it (the tiny GEM-DINO, in-process, a few iterations)."""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import os

import pytest
import torch

from gem_d2.data import synthetic
from gem_d2.engine.divergence import TrainingDivergedError
from gem_d2.engine.setup import build_cfg
from gem_d2.engine.trainer import GemTrainer

TRAIN = ("synth_photo_train", "synth_medical_train")


def _trainer(tiny_config, out, max_iter):
    cfg = build_cfg(tiny_config, [
        "OUTPUT_DIR", str(out), "DATASETS.SYNTH.ROOT", synthetic.registered_synthetic_root(),
        "DATASETS.TRAIN", str(TRAIN), "DATASETS.TEST", "('synth_photo_test',)", "MODEL.GEM.UNITS", str(list(TRAIN)),
        "MODEL.GEM.MAPPING", "[[0], [1]]", "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "1",
        "TEST.UODB_COCO_AP", "False"])
    cfg.freeze()
    torch.manual_seed(0)
    trainer = GemTrainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def _break_at(trainer, iteration, how):
    """Make the training forward of ``iteration`` return a NaN loss, or a finite loss with NaN gradients."""
    model = trainer.model
    forward = model.forward

    def broken(batched_inputs):
        out = forward(batched_inputs)
        if isinstance(out, dict) and trainer.iter == iteration:
            p = next(model.parameters())
            if how == "loss":
                out["loss_bbox"] = out["loss_bbox"] * float("nan")
            else:  # value 0, gradient NaN: the optimizer step turns the weights into NaN
                out["loss_zero"] = torch.sqrt((p - p.detach()).abs()).sum()
        return out

    model.forward = broken


def _files(out):
    with open(os.path.join(out, "last_checkpoint")) as f:
        tagged = f.read()
    return tagged, sorted(n for n in os.listdir(out) if n.endswith(".pth") or ".tmp" in n)


def test_nan_gradients_save_and_tag_nothing(small_synth, tiny_config, tmp_path):
    out = tmp_path / "out"
    trainer = _trainer(tiny_config, out, max_iter=4)
    _break_at(trainer, 1, "grad")
    with pytest.raises(TrainingDivergedError, match=r"(?s)iteration 1: refusing to save .*model_0000001\.pth.*"
                                                    r"non-finite .*last_checkpoint still names .*model_0000000\.pth"):
        trainer.train()
    # before: model_0000001.pth held NaN weights and was tagged, so --resume diverged again
    assert _files(out) == ("model_0000000.pth", ["model_0000000.pth"])
    assert not (out / "results.json").exists()
    with pytest.raises(TrainingDivergedError, match="refusing to save"):
        trainer.checkpointer.save("model_manual")


def test_nan_loss_at_the_last_iteration_evaluates_and_saves_nothing(small_synth, tiny_config, tmp_path):
    out = tmp_path / "out"
    trainer = _trainer(tiny_config, out, max_iter=3)
    _break_at(trainer, 2, "loss")
    with pytest.raises(TrainingDivergedError, match=r"(?s)iteration 2: non-finite loss at iteration 2: loss_bbox=nan"
                                                    r".*last_checkpoint still names .*model_0000001\.pth"):
        trainer.train()
    # before: the final evaluation ran on the failed run and wrote results.json / results_table.md
    assert _files(out) == ("model_0000001.pth", ["model_0000000.pth", "model_0000001.pth"])
    assert not (out / "results.json").exists() and not (out / "inference").exists()
