"""Seeded k-means (k-means++ initialisation, Lloyd iterations) for the planner's expert keys."""
from __future__ import annotations

import numpy as np

__all__ = ["kmeans"]


def kmeans(features: np.ndarray, n_clusters: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Cluster ``features`` into ``n_clusters`` centroids, deterministically for a given seed.

    Args:
        features: (N, D) float array, N >= n_clusters.
        n_clusters: number of centroids.
        seed: seed of the k-means++ initialisation.
        iters: maximum Lloyd iterations (stops early when assignments no longer change).
    Returns:
        (n_clusters, D) float64 centroids. An empty cluster is re-seeded with the point farthest from its
        centroid, so every centroid is the mean of at least one point.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"kmeans: features must be (N, D), got shape {x.shape}")
    if not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
        raise ValueError(f"kmeans: n_clusters must be a positive int, got {n_clusters!r}")
    if x.shape[0] < n_clusters:
        raise ValueError(f"kmeans: {x.shape[0]} features cannot make {n_clusters} clusters (need at least one "
                         "feature per cluster; sample more images per unit)")
    if iters < 0:
        raise ValueError(f"kmeans: iters must be >= 0, got {iters}")
    rng = np.random.default_rng(seed)
    centroids = _kmeans_pp(x, n_clusters, rng)
    labels = None
    for _ in range(iters):
        d2 = _sq_dist(x, centroids)
        new = np.argmin(d2, axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for c in range(n_clusters):
            members = labels == c
            if members.any():
                centroids[c] = x[members].mean(axis=0)
            else:
                far = int(np.argmax(d2[np.arange(len(x)), labels]))
                centroids[c] = x[far]
                labels[far] = c
    return centroids


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    d2 = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centroids = np.empty((k, x.shape[1]))
    centroids[0] = x[rng.integers(len(x))]
    closest = _sq_dist(x, centroids[:1])[:, 0]
    for c in range(1, k):
        total = closest.sum()
        # All remaining points coincide with chosen centroids: take the next one not yet picked in order.
        idx = int(rng.choice(len(x), p=closest / total)) if total > 0 else c % len(x)
        centroids[c] = x[idx]
        closest = np.minimum(closest, _sq_dist(x, centroids[c:c + 1])[:, 0])
    return centroids
