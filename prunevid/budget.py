"""Token budgets: how many visual tokens each stage keeps when a retention is asked for.

`PruneVidConfig(retention=r)` fixes the final count of a video's N visual tokens at
`final_count(N, r) = max(1, round(r * N))`. Stage 1 keeps `stage1_count` of them (a function of N
and the settings only, never of the content, so a server can reserve the room before the video
is encoded), stage 2 the final count. Inside a stage, `allocate` shares a count among the sets
that stage works on (stage 1's static and per-frame dynamic sets; stage 2's budget sets) in
proportion to their sizes. Pure integer arithmetic.
"""

from __future__ import annotations

import math

from .config import PruneVidConfig


def final_count(num_visual: int, retention: float) -> int:
    """Visual tokens that reach the layers after stage 2 (or the language model, without it)."""
    return max(1, round(retention * num_visual))


def stage1_count(num_visual: int, config: PruneVidConfig) -> int:
    """Tokens after stage 1 under `config.retention`: the final count when stage 1 does all the
    reduction (stage 2 off), all N when it does none (stage 1 off), else N * retention **
    stage1_share, never below the final count."""
    if config.retention is None:
        raise ValueError("stage1_count needs a config with a retention")
    final = final_count(num_visual, config.retention)
    if not config.stage1:
        return num_visual
    if not config.stage2:
        return final
    return min(num_visual, max(final, round(num_visual * config.retention**config.stage1_share)))


def allocate(sizes: list[int], total: int, minimum: int = 1) -> list[int]:
    """Share `total` among sets of `sizes` in proportion to their sizes (largest remainder).

    Every set gets between min(minimum, size) and size; ties go to the earlier set. Requires
    sum(min(minimum, size)) <= total <= sum(sizes).
    """
    floors = [min(minimum, size) for size in sizes]
    if not sum(floors) <= total <= sum(sizes):
        raise ValueError(
            f"cannot share {total} tokens among sets of sizes {sizes} with at least {minimum} each"
        )
    whole = sum(sizes) or 1
    quotas = [total * size / whole for size in sizes]
    counts = [max(floor, math.floor(quota)) for floor, quota in zip(floors, quotas)]
    while (gap := total - sum(counts)) != 0:
        step = 1 if gap > 0 else -1
        movable = [
            i for i in range(len(sizes)) if (counts[i] < sizes[i] if step > 0 else counts[i] > floors[i])
        ]
        # Adding: the set furthest below its quota; removing: the one furthest above it.
        chosen = max(movable, key=lambda i: (step * (quotas[i] - counts[i]), -i))
        counts[chosen] += step
    return counts
