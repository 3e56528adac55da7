"""Multi-dataset training sampler: per-dataset probabilities ``size^T``, mixed or one-dataset-per-batch, DDP-sharded."""
import itertools
import math
from typing import Iterator, List, Optional, Sequence

import numpy as np
from detectron2.utils import comm
from torch.utils.data import Sampler, get_worker_info


def sampling_probabilities(dataset_sizes: Sequence[int], temperature: float = 1.0) -> np.ndarray:
    """Per-dataset probabilities ``size^T / sum(size^T)`` (T=1: proportional to size; T=0: uniform)."""
    sizes = list(dataset_sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0 for s in sizes):
        raise ValueError(f"dataset sizes must be a non-empty list of positive ints, got {sizes}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"DATALOADER.DATASET_TEMPERATURE must be a finite number >= 0, got {temperature!r}")
    weights = np.asarray(sizes, dtype=np.float64) ** float(temperature)
    return weights / weights.sum()


class MultiDatasetTrainingSampler(Sampler):
    """Infinite stream of indices into the concatenation of several datasets.

    Each draw picks dataset d with probability ``size_d^T / sum_k size_k^T``, then d's next index from its own
    shuffled permutation (a new permutation every pass, so all of d's images are seen before any repeats).
    All ranks compute the same global stream from ``seed``; rank r keeps its share:

    - mixed batches (default): global positions ``r, r + world_size, ...`` (as detectron2's TrainingSampler);
    - ``one_dataset_per_batch``: the global stream is made of chunks of ``batch_size`` indices of one dataset
      each (the dataset drawn per chunk); rank r gets chunks ``r, r + world_size, ...``, so every consecutive
      ``batch_size`` indices a rank yields come from one dataset.

    Args:
        dataset_sizes: number of images of each dataset, in concatenation order.
        temperature: T >= 0 (1 = proportional to size, 0 = uniform over datasets).
        batch_size: images per batch *per rank* (only used with ``one_dataset_per_batch``).
        one_dataset_per_batch: draw whole batches from one dataset.
        shuffle: shuffle within each dataset (False: each dataset's images in order, cyclically).
        seed: shared seed; None = ``comm.shared_random_seed()``.
        rank, world_size: default ``comm.get_rank()`` / ``comm.get_world_size()``.
    """

    def __init__(self, dataset_sizes: Sequence[int], temperature: float = 1.0, batch_size: int = 1,
                 one_dataset_per_batch: bool = False, shuffle: bool = True, seed: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        self.probabilities = sampling_probabilities(dataset_sizes, temperature)
        self.dataset_sizes: List[int] = [int(s) for s in dataset_sizes]
        self.offsets: List[int] = [0] + list(itertools.accumulate(self.dataset_sizes))[:-1]
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.one_dataset_per_batch = bool(one_dataset_per_batch)
        self.shuffle = bool(shuffle)
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.world_size = int(comm.get_world_size() if world_size is None else world_size)
        self.rank = int(comm.get_rank() if rank is None else rank)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")

    def _dataset_stream(self, d: int, rng: np.random.Generator) -> Iterator[int]:
        offset, size = self.offsets[d], self.dataset_sizes[d]
        while True:
            order = rng.permutation(size) if self.shuffle else np.arange(size)
            for i in order.tolist():
                yield offset + i

    def _global_stream(self) -> Iterator[int]:
        seeds = np.random.SeedSequence(self.seed).spawn(len(self.dataset_sizes) + 1)
        choice_rng = np.random.default_rng(seeds[0])
        streams = [self._dataset_stream(d, np.random.default_rng(s)) for d, s in enumerate(seeds[1:])]
        per_draw = self.batch_size if self.one_dataset_per_batch else 1
        n = len(self.dataset_sizes)
        while True:
            for d in choice_rng.choice(n, size=4096, p=self.probabilities).tolist():
                for _ in range(per_draw):
                    yield next(streams[d])

    def __iter__(self) -> Iterator[int]:
        stream = self._global_stream()
        if not self.one_dataset_per_batch:
            yield from itertools.islice(stream, self.rank, None, self.world_size)
            return
        chunk = 0
        while True:
            indices = list(itertools.islice(stream, self.batch_size))
            if chunk % self.world_size == self.rank:
                yield from indices
            chunk += 1

    def dataset_of(self, index: int) -> int:
        """Which dataset (position in ``dataset_sizes``) a concatenated index belongs to."""
        if not 0 <= index < sum(self.dataset_sizes):
            raise IndexError(f"index {index} out of range for datasets of sizes {self.dataset_sizes}")
        return int(np.searchsorted(np.asarray(self.offsets), index, side="right") - 1)


class WorkerChunkSampler(Sampler):
    """Shards a sampler between DataLoader workers by whole chunks of ``chunk_size`` indices.

    detectron2's ``ToIterableDataset`` shards index by index (worker k gets positions k, k+W, ...), which would
    mix datasets inside a worker's batch; with this wrapper (and ``shard_sampler=False``) worker k gets chunks
    k, k+W, ..., so each batch it builds is one chunk of the wrapped sampler.
    """

    def __init__(self, sampler: Sampler, chunk_size: int):
        self.sampler = sampler
        self.chunk_size = int(chunk_size)

    def __iter__(self) -> Iterator[int]:
        info = get_worker_info()
        it = iter(self.sampler)
        if info is None or info.num_workers == 1:
            yield from it
            return
        chunk = 0
        while True:
            indices = list(itertools.islice(it, self.chunk_size))
            if len(indices) < self.chunk_size:
                return
            if chunk % info.num_workers == info.id:
                yield from indices
            chunk += 1
