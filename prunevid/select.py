"""Stage 2: question-guided selection of visual tokens (ALGORITHM.md §5.2-5.4). Pure torch."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .budget import allocate, final_count
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
    logits = queries.float() @ keys.transpose(1, 2) / queries.shape[-1] ** 0.5
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
    kept = torch.zeros_like(scores, dtype=torch.bool)
    kept[keep_by_budget(scores, groups, counts)] = True
    return scores, kept


def keep_counts(groups: torch.Tensor, config: PruneVidConfig, num_visual: int) -> torch.Tensor:
    """How many tokens stage 2 keeps in each budget set. groups: (n,) -> (S,).

    The paper's max(1, int(alpha * size)) per set; under `config.retention` the final count of
    a video of `num_visual` tokens, shared among the sets in proportion to their sizes (at least
    one each while there are enough). Empty sets keep nothing.
    """
    sizes = torch.bincount(groups.cpu())
    if config.retention is None:
        counts = (config.alpha * sizes.double()).long().clamp(min=1)  # float64, as int(alpha * size)
        return counts.where(sizes > 0, 0)
    total = final_count(num_visual, config.retention)
    minimum = 1 if total >= int((sizes > 0).sum()) else 0
    return torch.tensor(allocate(sizes.tolist(), min(total, len(groups)), minimum))


def keep_by_budget(scores: torch.Tensor, groups: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Indices of the tokens kept, in increasing order.

    scores: (M,) relevance; groups: (M,) budget set of each token (stage 1's static set of a
    segment or dynamic set of a frame); counts: (S,) tokens each set keeps, its best first.
    Equal scores keep the lower index.
    """
    order = scores.sort(descending=True, stable=True).indices
    order = order[groups[order].sort(stable=True).indices]  # by set, best first inside each
    sizes = torch.bincount(groups, minlength=len(counts))
    starts = sizes.cumsum(0) - sizes
    ordered_groups = groups[order]
    rank = torch.arange(len(order), device=scores.device) - starts[ordered_groups]
    return order[rank < counts.to(scores.device)[ordered_groups]].sort().values
