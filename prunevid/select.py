"""Stage 2: question-guided selection of visual tokens (ALGORITHM.md §5.2-5.4). Pure torch.

Everything here runs on the device without reading a value back (DESIGN.md "On a GPU: no host
stalls"), given what the host already knows: the sets' sizes in the paper's mode
(`MergeResult.set_sizes`), the number of merged tokens under a retention. `kept_total` says how
many tokens are kept from that alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .budget import allocate_tensor, final_count
from .config import PruneVidConfig

# A stage-2 rule: (attention (H, nq, n) of the question rows over the n visual tokens, groups
# (n,) their budget sets, counts (S,) tokens to keep per set) -> (scores (n,), kept (n,) bool).
Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def question_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the question rows over all prompt keys, in float32.

    queries: (H, nq, d) question tokens; keys: (Hkv, nk, d) prompt tokens, H a multiple of Hkv
    (grouped-query heads: query head h reads key head h // (H / Hkv)). No RoPE, no causal mask.
    Returns (H, nq, nk). Only these nq rows are ever formed, never the full nk x nk map.
    """
    heads, kv_heads = queries.shape[0], keys.shape[0]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key heads")
    keys = keys.float().repeat_interleave(heads // kv_heads, dim=0)
    # The bmm that `@` runs on these 3-D operands, without its reshapes.
    logits = torch.bmm(queries.float(), keys.transpose(1, 2)) / queries.shape[-1] ** 0.5
    return logits.softmax(-1)


def visual_scores(attention: torch.Tensor) -> torch.Tensor:
    """Score of each key: the max over heads and question rows. (H, nq, nk) -> (nk,)."""
    return attention.amax(dim=(0, 1))


def question_guided(
    attention: torch.Tensor, groups: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PruneVid's rule. attention: (H, nq, n) question rows over the n visual tokens; groups:
    (n,) budget set of each; counts: (S,) tokens to keep per set (`keep_counts`).

    Returns (scores (n,), kept (n,) bool): max over heads and rows, then the per-set budget.
    """
    scores = visual_scores(attention)
    return scores, kept_mask(scores, groups, counts)


def keep_counts(
    groups: torch.Tensor, config: PruneVidConfig, num_visual: int, num_sets: int | None = None
) -> torch.Tensor:
    """How many tokens stage 2 keeps in each budget set. groups: (n,) -> (S,).

    The paper's max(1, int(alpha * size)) per set; under `config.retention` the final count of
    a video of `num_visual` tokens, shared among the sets in proportion to their sizes (at least
    one each while there are enough). Empty sets keep nothing.

    With `num_sets`, any host-known bound on the number of sets (2T for a video; `len(groups)`
    will do): (num_sets,) counts on groups' device, zero past the last set, nothing read (their
    total is `kept_total`). Without it the sets are counted on the host: one read.
    """
    if num_sets is not None:
        sizes = torch.zeros(num_sets, dtype=torch.long, device=groups.device)
        sizes.scatter_add_(0, groups, torch.ones_like(groups))
    else:
        sizes = torch.bincount(groups.cpu())
    if config.retention is None:
        counts = (config.alpha * sizes.double()).long().clamp(min=1)  # float64, as int(alpha * size)
        return counts.minimum(sizes)  # alpha <= 1: only an empty set's 1 changes, to 0
    total = final_count(num_visual, config.retention)
    minimum = (total >= (sizes > 0).sum()).long()  # one each, if there are enough
    return allocate_tensor(sizes, min(total, len(groups)), minimum)


def kept_total(
    config: PruneVidConfig, num_visual: int, num_merged: int, set_sizes: list[int] | None = None
) -> int | None:
    """How many of `num_merged` visual tokens stage 2 keeps (the sum of `keep_counts`), known on
    the host without a read: min(final_count(num_visual, r), num_merged) under a retention; in
    the paper's mode the sum of max(1, int(alpha * size)) over `set_sizes`, or None without them
    (the count then depends on content the host has not read)."""
    if config.retention is not None:
        return min(final_count(num_visual, config.retention), num_merged)
    if set_sizes is None:
        return None
    return sum(max(1, int(config.alpha * size)) for size in set_sizes if size)


def keep_by_budget(
    scores: torch.Tensor, groups: torch.Tensor, counts: torch.Tensor, total: int | None = None
) -> torch.Tensor:
    """Indices of the tokens kept, in increasing order.

    scores: (M,) relevance; groups: (M,) budget set of each token (stage 1's static set of a
    segment or dynamic set of a frame); counts: (S,) tokens each set keeps, its best first.
    Equal scores keep the lower index. `total`: how many are kept (`kept_total`), where the
    host knows it; without it their number is read back.
    """
    kept = kept_mask(scores, groups, counts)
    if total is None:
        return kept.nonzero().squeeze(1)
    return (~kept).long().argsort(stable=True)[:total]  # kept ones first, in index order


def kept_mask(scores: torch.Tensor, groups: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(M,) bool: the `counts[s]` best-scored tokens of each set s (ties: the lower index), on
    the device, nothing read. scores, groups: (M,); counts: (S,), S above every group id."""
    order = scores.sort(descending=True, stable=True).indices
    ordered_groups, by_set = groups[order].sort(stable=True)
    order = order[by_set]  # by set, best first inside each
    # A token's rank in its set: its place less its set's first place in the sorted groups.
    first = torch.searchsorted(ordered_groups, ordered_groups)
    rank = torch.arange(len(order), device=scores.device) - first
    best = rank < counts.to(scores.device)[ordered_groups]
    return torch.zeros_like(best).scatter_(0, order, best)
