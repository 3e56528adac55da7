"""Affinity from a frozen backbone on the generated domains, k-means, plan_from_cfg and tools/plan_experts.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg

from gem_d2.config import add_gem_config
from gem_d2.data import synthetic
from gem_d2.planner import (
    GemMapping,
    affinity_from_prototypes,
    build_frozen_backbone,
    compute_affinity,
    kmeans,
    plan_from_cfg,
    plan_mapping,
)
from gem_d2.planner.affinity import FeatureExtractor, collect_unit_features, unit_prototypes

ROOT = Path(__file__).resolve().parents[3]


def tiny_cfg(synth_summary, **planner):
    cfg = get_cfg()
    add_gem_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.DATASETS.TRAIN = tuple(synthetic.train_dataset_names())
    p = synth_summary["params"]
    cfg.DATASETS.SYNTH.ROOT = synth_summary["root"]
    cfg.DATASETS.SYNTH.IMAGES_PER_DOMAIN = p["images_per_domain"]
    cfg.DATASETS.SYNTH.TEST_IMAGES_PER_DOMAIN = p["test_images_per_domain"]
    cfg.DATASETS.SYNTH.IMAGE_SIZE = p["image_size"]
    cfg.DATASETS.SYNTH.SEED = p["seed"]
    cfg.MODEL.GEM.NUM_EXPERTS = len(synthetic.DOMAINS)
    cfg.MODEL.GEM.PLANNER.IMAGE_SIZE = 64  # small and fast; the separation test uses 128
    cfg.MODEL.GEM.PLANNER.SAMPLES_PER_UNIT = 2
    for k, v in planner.items():
        setattr(cfg.MODEL.GEM.PLANNER, k, v)
    return cfg


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads made each forward ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def domain_features(small_synth):
    """Config, extractor and sampled features of the training and held-out domains (computed once)."""
    cfg = tiny_cfg(small_synth, IMAGE_SIZE=128, SAMPLES_PER_UNIT=8)
    extractor = FeatureExtractor.from_cfg(cfg)
    train = collect_unit_features(extractor, cfg.DATASETS.TRAIN, "dataset", 8, seed=0)
    test = collect_unit_features(extractor, synthetic.test_dataset_names(), "dataset", 8, seed=0)
    return cfg, train, test


def test_kmeans_recovers_separated_blobs_deterministically():
    rng = np.random.default_rng(0)
    centers = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    x = np.concatenate([c + 0.1 * rng.normal(size=(20, 3)) for c in centers])
    got = kmeans(x, 3, seed=1, iters=20)
    order = np.argmin(((centers[:, None] - got[None]) ** 2).sum(-1), axis=1)
    assert sorted(order.tolist()) == [0, 1, 2]
    np.testing.assert_allclose(got[order], [x[i * 20:(i + 1) * 20].mean(0) for i in range(3)], atol=1e-12)
    np.testing.assert_array_equal(got, kmeans(x, 3, seed=1, iters=20))
    with pytest.raises(ValueError, match=r"2 features cannot make 3 clusters"):
        kmeans(x[:2], 3)


def test_affinity_is_softmax_of_cosine_over_the_spread_scaled_temperature():
    protos, keys = np.array([[1.0, 0.0], [3.0, 4.0]]), np.array([[2.0, 0.0], [0.0, 1.0]])
    cos = np.array([[1.0, 0.0], [0.6, 0.8]])
    t = 0.5 * cos.std()  # float64 reference: T = tau * std of every unit-key cosine
    want = np.exp(cos / t) / np.exp(cos / t).sum(1, keepdims=True)
    np.testing.assert_allclose(affinity_from_prototypes(protos, keys, 0.5), want)
    with pytest.raises(ValueError, match="TAU must be > 0"):
        affinity_from_prototypes(protos, keys, 0.0)


def _unit_vectors(angles_deg):
    a = np.radians(np.asarray(angles_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def test_calibrated_affinity_keeps_second_choices_and_plans_the_hand_known_best():
    """Photo's best expert is full (aerial fills it), so the plan must put photo on its *second* choice.

    Keys at 0 (aerial), 60 (cartoon) and 150 degrees (microscopy); photo at 25 degrees: cos 0.91 to aerial's
    key, 0.82 to cartoon's, -0.57 to microscopy's. Loads: aerial 0.36, photo 0.08, cartoon 0.30, microscopy
    0.30; capacity 1.1 * 1.04 / 3 = 0.381, so aerial + photo (0.44) does not fit and cartoon + photo (0.38)
    does: the best plan (by hand) is aerial -> 0, photo -> 1 (with cartoon), cartoon -> 1, microscopy -> 2.
    """
    keys = _unit_vectors([0, 60, 150])
    protos = _unit_vectors([5, 25, 58, 148])  # aerial, photo, cartoon, microscopy
    loads = np.array([0.36, 0.08, 0.30, 0.30])
    w = affinity_from_prototypes(protos, keys, 1.0)
    photo = w[1]
    assert photo.argmax() == 0 and photo[1] / photo[0] > 0.5 and photo[2] < 0.15 * photo[1]  # second choice survives
    old = np.exp(protos @ keys.T / 0.01)  # a fixed temperature on concentrated features: one-hot rows
    old /= old.sum(1, keepdims=True)
    assert old[1, 1] / old[1, 0] < 1e-3
    plan = plan_mapping(w, loads, k=1, slack=0.1, rounding="exact")
    assert [list(r) for r in plan.mapping] == [[0], [1], [1], [2]]
    assert plan.overflow.sum() == 0


def test_domains_separate_against_held_out_prototypes(domain_features):
    cfg, train, test = domain_features
    aff = compute_affinity(cfg, features=train)
    assert aff.unit_names == list(cfg.DATASETS.TRAIN)
    assert aff.prototypes.shape[0] == aff.affinity.shape[0] == 5 and aff.affinity.shape[1] == 5
    np.testing.assert_allclose(np.linalg.norm(aff.prototypes, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(aff.affinity.sum(axis=1), 1.0)
    sim = aff.prototypes @ unit_prototypes(test.features).T  # train domain x held-out domain
    # Each domain's prototype is nearest to its own held-out prototype, and vice versa.
    np.testing.assert_array_equal(sim.argmax(axis=1), np.arange(5))
    np.testing.assert_array_equal(sim.argmax(axis=0), np.arange(5))


def test_rare_domain_gets_its_own_expert_when_capacity_allows(domain_features, tmp_path):
    cfg, train, _ = domain_features
    cfg = cfg.clone()
    cfg.MODEL.GEM.NUM_EXPERTS = 6
    cfg.MODEL.GEM.PLANNER.SLACK = 0.5  # capacity 0.25 of the load per expert: a regular domain (0.23) fits alone
    plan, mapping = plan_from_cfg(cfg, str(tmp_path), affinity=compute_affinity(cfg, features=train))
    rare = synthetic.dataset_name(synthetic.RARE_DOMAIN, "train")
    rare_experts = set(mapping.experts_of(rare))
    others = {e for u, row in zip(mapping.units, mapping.experts) if u != rare for e in row}
    assert rare_experts.isdisjoint(others)
    assert plan.overflow.sum() == 0
    mapping.validate_cfg(cfg)


def test_plan_from_cfg_writes_files_and_is_deterministic(small_synth, tmp_path, capfd):
    cfg = tiny_cfg(small_synth)
    cfg.MODEL.GEM.NUM_EXPERTS = 4
    texts = []
    for run in range(2):
        out = tmp_path / "plan"
        plan, mapping = plan_from_cfg(cfg, str(out))
        texts.append((out / "plan.yaml").read_bytes())
        if run == 0:
            err = capfd.readouterr().err  # tqdm's bar: done/total and rate
            assert "planner affinity (images)" in err and "images/s" in err
    assert texts[0] == texts[1]
    for name in ("plan_report.json", "plan_heatmap.png"):
        assert (out / name).stat().st_size > 0
    evidence = json.loads((out / "plan_report.json").read_text())["evidence"]
    aff = compute_affinity(cfg)  # the same seeded features: the report's evidence, recomputed in float64 here
    w, protos = np.asarray(evidence["affinity"]), aff.prototypes.astype(np.float64)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    np.testing.assert_allclose(w, aff.affinity, atol=1e-6)
    np.testing.assert_allclose(evidence["prototype_cosine"], protos @ protos.T, atol=1e-5)
    np.testing.assert_allclose(evidence["row_spread"], w.max(1) - w.min(1), atol=1e-6)
    cos = np.asarray(evidence["unit_key_cosine"])
    assert evidence["units"] == list(cfg.DATASETS.TRAIN)
    assert np.isclose(evidence["unit_key_cosine_std"], cos.std(), atol=1e-5)
    assert evidence["flat"] == (cos.std() < 0.02)
    merged = tiny_cfg(small_synth)
    merged.merge_from_file(str(out / "plan.yaml"))
    assert GemMapping.from_cfg(merged).experts == mapping.experts
    merged.MODEL.GEM.NUM_EXPERTS = 4
    mapping.validate_cfg(merged)


def test_class_level_units(small_synth):
    cfg = tiny_cfg(small_synth, LEVEL="class")
    cfg.MODEL.GEM.NUM_EXPERTS = 4
    plan, mapping = plan_from_cfg(cfg, None)
    classes = synthetic.DOMAIN_CLASSES
    want = [f"{synthetic.dataset_name(d, 'train')}/{c}" for d in synthetic.DOMAINS for c in classes[d]]
    assert set(mapping.units) <= set(want) and len(mapping.units) >= len(synthetic.DOMAINS)
    # Class loads split each dataset's sampling share by its box counts: they sum to the dataset share.
    shares = {}
    for u, load in zip(plan.unit_names, plan.problem.loads):
        shares[u.split("/")[0]] = shares.get(u.split("/")[0], 0.0) + load
    sizes = {d: small_synth["domains"][d]["train_images"] for d in synthetic.DOMAINS}
    for d in synthetic.DOMAINS:
        assert shares[synthetic.dataset_name(d, "train")] == pytest.approx(sizes[d] / sum(sizes.values()))
    mapping.validate_cfg(cfg)


def test_weights_are_loaded_from_model_weights(small_synth, tmp_path):
    cfg = tiny_cfg(small_synth, SEED=3)
    holder = torch.nn.Module()
    holder.backbone = build_frozen_backbone(cfg)
    with torch.no_grad():
        holder.backbone.stem.conv1.weight.fill_(0.5)
    torch.save({"model": holder.state_dict()}, tmp_path / "model.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    cfg.MODEL.GEM.PLANNER.SEED = 4  # a different random init, overwritten by the checkpoint
    loaded = build_frozen_backbone(cfg)
    assert torch.all(loaded.stem.conv1.weight == 0.5)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_plan_experts_tool(small_synth, tmp_path, capsys):
    cfg = tiny_cfg(small_synth)
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18",
            "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.OUT_FEATURES", "['res5']",
            "MODEL.RESNETS.NORM", "BN", "MODEL.GEM.NUM_EXPERTS", "3", "MODEL.GEM.PLANNER.SAMPLES_PER_UNIT", "2",
            "MODEL.GEM.PLANNER.IMAGE_SIZE", "64", "DATASETS.TRAIN", str(tuple(cfg.DATASETS.TRAIN)),
            "DATASETS.SYNTH.ROOT", cfg.DATASETS.SYNTH.ROOT,
            "DATASETS.SYNTH.IMAGES_PER_DOMAIN", str(cfg.DATASETS.SYNTH.IMAGES_PER_DOMAIN),
            "DATASETS.SYNTH.TEST_IMAGES_PER_DOMAIN", str(cfg.DATASETS.SYNTH.TEST_IMAGES_PER_DOMAIN),
            "DATASETS.SYNTH.IMAGE_SIZE", str(cfg.DATASETS.SYNTH.IMAGE_SIZE)]
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_experts.py"), "--output", str(tmp_path / "out")]
                          + opts, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rounded/LP" in proc.stdout
    paths = {n: str(tmp_path / "out" / n) for n in ("plan.yaml", "planned_config.yaml", "plan_report.json",
                                                    "plan_heatmap.png")}
    assert all(os.path.getsize(p) > 0 for p in paths.values())
    planned = get_cfg()
    add_gem_config(planned)
    planned.merge_from_file(paths["planned_config.yaml"])
    assert len(planned.MODEL.GEM.MAPPING) == 5 and planned.MODEL.GEM.NUM_EXPERTS == 3
    GemMapping.from_cfg(planned).validate_cfg(planned)
