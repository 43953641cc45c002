"""Every PruneVid knob in one validated dataclass, with the paper's defaults."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# (field, lower, upper, lower inclusive, upper inclusive): the allowed range of each numeric knob.
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "tau": (-1.0, 1.0, True, True),
    "temporal_segment_ratio": (0.0, 1.0, False, True),
    "cluster_ratio": (0.0, 1.0, False, True),
    "k": (1, math.inf, True, False),
    "spatial_merge_threshold": (0, math.inf, True, False),
    "dpc_noise": (0.0, 1.0, True, True),
    "seed": (0, 2**63 - 1, True, True),
    "selected_layer": (0, math.inf, True, False),
    "alpha": (0.0, 1.0, False, True),
    "num_frames": (1, 1024, True, True),
    "retention": (0.0, 1.0, False, True),
    "stage1_share": (0.0, 1.0, True, True),
}
_INTEGER_FIELDS = {"k", "spatial_merge_threshold", "seed", "selected_layer", "num_frames"}
_OPTIONAL_FIELDS = {"retention"}  # None switches the feature off


@dataclass(frozen=True)
class PruneVidConfig:
    """PruneVid settings. Defaults are the paper's (16 frames, LLaVA-OneVision / PLLaVA).

    stage1: spatial-temporal token merging before the language model.
    stage2: question-guided pruning at decoder layer `selected_layer` (0-based).
    tau: cosine-similarity threshold above which a grid position is static in a segment.
    temporal_segment_ratio: temporal clusters = max(1, int(T * ratio)).
    cluster_ratio: spatial clusters = max(1, int(n * ratio)) for a set of n > threshold tokens.
    k: DPC-KNN neighbours.
    spatial_merge_threshold: sets of at most this many tokens are not clustered.
    dpc_noise: scale of the seeded tie-break noise added to DPC densities (0 disables it).
    seed: seed of that noise.
    selected_layer: decoder layer whose queries/keys score the visual tokens (must exist in the model).
    alpha: fraction of visual tokens kept by stage 2 in each budget set.
    num_frames: frames sampled uniformly from a video.
    centre: measure stage 1's static similarity on tokens minus the video's mean token (an
        option beyond the paper: towers whose tokens share a large common component make every
        raw cosine high, so a raw tau is model-specific; off reproduces the paper).
    retention: a token budget (beyond the paper): exactly max(1, round(retention * N)) of a
        video's N visual tokens reach the decoder layers after `selected_layer` (or the whole
        language model when stage 2 is off). Stage 1's cluster counts and stage 2's keep counts
        are then derived from it (`prunevid.budget`), and `cluster_ratio`, `alpha` and
        `spatial_merge_threshold` are not used; `tau` still decides what is static. None: the
        paper's behaviour, where the count is an outcome of the knobs.
    stage1_share: with `retention`, stage 1's share of the reduction on a log scale: stage 1
        keeps retention ** stage1_share of the tokens, stage 2 the rest. 0.5 splits it evenly,
        as the paper's defaults do (~40% after stage 1, ~40% of that after stage 2).
    per_step_budget: with `retention`, every time step (frame) gets an equal share of stage 1's
        count (`budget.step_counts`), whatever the content, so that a server knows how many
        tokens each step will hold before the video is encoded (vLLM's Qwen3-VL, whose prompt
        holds one run of tokens per time step). Off: the count is shared among stage 1's sets in
        proportion to their sizes.
    """

    stage1: bool = True
    stage2: bool = True
    tau: float = 0.8
    temporal_segment_ratio: float = 0.25
    cluster_ratio: float = 0.5
    k: int = 7
    spatial_merge_threshold: int = 14
    dpc_noise: float = 1e-6
    seed: int = 0
    selected_layer: int = 10
    alpha: float = 0.4
    num_frames: int = 16
    centre: bool = False
    retention: float | None = None
    stage1_share: float = 0.5
    per_step_budget: bool = False

    def __post_init__(self) -> None:
        for name in ("stage1", "stage2", "centre", "per_step_budget"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, (low, high, low_in, high_in) in _RANGES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            kind = "an integer" if name in _INTEGER_FIELDS else "a number"
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if name in _INTEGER_FIELDS and not is_int:
                raise ValueError(f"{name} must be {kind} in {_range_text(name)}, got {value!r}")
            if not (is_int or isinstance(value, float)) or math.isnan(value):
                raise ValueError(f"{name} must be {kind} in {_range_text(name)}, got {value!r}")
            above = value >= low if low_in else value > low
            below = value <= high if high_in else value < high
            if not (above and below):
                raise ValueError(f"{name} must be in {_range_text(name)}, got {value!r}")
        if self.per_step_budget and self.retention is None:
            raise ValueError("per_step_budget shares a retention budget among time steps: set retention too")

    def replace(self, **changes: Any) -> PruneVidConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PruneVidConfig:
        """Build from a mapping; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PruneVidConfig field(s): {', '.join(unknown)}")
        return cls(**values)


def _range_text(name: str) -> str:
    low, high, low_in, high_in = _RANGES[name]
    fmt = (
        (lambda v: "inf" if v == math.inf else f"{v:g}")
        if name not in _INTEGER_FIELDS
        else (lambda v: "inf" if v == math.inf else str(int(v)))
    )
    return f"{'[' if low_in else '('}{fmt(low)}, {fmt(high)}{']' if high_in else ')'}"
