"""Hungarian matcher: cost matrix vs float64 hand formulas, optimality vs brute force."""
import itertools
import math

import pytest
import torch

from gem_d2.layers.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
    paired_generalized_box_iou,
)
from gem_d2.modeling.dino.matcher import HungarianMatcher


def naive_giou(a, b):
    """a, b: cxcywh tuples."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def naive_cost(logit, box, label, tbox, wc=2.0, wb=5.0, wg=2.0, alpha=0.25, gamma=2.0):
    p = 1.0 / (1.0 + math.exp(-logit[label]))
    c_class = alpha * (1 - p) ** gamma * (-math.log(p)) - (1 - alpha) * p ** gamma * (-math.log(1 - p))
    c_l1 = sum(abs(x - y) for x, y in zip(box, tbox))
    return wc * c_class + wb * c_l1 - wg * naive_giou(box, tbox)


def random_case(q, m, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, q, k, generator=g, dtype=torch.float64) * 2
    boxes = torch.cat([0.2 + 0.6 * torch.rand(1, q, 2, generator=g, dtype=torch.float64),
                       0.05 + 0.3 * torch.rand(1, q, 2, generator=g, dtype=torch.float64)], -1)
    labels = torch.randint(0, k, (m,), generator=g)
    tboxes = torch.cat([0.2 + 0.6 * torch.rand(m, 2, generator=g, dtype=torch.float64),
                        0.05 + 0.3 * torch.rand(m, 2, generator=g, dtype=torch.float64)], -1)
    return logits, boxes, [{"labels": labels, "boxes": tboxes}]


def brute_force_min(cost):
    """Minimum total cost over all injective maps targets -> queries (Q >= M)."""
    q, m = len(cost), len(cost[0]) if cost else 0
    best = math.inf
    for perm in itertools.permutations(range(q), m):
        best = min(best, sum(cost[perm[t]][t] for t in range(m)))
    return best


@pytest.mark.parametrize("q,m,seed", [(5, 3, 0), (6, 2, 1), (4, 4, 2), (3, 3, 3), (6, 5, 4), (5, 1, 5)])
def test_matcher_is_optimal(q, m, seed):
    logits, boxes, targets = random_case(q, m, seed=seed)
    matcher = HungarianMatcher()
    lg, bx, lb, tb = logits[0].tolist(), boxes[0].tolist(), targets[0]["labels"].tolist(), targets[0]["boxes"].tolist()
    cost = [[naive_cost(lg[i], bx[i], lb[t], tb[t]) for t in range(m)] for i in range(q)]
    # the module's cost matrix equals the hand formula
    module_cost = matcher.cost_matrix(logits[0], boxes[0], targets[0]["labels"], targets[0]["boxes"])
    assert torch.allclose(module_cost, torch.tensor(cost, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    ((pred_idx, tgt_idx),) = matcher(logits, boxes, targets)
    assert pred_idx.dtype == tgt_idx.dtype == torch.long
    assert len(pred_idx) == m and sorted(tgt_idx.tolist()) == list(range(m))
    assert len(set(pred_idx.tolist())) == m
    total = sum(cost[i][t] for i, t in zip(pred_idx.tolist(), tgt_idx.tolist()))
    assert total == pytest.approx(brute_force_min(cost), abs=1e-9)


def test_matcher_no_targets_and_batch():
    logits, boxes, t0 = random_case(4, 2, seed=7)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4, dtype=torch.float64)}
    logits2 = torch.cat([logits, logits])
    boxes2 = torch.cat([boxes, boxes])
    out = HungarianMatcher()(logits2, boxes2, [empty, t0[0]])
    assert out[0][0].numel() == 0 and out[0][1].numel() == 0 and out[0][0].dtype == torch.long
    single = HungarianMatcher()(logits, boxes, t0)[0]
    assert torch.equal(out[1][0], single[0]) and torch.equal(out[1][1], single[1])


def test_matcher_obvious_assignment():
    # each target has a query with its exact box and a confident logit for its class
    tboxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3]])
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.7, 0.6, 0.1, 0.3], [0.9, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]]])
    logits = torch.full((1, 4, 3), -5.0)
    logits[0, 1, 2] = logits[0, 3, 0] = 5.0
    (pi, ti), = HungarianMatcher()(logits, boxes, [{"labels": torch.tensor([0, 2]), "boxes": tboxes}])
    assert dict(zip(ti.tolist(), pi.tolist())) == {0: 3, 1: 1}


def test_matcher_rejects_bad_targets():
    logits, boxes, targets = random_case(3, 2)
    with pytest.raises(ValueError, match="target dicts"):
        HungarianMatcher()(logits, boxes, targets * 2)
    with pytest.raises(ValueError, match="not finite"):
        HungarianMatcher()(logits * float("nan"), boxes, targets)


def test_box_ops_against_hand_values():
    a = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    b = torch.tensor([[0.55, 0.5, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2]], dtype=torch.float64)
    xa = box_cxcywh_to_xyxy(a)
    assert torch.allclose(xa[0], torch.tensor([0.4, 0.4, 0.6, 0.6], dtype=torch.float64))
    assert torch.allclose(box_xyxy_to_cxcywh(xa), a)
    # overlap: inter 0.03, union 0.05, hull 0.05 -> 0.6 ; disjoint: 0 - (0.64 - 0.08) / 0.64 = -0.875
    g = paired_generalized_box_iou(xa, box_cxcywh_to_xyxy(b))
    assert torch.allclose(g, torch.tensor([0.6, -0.875], dtype=torch.float64), atol=1e-12)
    full = generalized_box_iou(xa, box_cxcywh_to_xyxy(b))
    assert torch.allclose(full.diagonal(), g)
    assert full[0, 1].item() == pytest.approx(naive_giou(a[0].tolist(), b[1].tolist()), abs=1e-12)
    x = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(inverse_sigmoid(x)[1:3], torch.tensor([math.log(1 / 3), 0.0], dtype=torch.float64))
    # clamped at eps = 1e-3 (the references' value): log(1e-3 / 1) and log(1 / 1e-3)
    assert inverse_sigmoid(x)[0].item() == pytest.approx(math.log(1e-3), rel=1e-9)
    assert inverse_sigmoid(x)[3].item() == pytest.approx(-math.log(1e-3), rel=1e-9)
    near = torch.tensor([5e-4, 2e-3, 1 - 5e-4], dtype=torch.float64)
    assert torch.allclose(inverse_sigmoid(near), torch.log(torch.tensor([1e-3 / (1 - 5e-4), 2e-3 / (1 - 2e-3),
                                                                         (1 - 5e-4) / 1e-3], dtype=torch.float64)))
