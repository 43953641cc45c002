"""Stage-2 rules of the baselines PruneVid is compared with, at a fixed retention.

Each returns a `Rule` for `prunevid.patch(model, config, rule=...)`: it sees the attention of the
question rows over the n visual tokens, (H, nq, n), and keeps round(ratio * n) of them.
"""

from __future__ import annotations

import torch

from .models.decoder import Rule


def _top(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    kept = torch.zeros_like(scores, dtype=torch.bool)
    count = min(len(scores), max(1, round(ratio * len(scores))))
    kept[scores.topk(count).indices] = True
    return kept


def fastv(ratio: float) -> Rule:
    """FastV-style: rank by the attention the last prompt token pays, averaged over heads."""

    def rule(
        attention: torch.Tensor, groups: torch.Tensor, alpha: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = attention[:, -1].mean(0)
        return scores, _top(scores, ratio)

    return rule


def random(ratio: float, seed: int = 0) -> Rule:
    """Uniformly random tokens (seeded: the same call keeps the same tokens)."""

    def rule(
        attention: torch.Tensor, groups: torch.Tensor, alpha: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        scores = torch.rand(attention.shape[-1], generator=generator).to(attention.device)
        return scores, _top(scores, ratio)

    return rule
