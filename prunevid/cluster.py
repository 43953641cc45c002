"""DPC-KNN clustering (density peaks with k-nearest-neighbour density), batched.

ALGORITHM.md §1. One call clusters B independent sets of up to n tokens each: every set its own
size and cluster count, given as tensors, so a video's sets of different sizes (the static sets
of its segments, the dynamic sets of its frames) cluster in one call with nothing read back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# torch.cdist computes Euclidean distances directly for sets of at most this many tokens and
# through a matrix product above; the two differ in the last bits, and a set is clustered as
# torch.cdist would cluster it alone (ties between distances must break as they always did).
_DIRECT_CDIST = 25


class Clustering(NamedTuple):
    """What `dpc_knn_sets` found, each (B, n): labels, and the density (noise included) and
    separation of every token, whose product ranked the centres."""

    labels: torch.Tensor
    density: torch.Tensor
    separation: torch.Tensor


def dpc_knn(
    x: torch.Tensor, num_clusters: int, k: int = 7, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Cluster each of B sets of n tokens into `num_clusters` clusters.

    x: (B, n, C). noise: optional (B, n) tie-break values added to the densities.
    Returns labels (B, n) in [0, num_clusters): label r belongs to the centre of rank r
    (rank 0 = highest rho * delta score; equal scores: lower token index first).
    Computed in float32 whatever the input dtype.
    """
    batch, n, _ = x.shape
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, {n}] for a set of {n} tokens, got {num_clusters}")
    sizes = torch.full((batch,), n, device=x.device)
    return dpc_knn_sets(x, sizes, torch.full_like(sizes, num_clusters), k, noise, full=True).labels


def dpc_knn_sets(
    x: torch.Tensor,
    sizes: torch.Tensor,
    num_clusters: torch.Tensor,
    k: int = 7,
    noise: torch.Tensor | None = None,
    full: bool = False,
) -> Clustering:
    """`dpc_knn` on B sets of different sizes and cluster counts, without a host read.

    x: (B, n, C), set b's tokens in x[b, :sizes[b]] (the rest is padding and ignored);
    sizes, num_clusters: (B,) with 1 <= num_clusters <= sizes where sizes > 0 (the caller
    guarantees it); noise: optional (B, n); full: the caller knows that every size is n.
    Returns the labels (B, n), each set's exactly as `dpc_knn` gives for that set alone, with
    every token's density and separation; padding gets values too (meaningless).
    """
    n, channels = x.shape[1], x.shape[2]
    ids = torch.arange(n, device=x.device)
    size = sizes[:, None]  # (B, 1)
    # Where every set is full there is no padding to mask (None: nothing to mask).
    padding = None if full else ids >= size  # (B, n)
    outside = None if full else padding[:, :, None] | padding[:, None, :]  # (B, n, n): a pair with padding
    dist = _distances(x.float(), None if full else sizes) / channels**0.5  # (B, n, n)
    within = _masked(dist, outside, torch.inf)  # distances inside each set, inf elsewhere

    # Density: each token's k nearest distances include its own zero; a set smaller than k
    # averages all its distances. Those beyond a set's size are the padding's inf, and count 0.
    nearest = within.topk(min(k, n), dim=-1, largest=False).values
    squares = (nearest**2).nan_to_num(posinf=0.0).sum(-1)
    density = torch.exp(-(squares / size.clamp(min=1, max=k)))  # (B, n)
    if noise is not None:
        density = density + noise.to(density)

    # Separation: distance to the nearest denser token; the densest (inf so far) takes the
    # set's largest distance, which no other separation exceeds.
    lower = density[:, None, :] <= density[:, :, None]  # [b, i, j]: j not denser than i
    separation = within.masked_fill(lower, torch.inf).amin(-1)
    largest = _masked(dist, outside, -torch.inf).flatten(1).amax(-1, keepdim=True)
    separation = torch.minimum(separation, largest)

    score = _masked(density * separation, padding, -torch.inf)
    order = score.sort(dim=-1, descending=True, stable=True).indices  # (B, n): centres by rank
    rank = order.argsort(-1)  # the inverse permutation

    # Distances from each centre (row r: rank r) to every token; argmin takes the first
    # minimum, so ties go to the lower label.
    num_clusters = num_clusters[:, None]  # (B, 1)
    from_centres = dist.gather(1, order[:, :, None].expand(-1, -1, n))
    not_centre = (ids >= num_clusters)[:, :, None]  # (B, n, 1) over ranks
    labels = from_centres.masked_fill(not_centre, torch.inf).argmin(1)
    labels = torch.where(rank < num_clusters, rank, labels)
    return Clustering(labels, density, separation)


def _masked(values: torch.Tensor, mask: torch.Tensor | None, fill: float) -> torch.Tensor:
    """values with `fill` where `mask` (broadcast), or values themselves where mask is None."""
    return values if mask is None else values.masked_fill(mask, fill)


def _distances(x: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
    """(B, n, C) -> (B, n, n) Euclidean distances, each set's as torch.cdist computes them for
    that set alone: directly for sets of at most 25 tokens, else by a matrix product.
    sizes: (B,), or None where every set holds n tokens."""
    n = x.shape[1]
    if n <= _DIRECT_CDIST:
        return torch.cdist(x, x)
    # What torch.cdist runs for sets above 25 tokens, without its reshapes for broadcasting.
    dist = torch._euclidean_dist(x, x)
    if sizes is None:
        return dist
    head = x[:, :_DIRECT_CDIST]
    direct = torch.cdist(head, head, compute_mode="donot_use_mm_for_euclid_dist")
    small = (sizes <= _DIRECT_CDIST).view(-1, 1, 1)
    corner = dist[:, :_DIRECT_CDIST, :_DIRECT_CDIST]
    corner.copy_(torch.where(small, direct, corner))
    return dist


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
