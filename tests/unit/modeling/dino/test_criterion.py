"""SetCriterion vs hand-computed float64 values: focal, L1, GIoU, normalisation, class blocks, DN."""
import math
from pathlib import Path

import pytest
import torch

from gem_d2.modeling.dino.criterion import SetCriterion, average_num_boxes
from gem_d2.modeling.dino.denoising import prepare_cdn
from gem_d2.modeling.dino.matcher import HungarianMatcher

WEIGHTS = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
F64 = torch.float64


class FixedMatcher(torch.nn.Module):
    """Returns a given assignment, to test the losses in isolation from matching."""

    def __init__(self, indices):
        super().__init__()
        self.indices = indices

    def forward(self, pred_logits, pred_boxes, targets):
        return [(torch.tensor(p, dtype=torch.long), torch.tensor(t, dtype=torch.long)) for p, t in self.indices]


def focal(x, t, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-x))
    if t:
        return alpha * (1 - p) ** gamma * -math.log(p)
    return (1 - alpha) * p ** gamma * -math.log(1 - p)


def target(labels, boxes):
    return {"labels": torch.tensor(labels, dtype=torch.long), "boxes": torch.tensor(boxes, dtype=F64).view(-1, 4)}


def test_focal_term_literal_values():
    # p = 0.5: positive 0.25 * 0.25 * ln 2, negative 0.75 * 0.25 * ln 2
    assert focal(0.0, 1) == pytest.approx(0.0433216988, abs=1e-9)
    assert focal(0.0, 0) == pytest.approx(0.1299650964, abs=1e-9)


def test_losses_match_hand_values():
    logits = torch.tensor([[[0.5, 2.0], [-1.0, 0.0]]], dtype=F64, requires_grad=True)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]]], dtype=F64, requires_grad=True)
    targets = [target([1], [0.55, 0.5, 0.2, 0.2])]
    crit = SetCriterion(2, FixedMatcher([([0], [0])]), WEIGHTS, emit_zero_dn=False)
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou"}
    expected_class = focal(0.5, 0) + focal(2.0, 1) + focal(-1.0, 0) + focal(0.0, 0)
    assert losses["loss_class"].item() == pytest.approx(expected_class, abs=1e-12)
    assert losses["loss_bbox"].item() == pytest.approx(5 * 0.05, abs=1e-12)
    assert losses["loss_giou"].item() == pytest.approx(2 * (1 - 0.6), abs=1e-12)  # IoU 0.6, hull = union
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and boxes.grad[0, 1].abs().sum() == 0


def test_disjoint_boxes_giou_and_weights():
    logits = torch.zeros(1, 1, 3, dtype=F64)
    boxes = torch.tensor([[[0.2, 0.2, 0.2, 0.2]]], dtype=F64)
    targets = [target([2], [0.8, 0.8, 0.2, 0.2])]
    weights = {"loss_class": 3.0, "loss_bbox": 0.5, "loss_giou": 4.0}
    losses = SetCriterion(3, FixedMatcher([([0], [0])]), weights, emit_zero_dn=False)(
        {"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_class"].item() == pytest.approx(3 * (2 * focal(0.0, 0) + focal(0.0, 1)), abs=1e-12)
    assert losses["loss_bbox"].item() == pytest.approx(0.5 * 1.2, abs=1e-12)
    assert losses["loss_giou"].item() == pytest.approx(4 * 1.875, abs=1e-12)  # GIoU = -(0.64 - 0.08) / 0.64


def _random_outputs(n, q, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, q, k, generator=g, dtype=F64)
    boxes = torch.cat([0.2 + 0.6 * torch.rand(n, q, 2, generator=g, dtype=F64),
                       0.05 + 0.3 * torch.rand(n, q, 2, generator=g, dtype=F64)], -1)
    return logits, boxes


def test_num_boxes_normalisation_over_batch():
    logits, boxes = _random_outputs(2, 4, 3, seed=1)
    t0 = target([0], [0.3, 0.3, 0.1, 0.2])
    t1 = target([1, 2], [[0.6, 0.6, 0.2, 0.2], [0.4, 0.5, 0.3, 0.1]])
    idx0, idx1 = ([2], [0]), ([0, 3], [1, 0])
    batch = SetCriterion(3, FixedMatcher([idx0, idx1]), WEIGHTS, emit_zero_dn=False)(
        {"pred_logits": logits, "pred_boxes": boxes}, [t0, t1])
    one = SetCriterion(3, FixedMatcher([idx0]), WEIGHTS, emit_zero_dn=False)(
        {"pred_logits": logits[:1], "pred_boxes": boxes[:1]}, [t0])
    two = SetCriterion(3, FixedMatcher([idx1]), WEIGHTS, emit_zero_dn=False)(
        {"pred_logits": logits[1:], "pred_boxes": boxes[1:]}, [t1])
    for key in batch:  # batch losses are sums / 3; single-image ones sums / 1 and / 2
        assert (3 * batch[key]).item() == pytest.approx((one[key] + 2 * two[key]).item(), rel=1e-12)


def test_class_block_masking():
    logits, boxes = _random_outputs(2, 3, 5, seed=2)
    logits.requires_grad_(True)
    masks = torch.tensor([[True, True, False, False, False], [False, False, True, True, True]])
    targets = [target([1], [0.5, 0.5, 0.2, 0.2]), target([4, 2], [[0.3, 0.3, 0.2, 0.1], [0.7, 0.6, 0.1, 0.2]])]
    crit = SetCriterion(5, HungarianMatcher(), WEIGHTS, emit_zero_dn=False)
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets, masks)
    losses["loss_class"].backward()
    assert torch.equal(logits.grad[~masks[:, None, :].expand_as(logits)], torch.zeros(2 * 3 * 5 - 15, dtype=F64))

    # hand value: focal over the block's classes only, with the matched query of each target positive
    matched = HungarianMatcher()(logits.detach(), boxes, targets)
    positives = {(i, int(p), int(targets[i]["labels"][t]))
                 for i, (ps, ts) in enumerate(matched) for p, t in zip(ps, ts)}
    expected = sum(focal(logits[i, q, c].item(), (i, q, c) in positives)
                   for i in range(2) for q in range(3) for c in range(5) if masks[i, c])
    assert losses["loss_class"].item() == pytest.approx(expected / 3, abs=1e-12)

    # logits outside the blocks, even non-finite ones, change nothing
    other = logits.detach().clone()
    other[0, :, 2:] = torch.tensor([50.0, float("inf"), -7.0], dtype=F64)
    other[1, :, :2] = 123.0
    again = crit({"pred_logits": other, "pred_boxes": boxes}, targets, masks)
    for key in losses:
        assert again[key].item() == losses[key].item()


def test_labels_outside_block_rejected():
    logits, boxes = _random_outputs(1, 3, 4, seed=3)
    masks = torch.tensor([[True, True, False, False]])
    with pytest.raises(ValueError, match=r"labels \[3\] outside its class block"):
        SetCriterion(4, HungarianMatcher(), WEIGHTS)({"pred_logits": logits, "pred_boxes": boxes},
                                                    [target([0, 3], [[.5, .5, .2, .2], [.3, .3, .1, .1]])], masks)
    with pytest.raises(KeyError, match="loss_giou"):
        SetCriterion(4, HungarianMatcher(), {"loss_class": 1.0, "loss_bbox": 5.0})


def test_images_without_objects():
    logits, boxes = _random_outputs(2, 4, 3, seed=4)
    logits.requires_grad_(True)
    boxes.requires_grad_(True)
    empty = target([], [])
    outputs = {"pred_logits": logits, "pred_boxes": boxes,
               "aux_outputs": [{"pred_logits": logits * 2, "pred_boxes": boxes}]}
    losses = SetCriterion(3, HungarianMatcher(), WEIGHTS)(outputs, [empty, empty])
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    # no objects: num_boxes clamps to 1, every (query, class) is a negative
    expected = sum(focal(x, 0) for x in logits.detach().flatten().tolist())
    assert losses["loss_class"].item() == pytest.approx(expected, abs=1e-12)
    for key in ("loss_class_dn", "loss_bbox_dn_0"):  # zero DN losses keep the keys constant
        assert losses[key].item() == 0
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(boxes.grad).all()

    # one empty image next to a non-empty one
    mixed = SetCriterion(3, HungarianMatcher(), WEIGHTS)({"pred_logits": logits, "pred_boxes": boxes},
                                                         [empty, target([1], [0.5, 0.5, 0.2, 0.2])])
    assert all(torch.isfinite(v) for v in mixed.values()) and mixed["loss_bbox"].item() > 0


def test_aux_and_encoder_keys_and_values():
    logits, boxes = _random_outputs(1, 4, 3, seed=5)
    targets = [target([0, 2], [[0.3, 0.3, 0.2, 0.1], [0.6, 0.7, 0.2, 0.2]])]
    last = {"pred_logits": logits, "pred_boxes": boxes}
    outputs = dict(last, aux_outputs=[dict(last), dict(last)], enc_outputs=dict(last))
    losses = SetCriterion(3, HungarianMatcher(), WEIGHTS, emit_zero_dn=False)(outputs, targets)
    names = ("loss_class", "loss_bbox", "loss_giou")
    assert set(losses) == {n + s for n in names for s in ("", "_0", "_1", "_enc")}
    for n in names:
        for s in ("_0", "_1", "_enc"):
            assert losses[n + s].item() == losses[n].item()


def _dn_setup():
    torch.manual_seed(0)
    targets = [target([1, 0], [[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]]), target([], []),
               target([2], [0.5, 0.4, 0.2, 0.3])]
    label_enc = torch.nn.Embedding(3, 4).double()
    _, _, _, meta = prepare_cdn(targets, 4, 0.5, 1.0, 3, label_enc, num_queries=3)
    return targets, meta


def test_dn_losses_fixed_correspondence():
    targets, meta = _dn_setup()
    groups, b, pad = meta["num_dn_group"], meta["single_pad"], meta["pad_size"]
    assert (groups, b, pad) == (2, 2, 8)
    g = torch.Generator().manual_seed(6)
    dn_logits = torch.randn(3, pad, 3, generator=g, dtype=F64)
    dn_boxes = torch.cat([0.2 + 0.6 * torch.rand(3, pad, 2, generator=g, dtype=F64),
                          0.05 + 0.3 * torch.rand(3, pad, 2, generator=g, dtype=F64)], -1)
    match_logits, match_boxes = _random_outputs(3, 3, 3, seed=7)
    outputs = {"pred_logits": match_logits, "pred_boxes": match_boxes,
               "aux_outputs": [{"pred_logits": match_logits, "pred_boxes": match_boxes}],
               "dn_outputs": {"pred_logits": dn_logits, "pred_boxes": dn_boxes,
                              "aux_outputs": [{"pred_logits": dn_logits, "pred_boxes": dn_boxes}]}}
    losses = SetCriterion(3, HungarianMatcher(), WEIGHTS)(outputs, targets, None, meta)

    # positives: slot g*2B + k <-> target k; everything else (negatives, empty slots) is "no object"
    num = 3 * groups
    cls, l1 = 0.0, 0.0
    for i, t in enumerate(targets):
        labels, tb = t["labels"].tolist(), t["boxes"].tolist()
        for slot in range(pad):
            k = slot % (2 * b)
            positive = k < len(labels)
            for c in range(3):
                cls += focal(dn_logits[i, slot, c].item(), positive and labels[k] == c)
            if positive:
                l1 += sum(abs(x - y) for x, y in zip(dn_boxes[i, slot].tolist(), tb[k]))
    assert losses["loss_class_dn"].item() == pytest.approx(cls / num, abs=1e-12)
    assert losses["loss_bbox_dn"].item() == pytest.approx(5 * l1 / num, abs=1e-12)
    assert losses["loss_giou_dn_0"].item() == losses["loss_giou_dn"].item() > 0

    # exact positive boxes give zero DN box losses
    exact = dn_boxes.clone()
    for i, t in enumerate(targets):
        for gi in range(groups):
            exact[i, gi * 2 * b: gi * 2 * b + len(t["labels"])] = t["boxes"]
    outputs["dn_outputs"] = {"pred_logits": dn_logits, "pred_boxes": exact, "aux_outputs": []}
    outputs.pop("aux_outputs")
    zero = SetCriterion(3, HungarianMatcher(), WEIGHTS)(outputs, targets, None, meta)
    assert zero["loss_bbox_dn"].item() == pytest.approx(0, abs=1e-12)
    assert zero["loss_giou_dn"].item() == pytest.approx(0, abs=1e-12)


def test_dn_arguments_checked():
    targets, meta = _dn_setup()
    logits, boxes = _random_outputs(3, 3, 3, seed=8)
    with pytest.raises(ValueError, match="together"):
        SetCriterion(3, HungarianMatcher(), WEIGHTS)({"pred_logits": logits, "pred_boxes": boxes}, targets, None, meta)
    no_dn = SetCriterion(3, HungarianMatcher(), WEIGHTS, emit_zero_dn=False)(
        {"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert not any("_dn" in k for k in no_dn)


_RANK1 = """
import datetime
import torch
import torch.distributed as dist
from gem_d2.modeling.dino.criterion import average_num_boxes
dist.init_process_group("gloo", init_method="file://{init}", rank=1, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
targets = [dict(labels=torch.zeros(c, dtype=torch.long), boxes=torch.zeros(c, 4)) for c in (2, 3)]
print(repr(average_num_boxes(targets, torch.device("cpu"))))
dist.destroy_process_group()
"""


def test_num_boxes_all_reduced_across_ranks(tmp_path):
    """Two gloo ranks: this process (1 target) and a subprocess (2 + 3): (1 + 5) / 2 = 3 on both."""
    import datetime
    import subprocess
    import sys

    import torch.distributed as dist

    assert average_num_boxes([target([], [])], torch.device("cpu")) == 1.0  # no process group: clamp to 1
    root = str(Path(__file__).resolve().parents[4])
    init = tmp_path / "init"
    proc = subprocess.Popen([sys.executable, "-c", _RANK1.format(init=init)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=root)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
        try:
            mine = average_num_boxes([target([0], [0.5, 0.5, 0.1, 0.1]), target([], [])], torch.device("cpu"))
        finally:
            dist.destroy_process_group()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert (mine, float(out.strip().splitlines()[-1])) == (3.0, 3.0)


def test_half_precision_outputs_use_float32_losses():
    logits, boxes = _random_outputs(1, 4, 3, seed=9)
    targets = [target([1], [0.5, 0.5, 0.2, 0.2])]
    crit = SetCriterion(3, HungarianMatcher(), WEIGHTS, emit_zero_dn=False)
    half = crit({"pred_logits": logits.bfloat16(), "pred_boxes": boxes.bfloat16()}, targets)
    full = crit({"pred_logits": logits.bfloat16().float(), "pred_boxes": boxes.bfloat16().float()}, targets)
    for key in full:
        assert half[key].dtype == torch.float32 and half[key].item() == full[key].item()
