"""RoutingStatsHook (event storage + routing_stats.json), the curve plot, and the launcher's argument checks."""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import json
import os
from types import SimpleNamespace

import pytest
import torch
from detectron2.utils.events import EventStorage
from PIL import Image

from gem_d2.engine import RoutingStatsHook, launch, resolve_device
from gem_d2.engine.plotting import plot_training_curves, read_metrics


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.routing_stats = {}


def test_routing_stats_hook_writes_shares_and_totals(tmp_path):
    model = _Model()
    trainer = SimpleNamespace(model=model, iter=0)
    hook = RoutingStatsHook(period=2, dataset_names=["photo", "medical"], output_dir=str(tmp_path))
    hook.trainer = trainer
    steps = [torch.tensor([[30.0, 0.0], [0.0, 10.0]]), torch.tensor([[10.0, 0.0], [0.0, 50.0]])]
    with EventStorage(0) as storage:
        trainer.storage = storage
        for it, counts in enumerate(steps):
            trainer.iter = storage.iter = it
            model.routing_stats = {"decoder.0/tokens_per_expert": counts, "decoder.0/sparsity": torch.tensor(0.5 + it)}
            hook.after_step()
        latest = {k: v for k, (v, _) in storage.latest().items()}
        hook.after_train()
    assert latest["routing/decoder.0/expert0"] == pytest.approx(40 / 100)
    assert latest["routing/decoder.0/expert1"] == pytest.approx(60 / 100)
    assert latest["routing/decoder.0/photo/expert0"] == pytest.approx(1.0)
    assert latest["routing/decoder.0/medical/expert1"] == pytest.approx(1.0)
    assert "routing/decoder.0/photo/expert1" not in latest  # zero entries omitted
    assert latest["routing/decoder.0/sparsity"] == pytest.approx(1.0)  # mean of 0.5 and 1.5
    with open(tmp_path / "routing_stats.json") as f:
        saved = json.load(f)
    assert saved == {"datasets": ["photo", "medical"],
                     "tokens_per_dataset_expert": {"decoder.0": [[40.0, 0.0], [0.0, 60.0]]}}


def test_routing_stats_hook_rejects_shape_changes():
    model = _Model()
    hook = RoutingStatsHook(period=0)
    hook.trainer = SimpleNamespace(model=model, iter=0)
    model.routing_stats = {"decoder.0/tokens_per_expert": torch.zeros(2, 2)}
    hook.after_step()
    model.routing_stats = {"decoder.0/tokens_per_expert": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"changed shape from \(2, 2\) to \(2, 3\)"):
        hook.after_step()


def _write_metrics(path, lines):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))


def test_training_curves_from_metrics_json(tmp_path):
    metrics = tmp_path / "metrics.json"
    records = [{"iteration": i, "total_loss": 10.0 - i, "loss_class": 1.0, "loss_class_0": 2.0, "lr": 1e-4}
               for i in range(0, 40, 5)]
    records.append({"iteration": 39, "synth_photo_test/uodb/AP50_voc07": 12.5})
    records.append({"iteration": 20, "total_loss": 3.0})  # a resumed run re-logs iteration 20: last wins
    _write_metrics(metrics, records)
    with open(metrics, "a") as f:
        f.write('{"iteration": 45, "total_lo')  # killed mid-line
    series = read_metrics(str(metrics))
    assert dict(series["total_loss"])[20] == 3.0 and 45 not in dict(series["total_loss"])
    out = plot_training_curves(str(metrics), str(tmp_path / "training_curves.png"))
    with Image.open(out) as im:
        assert im.size[0] > 1000 and im.size[1] > 300  # three panels
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "training_curves.png"]

    _write_metrics(metrics, [{"iteration": 1, "lr": 0.1}])
    with pytest.raises(ValueError, match="no loss series"):
        plot_training_curves(str(metrics), str(tmp_path / "x.png"))
    with open(metrics, "w") as f:
        f.write('{"iteration": 1}\nnot json\n{"iteration": 2}\n')
    with pytest.raises(ValueError, match="metrics.json:2: not a JSON object"):
        read_metrics(str(metrics))


def test_launch_checks_its_arguments():
    calls = []
    launch(lambda *a: calls.append(a), 1, args=(1, 2), device="cpu")  # world size 1: in this process
    assert calls == [(1, 2)]
    with pytest.raises(ValueError, match="num_gpus_per_machine=0"):
        launch(print, 0)
    with pytest.raises(ValueError, match="dist_url='auto' only works on one machine"):
        launch(print, 1, num_machines=2, machine_rank=0, dist_url="auto", device="cpu")
    with pytest.raises(ValueError, match="expected 'auto', 'cpu' or 'cuda'"):
        resolve_device("tpu")
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
