"""Train/test loaders over the generated datasets: batches, dataset ids, one dataset per batch, sampling weights."""
import itertools

import pytest
import torch

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
from gem_d2.data import build_gem_test_loader, build_gem_train_loader, dataset_sampling_weights, load_gem_datasets
from gem_d2.data.synthetic import DOMAIN_CLASSES, DOMAINS, train_dataset_names

TRAIN = train_dataset_names()


def _cfg(data_cfg, **overrides):
    return data_cfg(train=TRAIN, test=["synth_medical_test", "synth_photo_test"],
                    **{"SOLVER.IMS_PER_BATCH": 4, **overrides})


def _offsets():
    out, total = {}, 0
    for i, d in enumerate(DOMAINS):
        out[i] = (total, total + len(DOMAIN_CLASSES[d]))
        total += len(DOMAIN_CLASSES[d])
    return out


def test_sampling_weights(small_synth, data_cfg):
    sizes = [small_synth["domains"][d]["train_images"] for d in DOMAINS]  # 6, 6, 2, 6, 6
    assert sizes == [6, 6, 2, 6, 6]
    w1 = dataset_sampling_weights(_cfg(data_cfg))
    assert list(w1) == TRAIN
    assert w1 == pytest.approx({n: s / 26 for n, s in zip(TRAIN, sizes)})
    w0 = dataset_sampling_weights(_cfg(data_cfg, **{"DATALOADER.DATASET_TEMPERATURE": 0.0}))
    assert w0 == pytest.approx({n: 0.2 for n in TRAIN})


@pytest.mark.parametrize("workers", [0, 2])
def test_one_dataset_per_batch_loader(small_synth, data_cfg, workers):
    cfg = _cfg(data_cfg, **{"DATALOADER.ONE_DATASET_PER_BATCH": True, "DATALOADER.NUM_WORKERS": workers,
                            "DATALOADER.DATASET_TEMPERATURE": 0.0})
    loader = build_gem_train_loader(cfg)
    seen = set()
    for batch in itertools.islice(loader, 12):
        assert len(batch) == 4
        ids = {x["dataset_id"] for x in batch}
        assert len(ids) == 1, [x["dataset_name"] for x in batch]
        (i,) = ids
        start, stop = _offsets()[i]
        for x in batch:
            assert x["dataset_name"] == TRAIN[i] and x["class_block"] == (start, stop)
            assert x["image"].dtype == torch.uint8 and x["image"].shape[0] == 3
            cls = x["instances"].gt_classes
            assert len(cls) > 0 and int(cls.min()) >= start and int(cls.max()) < stop
        seen.add(i)
    assert len(seen) >= 3  # several datasets over 12 batches (uniform over 5)


def test_mixed_loader(small_synth, data_cfg):
    loader = build_gem_train_loader(_cfg(data_cfg, **{"DATALOADER.DATASET_TEMPERATURE": 0.0}))
    batches = list(itertools.islice(loader, 8))
    assert all(len(b) == 4 for b in batches)
    assert any(len({x["dataset_id"] for x in b}) > 1 for b in batches)
    for x in itertools.chain.from_iterable(batches):
        start, stop = _offsets()[x["dataset_id"]]
        assert x["class_block"] == (start, stop)
        assert all(start <= c < stop for c in x["instances"].gt_classes.tolist())


def test_test_loader_visits_every_image_once(small_synth, data_cfg):
    loader = build_gem_test_loader(_cfg(data_cfg), "synth_medical_test")
    outputs = [b[0] for b in loader]
    expected = load_gem_datasets(["synth_medical_test"])[0]
    assert [o["image_id"] for o in outputs] == [r["image_id"] for r in expected]
    assert all(o["dataset_id"] == 2 and o["class_block"] == _offsets()[2] for o in outputs)
    assert all("instances" not in o for o in outputs)


def test_bad_loader_configs(small_synth, data_cfg):
    with pytest.raises(KeyError, match="'synth_nope_train' is not registered"):
        build_gem_train_loader(data_cfg(train=["synth_photo_train", "synth_nope_train"]))
    with pytest.raises(ValueError, match="IMS_PER_BATCH=0"):
        build_gem_train_loader(data_cfg(train=["synth_photo_train"], **{"SOLVER.IMS_PER_BATCH": 0}))
    with pytest.raises(KeyError, match="DATASETS.TEST has 'synth_sketch_test'"):
        build_gem_test_loader(data_cfg(train=["synth_photo_train"], test=["synth_sketch_test"]), "synth_sketch_test")
