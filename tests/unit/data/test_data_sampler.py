"""MultiDatasetTrainingSampler: ratios (statistically), one-dataset-per-batch, DDP sharding, worker chunking."""
import itertools
import types

import numpy as np
import pytest

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
from gem_d2.data import sampler as sampler_module
from gem_d2.data.sampler import MultiDatasetTrainingSampler, WorkerChunkSampler, sampling_probabilities

SIZES = [100, 300, 600]
N = 30000


def _take(sampler, n):
    return np.fromiter(itertools.islice(iter(sampler), n), dtype=np.int64, count=n)


def _dataset_shares(indices, sizes=SIZES):
    bounds = np.cumsum(sizes)
    which = np.searchsorted(bounds, indices, side="right")
    return np.bincount(which, minlength=len(sizes)) / len(indices)


@pytest.mark.parametrize("temperature, expected", [
    (1.0, [0.1, 0.3, 0.6]),
    (0.0, [1 / 3, 1 / 3, 1 / 3]),
    (0.5, [10 / (10 + 300 ** 0.5 + 600 ** 0.5), 300 ** 0.5 / (10 + 300 ** 0.5 + 600 ** 0.5),
           600 ** 0.5 / (10 + 300 ** 0.5 + 600 ** 0.5)]),
])
def test_ratios_follow_size_to_the_temperature(temperature, expected):
    assert np.allclose(sampling_probabilities(SIZES, temperature), expected)
    shares = _dataset_shares(_take(MultiDatasetTrainingSampler(SIZES, temperature, seed=3, rank=0, world_size=1), N))
    sigma = np.sqrt(np.asarray(expected) * (1 - np.asarray(expected)) / N)
    assert np.all(np.abs(shares - expected) < 4 * sigma), (shares, expected)


def test_each_dataset_is_a_permutation_per_pass():
    s = MultiDatasetTrainingSampler([5, 7], temperature=1.0, seed=0, rank=0, world_size=1)
    indices = _take(s, 400)
    first = [i for i in indices if i < 5]
    second = [i - 5 for i in indices if i >= 5]
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))
    assert sorted(second[:7]) == list(range(7))
    assert first[:5] != first[5:10] or second[:7] != second[7:14]  # reshuffled between passes
    ordered = MultiDatasetTrainingSampler([5, 7], shuffle=False, seed=0, rank=0, world_size=1)
    assert [i for i in _take(ordered, 200) if i < 5][:10] == [0, 1, 2, 3, 4] * 2


def test_deterministic_for_a_seed():
    a = _take(MultiDatasetTrainingSampler(SIZES, seed=11, rank=0, world_size=1), 500)
    b = _take(MultiDatasetTrainingSampler(SIZES, seed=11, rank=0, world_size=1), 500)
    c = _take(MultiDatasetTrainingSampler(SIZES, seed=12, rank=0, world_size=1), 500)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_mixed_batches_mix_datasets():
    which = np.searchsorted(np.cumsum(SIZES), _take(MultiDatasetTrainingSampler(SIZES, 0.0, seed=1, rank=0,
                                                                                 world_size=1), 400), side="right")
    chunks = which.reshape(-1, 4)
    assert np.mean([len(set(c)) > 1 for c in chunks]) > 0.5


def test_one_dataset_per_batch():
    s = MultiDatasetTrainingSampler(SIZES, temperature=0.0, batch_size=4, one_dataset_per_batch=True, seed=5,
                                    rank=0, world_size=1)
    which = np.searchsorted(np.cumsum(SIZES), _take(s, 4 * 3000), side="right").reshape(-1, 4)
    assert all(len(set(chunk)) == 1 for chunk in which)
    shares = np.bincount(which[:, 0], minlength=3) / len(which)
    assert np.all(np.abs(shares - 1 / 3) < 4 * np.sqrt(2 / 9 / len(which)))


@pytest.mark.parametrize("one_per_batch", [False, True])
def test_ddp_ranks_shard_the_global_stream(one_per_batch):
    kw = dict(temperature=1.0, batch_size=3, one_dataset_per_batch=one_per_batch, seed=7)
    r0 = _take(MultiDatasetTrainingSampler(SIZES, rank=0, world_size=2, **kw), 3000)
    r1 = _take(MultiDatasetTrainingSampler(SIZES, rank=1, world_size=2, **kw), 3000)
    single = _take(MultiDatasetTrainingSampler(SIZES, rank=0, world_size=1, **kw), 6000)
    assert not np.array_equal(r0, r1)
    step = 3 if one_per_batch else 1  # ranks take alternate chunks (or alternate indices) of one global stream
    rebuilt = np.stack([r0.reshape(-1, step), r1.reshape(-1, step)], axis=1).reshape(-1)
    assert np.array_equal(rebuilt, single)
    if one_per_batch:
        for r in (r0, r1):
            which = np.searchsorted(np.cumsum(SIZES), r, side="right").reshape(-1, 3)
            assert all(len(set(c)) == 1 for c in which)
    shares = _dataset_shares(np.concatenate([r0, r1]))
    n_draws = 6000 // step
    assert np.all(np.abs(shares - [0.1, 0.3, 0.6]) < 4 * np.sqrt(0.25 / n_draws))


def test_worker_chunk_sampler_gives_each_worker_whole_chunks(monkeypatch):
    base = MultiDatasetTrainingSampler(SIZES, 0.0, batch_size=4, one_dataset_per_batch=True, seed=2, rank=0,
                                       world_size=1)
    full = _take(base, 4 * 40)
    per_worker = []
    for worker in range(2):
        monkeypatch.setattr(sampler_module, "get_worker_info", lambda w=worker: types.SimpleNamespace(id=w,
                                                                                                    num_workers=2))
        per_worker.append(_take(WorkerChunkSampler(base, 4), 4 * 20))
    assert np.array_equal(per_worker[0].reshape(-1, 4), full.reshape(-1, 4)[0::2])
    assert np.array_equal(per_worker[1].reshape(-1, 4), full.reshape(-1, 4)[1::2])
    monkeypatch.setattr(sampler_module, "get_worker_info", lambda: None)
    assert np.array_equal(_take(WorkerChunkSampler(base, 4), 4 * 40), full)


def test_dataset_of():
    s = MultiDatasetTrainingSampler(SIZES, seed=0, rank=0, world_size=1)
    assert [s.dataset_of(i) for i in (0, 99, 100, 399, 400, 999)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(IndexError):
        s.dataset_of(1000)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset_sizes=[]), "non-empty list of positive ints"),
    (dict(dataset_sizes=[3, 0]), "non-empty list of positive ints"),
    (dict(dataset_sizes=[3, 2.5]), "non-empty list of positive ints"),
    (dict(dataset_sizes=[3], temperature=-1), "DATASET_TEMPERATURE must be a finite number >= 0"),
    (dict(dataset_sizes=[3], temperature=float("nan")), "DATASET_TEMPERATURE"),
    (dict(dataset_sizes=[3], batch_size=0), "batch_size must be an int >= 1"),
    (dict(dataset_sizes=[3], rank=2, world_size=2), r"rank 2 is not in \[0, world_size=2\)"),
])
def test_bad_arguments(kwargs, message):
    kwargs.setdefault("seed", 0)
    with pytest.raises(ValueError, match=message):
        MultiDatasetTrainingSampler(**kwargs)
