"""Token budgets: how many visual tokens each stage keeps when a retention is asked for.

`PruneVidConfig(retention=r)` fixes the final count of a video's N visual tokens at
`final_count(N, r) = max(1, round(r * N))`. Stage 1 keeps `stage1_count` of them (a function of N
and the settings only, never of the content, so a server can reserve the room before the video
is encoded), stage 2 the final count. Inside a stage, `allocate` shares a count among the sets
that stage works on (stage 1's static and per-frame dynamic sets; stage 2's budget sets) in
proportion to their sizes, or, under `per_step_budget`, `step_counts` gives every time step an
equal share. Pure integer arithmetic.
"""

from __future__ import annotations

import torch

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


def step_counts(num_steps: int, per_step: int, config: PruneVidConfig) -> list[int]:
    """Tokens stage 1 leaves in each of a video's time steps under `config.per_step_budget`:
    `stage1_count(num_steps * per_step)` shared equally, the earlier steps one more where it does
    not divide. Known from the shape alone, before the video is encoded."""
    total = stage1_count(num_steps * per_step, config)
    if total < num_steps:
        raise ValueError(
            f"a per-step budget needs a token per time step: retention {config.retention} leaves {total} "
            f"of {num_steps * per_step} tokens for {num_steps} time steps (raise the retention, or sample "
            "fewer frames)"
        )
    base, longer = divmod(total, num_steps)
    return [base + 1] * longer + [base] * (num_steps - longer)


def allocate(sizes: list[int], total: int, minimum: int = 1) -> list[int]:
    """Share `total` among sets of `sizes` in proportion to their sizes (largest remainder).

    Every set gets between min(minimum, size) and size; ties go to the earlier set. Requires
    sum(min(minimum, size)) <= total <= sum(sizes). The host form of `allocate_tensor`.
    """
    floors = [min(minimum, size) for size in sizes]
    if not sum(floors) <= total <= sum(sizes):
        raise ValueError(
            f"cannot share {total} tokens among sets of sizes {sizes} with at least {minimum} each"
        )
    return allocate_tensor(torch.tensor(sizes, dtype=torch.long), total, minimum).tolist()


def allocate_tensor(
    sizes: torch.Tensor, total: int | torch.Tensor, minimum: int | torch.Tensor = 1
) -> torch.Tensor:
    """`allocate` on the device, without reading anything back: (S,) sizes -> (S,) counts.

    Each set starts at max(min(minimum, size), floor(quota)), quota = total * size / sum(sizes);
    the gap to `total` is then closed one token at a time, adding to the set furthest below its
    quota (removing from the one furthest above it), ties to the earlier set. That greedy walk
    equals taking the |gap| best of every set's possible steps at once, because a set's later
    steps always rank below its earlier ones; the gap is below S * max(1, minimum), so S of them
    per set suffice. `total` may be a 0-d tensor, and so may `minimum` if it is 0 or 1 (a
    count the host does not know); the caller guarantees that the total fits (`allocate` checks).
    """
    sizes = sizes.long()
    steps = torch.arange(
        len(sizes) * (max(1, minimum) if isinstance(minimum, int) else 1), device=sizes.device
    )
    # Host ints stay Python scalars in the arithmetic (the same values, no tensor to build).
    total = total.to(sizes.device) if isinstance(total, torch.Tensor) else total
    if isinstance(minimum, torch.Tensor):
        floors = torch.minimum(sizes, minimum.to(sizes.device))
    else:
        floors = sizes.clamp(max=minimum)
    # float64 and an exact integer numerator: the same quotas as Python's total * size / whole
    # (the integer denominator is promoted exactly); they are >= 0, so truncating floors them.
    quotas = (total * sizes).double() / sizes.sum().clamp(min=1)
    counts = torch.maximum(floors, quotas.long())
    gap = total - counts.sum()
    quota, count = quotas[:, None], counts[:, None]  # (S, 1)
    adding = count + steps  # (S, J): the count before each possible step
    # A step's priority: how far below its quota the set is (adding) or above it (removing).
    up = (quota - adding).masked_fill(adding >= sizes[:, None], -torch.inf)
    removing = count - steps
    down = (removing - quota).masked_fill(removing <= floors[:, None], -torch.inf)
    priority = torch.where(gap > 0, up, down).flatten()
    rank = priority.sort(descending=True, stable=True).indices.argsort()  # each step's place
    taken = (rank < gap.abs()).view(len(sizes), -1).sum(1)
    return counts + gap.sign() * taken
