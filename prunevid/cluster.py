"""DPC-KNN clustering (density peaks with k-nearest-neighbour density), batched.

ALGORITHM.md §1. One call clusters B independent sets of n tokens each.
"""

from __future__ import annotations

import torch


def dpc_knn(
    x: torch.Tensor, num_clusters: int, k: int = 7, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Cluster each of B sets of n tokens into `num_clusters` clusters.

    x: (B, n, C). noise: optional (B, n) tie-break values added to the densities.
    Returns labels (B, n) in [0, num_clusters): label r belongs to the centre of rank r
    (rank 0 = highest rho * delta score; equal scores: lower token index first).
    Computed in float32 whatever the input dtype.
    """
    batch, n, channels = x.shape
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, {n}] for a set of {n} tokens, got {num_clusters}")
    x = x.float()
    dist = torch.cdist(x, x) / channels**0.5  # (B, n, n)

    # Density: each token's k nearest distances include its own zero.
    nearest = dist.topk(min(k, n), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1))  # (B, n)
    if noise is not None:
        density = density + noise.to(density)

    # Separation: distance to the nearest denser token; the densest takes the set's largest distance.
    denser = density[:, None, :] > density[:, :, None]  # [b, i, j]: j is denser than i
    separation = dist.masked_fill(~denser, torch.inf).amin(-1)
    largest = dist.flatten(1).amax(-1, keepdim=True).expand(-1, n)
    separation = torch.where(denser.any(-1), separation, largest)

    score = density * separation
    centres = score.sort(dim=-1, descending=True, stable=True).indices[:, :num_clusters]  # (B, K)

    # argmin takes the first minimum, so ties go to the lower label.
    labels = dist.gather(1, centres[:, :, None].expand(-1, -1, n)).argmin(1)  # (B, n)
    ranks = torch.arange(num_clusters, device=x.device).expand(batch, -1)
    return labels.scatter(1, centres, ranks)


def cluster_means(x: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Plain mean of the members of each cluster, in label order.

    x: (B, n, C), labels: (B, n) -> (B, num_clusters, C) in x's dtype (summed in float32).
    """
    batch, _, channels = x.shape
    sums = x.new_zeros(batch, num_clusters, channels, dtype=torch.float32)
    sums.scatter_add_(1, labels[:, :, None].expand(-1, -1, channels), x.float())
    counts = torch.zeros(batch, num_clusters, device=x.device).scatter_add_(
        1, labels, torch.ones_like(labels, dtype=torch.float32)
    )
    return (sums / counts[:, :, None]).to(x.dtype)
