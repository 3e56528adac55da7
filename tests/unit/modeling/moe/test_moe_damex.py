"""The damex router as DAMEX trains it: the published UODB map, the loss as 0.1 x the mean over MoE layers,
tutel's gate noise and batch-prioritised capacity."""
import pytest
import torch
from detectron2.config import get_cfg

import gem_d2  # noqa: F401  (shims before detectron2)
from gem_d2 import model_zoo
from gem_d2.config import add_gem_config
from gem_d2.data.uodb import uodb_dataset_names
from gem_d2.modeling.moe import moe_spec_from_cfg
from gem_d2.modeling.moe.context import RoutingContext
from gem_d2.modeling.moe.damex_map import UODB_DAMEX_MAP, damex_dataset_to_expert
from gem_d2.modeling.moe.gating import capacity_dropped, tutel_capacity
from gem_d2.modeling.moe.layer import build_ffn
from gem_d2.modeling.moe.router_topk import DAMEXRouter

C = 6


def test_uodb_map_is_damex_published_map():
    # DAMEX's code: datasets concatenated in this order get expert = their index, except
    # dataset_map = {8: 5, 9: 1, 10: 1, 11: 1} (kitti -> lisa's expert, voc07 / voc12 / comic -> coco's)
    damex_order = ["clipart", "coco", "deeplesion", "dota", "kitchen", "lisa", "watercolor", "widerface", "kitti",
                   "voc07", "voc12", "comic"]
    dataset_map = {8: 5, 9: 1, 10: 1, 11: 1}
    ours = {"clipart": "uodb_clipart_train", "coco": "uodb_coco_valminusminival",
            "deeplesion": "uodb_deeplesion_trainval", "dota": "uodb_dota_train", "kitchen": "uodb_kitchen_train",
            "lisa": "uodb_lisa_train", "watercolor": "uodb_watercolor_train", "widerface": "uodb_widerface_train",
            "kitti": "uodb_kitti_train", "voc07": "uodb_voc_trainval", "voc12": "uodb_voc_trainval",
            "comic": "uodb_comic_train"}
    published = {}
    for i, name in enumerate(damex_order):
        expert = dataset_map.get(i, i)
        assert published.setdefault(ours[name], expert) == expert  # VOC07 and VOC12 agree (both on COCO's)
    assert UODB_DAMEX_MAP == published
    assert set(UODB_DAMEX_MAP) == set(uodb_dataset_names("train"))
    assert sorted(set(published.values())) == list(range(8))


def test_uodb_baseline_config_uses_the_uodb_map():
    cfg = model_zoo.get_config("baseline_damex_uodb.yaml")
    assert cfg.MODEL.GEM.ROUTER == "damex"
    kwargs = DAMEXRouter.kwargs_from_cfg(cfg, list(cfg.DATASETS.TRAIN))
    assert kwargs["dataset_to_expert"] == [UODB_DAMEX_MAP[d] for d in cfg.DATASETS.TRAIN]
    assert kwargs["num_moe_layers"] == 3 and kwargs["gate_noise"] == 1.0 and kwargs["batch_prioritized"]


def test_explicit_map_forms_and_errors():
    names = ["a_train", "b_train", "c_train"]
    assert damex_dataset_to_expert([["c_train", 1], ["a_train", 0], ["b_train", 0]], names, 2) == [0, 0, 1]
    assert damex_dataset_to_expert([1, 0, 1], names, 2) == [1, 0, 1]
    with pytest.raises(ValueError, match="needs a hand-written dataset -> expert map"):
        damex_dataset_to_expert([], names, 2)
    with pytest.raises(ValueError, match=r"missing \['b_train'\]"):
        damex_dataset_to_expert([["c_train", 1], ["a_train", 0]], names, 2)
    with pytest.raises(ValueError, match="expected an integer in"):
        damex_dataset_to_expert([["a_train", 2], ["b_train", 0], ["c_train", 0]], names, 2)
    with pytest.raises(ValueError, match="names dataset 'a_train' twice"):
        damex_dataset_to_expert([["a_train", 0], ["a_train", 1], ["c_train", 0]], names, 2)
    with pytest.raises(ValueError, match="use 8 experts"):
        damex_dataset_to_expert([], ["uodb_kitti_train", "uodb_comic_train"], 4)
    assert damex_dataset_to_expert([], ["uodb_kitti_train", "uodb_comic_train"], 8) == [5, 1]


def test_loss_is_coef_times_the_mean_over_three_layers():
    cfg = add_gem_config(get_cfg())
    cfg.DATASETS.TRAIN = ("d0", "d1")
    cfg.MODEL.GEM.ROUTER = "damex"
    cfg.MODEL.GEM.NUM_EXPERTS = 3
    cfg.MODEL.GEM.MOE_LAYERS = ["decoder.0", "decoder.2", "decoder.4"]
    cfg.MODEL.GEM.DAMEX.DATASET_TO_EXPERT = [["d0", 2], ["d1", 0]]
    spec = moe_spec_from_cfg(cfg, ["d0", "d1"])
    torch.manual_seed(0)
    layers = [build_ffn(name, C, 12, 0.0, "relu", spec).double().train() for name in spec.layers]
    x = torch.randn(2, 5, C, dtype=torch.float64)
    ctx = RoutingContext(dataset_ids=torch.tensor([1, 0]))
    targets = [0] * 5 + [2] * 5  # image 0 is d1 -> expert 0, image 1 is d0 -> expert 2
    ces = []
    for layer in layers:
        logits = x.reshape(-1, C) @ layer.router.gate.weight.double().T
        ces.append(sum(-float(torch.log_softmax(logits[t], 0)[targets[t]]) for t in range(10)) / 10)
        layer(x, ctx)
    total = sum(float(v) for k, v in ctx.aux_losses.items() if k.startswith("loss_damex_"))
    assert len(ctx.aux_losses) == 3
    assert total == pytest.approx(0.1 * sum(ces) / 3, rel=1e-12)


def test_batch_prioritised_capacity_keeps_the_most_confident_tokens():
    index = torch.zeros(5, 1, dtype=torch.long)  # every token wants expert 0, which has room for 2
    valid = torch.tensor([True, True, True, False, True])
    priority = torch.tensor([0.1, 0.9, 0.5, 0.99, 0.7])  # token 3 is padding: it never counts
    assert capacity_dropped(index, valid, 2, 2)[:, 0].tolist() == [False, False, True, True, True]
    assert capacity_dropped(index, valid, 2, 2, priority)[:, 0].tolist() == [True, False, True, True, False]
    assert tutel_capacity(1.25, 10, 1, 4) == 3 and tutel_capacity(1.0, 8, 2, 4) == 4
    assert tutel_capacity(0.0, 10, 1, 4) == 10


def test_gate_noise_in_training_only_and_the_loss_uses_clean_logits():
    torch.manual_seed(0)
    router = DAMEXRouter(C, 4, dataset_to_expert=[1, 3], gate_noise=1.0, capacity_factor=0.0).double()
    from gem_d2.modeling.moe.base import TokenBatch

    x = torch.randn(8, C, dtype=torch.float64)
    tokens = TokenBatch(x, torch.tensor([0] * 4 + [1] * 4), None, torch.ones(8, dtype=torch.bool), (2, 4),
                        RoutingContext(dataset_ids=torch.tensor([0, 1])))
    logits = x @ router.gate.weight.T
    router.eval()
    plan = router.route(tokens)
    torch.testing.assert_close(plan.combine_weight[:, 0], logits.softmax(-1).max(-1).values)
    router.train()
    torch.manual_seed(5)
    plan = router.route(tokens)
    torch.manual_seed(5)
    noisy = logits + torch.randn_like(logits) / 4
    torch.testing.assert_close(plan.combine_weight[:, 0], noisy.softmax(-1).max(-1).values)
    assert plan.expert_index[:, 0].tolist() == noisy.argmax(-1).tolist()
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([1] * 4 + [3] * 4))
    assert float(plan.aux_losses["damex"]) == pytest.approx(0.1 * float(ce), rel=1e-12)
