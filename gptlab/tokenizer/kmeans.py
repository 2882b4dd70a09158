"""Seeded k-means in torch: the learning step of the CPU-scale codecs (Image GPT's colour clusters, a speech
codebook over log-mel frames). Deterministic for a seed, k-means++ initialisation, empty clusters re-seeded
from the worst-fit points."""

from __future__ import annotations

import torch


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N,) index of each row's nearest centroid (squared Euclidean)."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)
    return d.argmin(1)


def kmeans(x: torch.Tensor, k: int, *, iters: int = 30, seed: int = 0, sample: int = 200_000) -> torch.Tensor:
    """(N, D) float -> (k, D) centroids. At most `sample` rows (a seeded draw) take part."""
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    if len(x) > sample:
        x = x[torch.randperm(len(x), generator=g)[:sample]]
    k = min(k, len(x))
    c = x[torch.randint(len(x), (1,), generator=g)]
    d2 = ((x - c) ** 2).sum(1)
    for _ in range(1, k):  # k-means++: each next centre drawn in proportion to its distance
        i = torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2), 1, generator=g)
        c = torch.cat([c, x[i]])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    for _ in range(iters):
        a = nearest(x, c)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k).float()
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # re-seed from the points farthest from their centre
            err = ((x - c[a]) ** 2).sum(1)
            c[empty] = x[err.topk(int(empty.sum())).indices]
    return c
