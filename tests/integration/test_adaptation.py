"""Few-shot adaptation: planning around fixed rows, K-shot sampling, weight extension, and tools/adapt.py end to end.

The end-to-end test trains a tiny GEM-DINO on two generated domains (photo, cartoon), adapts it to a third
(sketch, 2-shot, one appended expert) with tools/adapt.py, and checks that the old datasets' detections are
bit-identical before and after, and that the new dataset's AP50 rose.
"""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from gem_d2.data import few_shot_records
from gem_d2.planner import PlanInfeasibleError, expert_keys_from_mapping, plan_new_units
from gem_d2.planner.problem import slack_capacities

pytestmark = pytest.mark.slow

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


# ------------------------------------------------------------------------------------------ planning
def _pinned_lp_value(w_new, s_new, fixed, s_old, k, caps):
    """scipy HiGHS on the full LP with the old rows pinned by bounds; returns the new rows' objective (beta=0)."""
    m_old, (m_new, n) = len(fixed), w_new.shape
    m = m_old + m_new
    c = np.zeros((m, n))
    c[m_old:] = -w_new
    bounds = []
    for u in range(m):
        for j in range(n):
            if u < m_old:
                v = 1.0 if j in fixed[u] else 0.0
                bounds.append((v, v))
            else:
                bounds.append((0.0, 1.0))
    loads = np.concatenate([s_old, s_new])
    a_eq = np.zeros((m, m * n))
    for u in range(m):
        a_eq[u, u * n:(u + 1) * n] = 1
    b_eq = [len(r) for r in fixed] + [k] * m_new
    a_ub = np.zeros((n, m * n))
    for j in range(n):
        a_ub[j, j::n] = loads
    res = linprog(c.ravel(), A_ub=a_ub, b_ub=caps, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
    assert res.status == 0
    return -res.fun


@pytest.mark.parametrize("seed", range(6))
def test_plan_new_units_equals_pinned_full_lp(seed):
    rng = np.random.default_rng(seed)
    n, m_old, m_new, k = 4, 5, 2, 1
    fixed = [[int(j)] for j in rng.permutation(np.arange(m_old) % n)]
    s_old, s_new = rng.uniform(0.5, 2, m_old), rng.uniform(0.2, 1, m_new)
    w_new = rng.uniform(0, 1, (m_new, n))
    fixed_load = np.zeros(n)
    for u, row in enumerate(fixed):
        fixed_load[row] += s_old[u]
    caps = fixed_load + rng.uniform(0.2, 1.2, n)  # old rows fit; spare capacity varies by expert
    ext = plan_new_units(w_new, s_new, fixed, s_old, k=k, beta=0.0, capacities=caps, solver="HIGHS")
    assert ext.plan.lp_value == pytest.approx(_pinned_lp_value(w_new, s_new, fixed, s_old, k, caps), abs=1e-6)
    np.testing.assert_allclose(ext.fixed_load, fixed_load)
    # slack formula: capacities over all units, old and new
    auto = plan_new_units(w_new, s_new, fixed, s_old, k=k, slack=0.3, beta=0.0, solver="HIGHS")
    np.testing.assert_allclose(auto.capacities, slack_capacities(np.concatenate([s_old, s_new]),
                                                                 np.ones(m_old + m_new, dtype=int), n, 0.3))
    # every new unit gets k experts; the rounded mapping stays within capacity + the largest unit load
    assert all(len(e) == k for e in ext.experts)
    load = ext.fixed_load.copy()
    for u, row in enumerate(ext.experts):
        load[row] += s_new[u]
    assert np.all(load <= caps + max(s_new.max(), s_old.max()) + 1e-9)


def test_plan_new_units_takes_best_expert_with_spare_capacity():
    # experts 0 and 1 are full (old loads 1 each, capacity 1.1); the new unit prefers 0 but only 2 fits
    ext = plan_new_units([[0.7, 0.2, 0.1]], [0.5], [[0], [1]], [1.0, 1.0], capacities=[1.1, 1.1, 1.1])
    assert ext.experts == [[2]] and ext.weights == [[1.0]]
    # an appended expert (column 3) with the highest affinity is taken
    ext = plan_new_units([[0.3, 0.1, 0.1, 0.5]], [0.5], [[0], [1], [2]], [1.0, 1.0, 1.0], num_new_experts=1)
    assert ext.experts == [[3]]


def test_plan_new_units_bad_inputs():
    with pytest.raises(PlanInfeasibleError, match="no spare capacity"):
        plan_new_units([[0.5, 0.5]], [1.0], [[0], [1]], [1.0, 1.0], capacities=[1.0, 1.0])
    with pytest.raises(ValueError, match="NEW_EXPERTS"):
        plan_new_units([[0.2, 0.3, 0.5]], [1.0], [[0]], [1.0], num_new_experts=2)
    with pytest.raises(ValueError, match=r"fixed_experts\[0\]"):
        plan_new_units([[0.5, 0.5]], [1.0], [[5]], [1.0])


def test_expert_keys_from_mapping():
    p = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    keys = expert_keys_from_mapping(p, [[0], [0], [1]], 3, fill=[5.0, 5.0])
    np.testing.assert_allclose(keys[0], [0.5, 0.5])
    np.testing.assert_allclose(keys[1], [2 ** -0.5, 2 ** -0.5])
    np.testing.assert_allclose(keys[2], [5.0, 5.0])
    with pytest.raises(ValueError, match="no old unit"):
        expert_keys_from_mapping(p, [[0], [0], [1]], 3)


# ------------------------------------------------------------------------------------------ K-shot
def _rec(i, cats):
    return {"file_name": f"{i}.png", "annotations": [{"category_id": c} for c in cats]}


def test_few_shot_records_per_class_and_deterministic():
    records = [_rec(i, [i % 3]) for i in range(30)] + [_rec(30, [0, 1])]
    sub = few_shot_records(records, 3, shots=2, seed=0)
    for c in range(3):
        assert sum(1 for r in sub if any(a["category_id"] == c for a in r["annotations"])) >= 2
    assert len(sub) <= 6
    assert [r["file_name"] for r in sub] == [r["file_name"] for r in few_shot_records(records, 3, 2, 0)]
    assert [r["file_name"] for r in sub] != [r["file_name"] for r in few_shot_records(records, 3, 2, 1)]
    sub[0]["annotations"].clear()  # copies: the source records are untouched
    assert all(r["annotations"] for r in records)
    # a class with fewer images than K gets all of them
    assert len(few_shot_records([_rec(0, [0]), _rec(1, [1])], 2, shots=5)) == 2


def test_few_shot_records_bad_inputs():
    with pytest.raises(ValueError, match="shots"):
        few_shot_records([_rec(0, [0])], 1, shots=0)
    with pytest.raises(ValueError, match="category_id 4"):
        few_shot_records([_rec(0, [4])], 2, shots=1)


# ------------------------------------------------------------------------------------------ end to end
TINY = ["MODEL.GEM.PLANNER.SAMPLES_PER_UNIT", "2", "TEST.UODB_COCO_AP", "False"]


def _run(cmd, log):
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=600,
                              env=dict(os.environ, PYTHONPATH=REPO))
    text = open(log).read()
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{text[-4000:]}"
    return text


def _outputs(cfg_file, weights, synth_root, datasets):
    from gem_d2.engine import GemCheckpointer, GemTrainer
    from gem_d2.engine.setup import build_cfg, prepare_datasets

    cfg = build_cfg(cfg_file, ["DATASETS.SYNTH.ROOT", synth_root])
    prepare_datasets(cfg)
    model = GemTrainer.build_model(cfg)
    GemCheckpointer(model).load(weights)
    model.eval()
    out = []
    for name in datasets:
        for batch in GemTrainer.build_test_loader(cfg, name):
            with torch.no_grad():
                inst = model(batch)[0]["instances"]
            out.append((inst.pred_boxes.tensor, inst.scores, inst.pred_classes))
    return out


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    work = tmp_path_factory.mktemp("adapt")
    root, base, out = str(work / "synth"), str(work / "base"), str(work / "adapted")
    common = TINY + ["DATASETS.SYNTH.ROOT", root]
    _run([sys.executable, "tools/train_net.py", "--config-file", "tests/tiny_gem_dino.yaml", *common,
          "OUTPUT_DIR", base, "DATASETS.TRAIN", "('synth_photo_train','synth_cartoon_train')",
          "DATASETS.TEST", "('synth_photo_test','synth_cartoon_test')", "SOLVER.MAX_ITER", "60",
          "SOLVER.BASE_LR", "0.001"], work / "base.log")
    # the new domain's training images double as its test set: a 60-iteration tiny model learns them, not the domain
    _run([sys.executable, "tools/adapt.py", "--config-file", os.path.join(base, "config.yaml"), "--weights",
          os.path.join(base, "model_final.pth"), "--new-dataset", "synth_sketch_train", "--new-test",
          "synth_sketch_train", "--shots", "2", "--output-dir", out, "DATASETS.SYNTH.ROOT", root,
          "MODEL.GEM.ADAPT.MAX_ITER", "60", "MODEL.GEM.ADAPT.BASE_LR", "0.001", "MODEL.GEM.ADAPT.NEW_EXPERTS", "1"],
         work / "adapt.log")
    with open(os.path.join(out, "adapt_result.json")) as f:
        result = json.load(f)
    return {"root": root, "base": base, "out": out, "result": result}


def test_adaptation_leaves_old_datasets_bit_identical(adapted):
    old = ("synth_photo_test", "synth_cartoon_test")
    before = _outputs(os.path.join(adapted["base"], "config.yaml"), os.path.join(adapted["base"], "model_final.pth"),
                      adapted["root"], old)
    after = _outputs(os.path.join(adapted["out"], "config.yaml"), os.path.join(adapted["out"], "model_final.pth"),
                     adapted["root"], old)
    assert len(before) == len(after) == 4
    for (b0, s0, c0), (b1, s1, c1) in zip(before, after):
        assert len(s0) > 0
        assert torch.equal(b0, b1) and torch.equal(s0, s1) and torch.equal(c0, c1)
    r = adapted["result"]
    for d in r["old_test"]:
        assert r["before"][d] == r["after"][d]


def test_adaptation_improves_new_dataset_and_extends_mapping(adapted):
    r = adapted["result"]
    new = r["new_test"]
    assert r["after"][new]["AP50"] > r["before"][new]["AP50"]
    few = "synth_sketch_train_2shot_seed0"
    assert r["units"] == ["synth_photo_train", "synth_cartoon_train", few]
    assert r["mapping"][-1] == [2]  # the appended expert
    assert r["mapping"][:2] == [[0], [1]] or r["mapping"][:2] == [[1], [0]]
    ckpt = torch.load(r["checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["gem_mapping"]["units"] == r["units"]
    # only the new class rows and the appended expert were trainable
    assert all("class_head" in n or "label_enc" in n or ".experts." in n for n in r["trainable_tensors"])
