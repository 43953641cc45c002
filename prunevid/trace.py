"""PruningTrace: what happened to every original visual token of one video (for plots and JSON)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .merge import MergeResult


@dataclass
class PendingTrace:
    """A trace still on the device, as a prefill leaves it: `PruningTrace.from_stages`'s
    arguments, stage 1's as the tensors the trace needs (not the merged tokens).
    `materialize` turns a batch of them into PruningTraces in one device-to-host copy."""

    assignment: torch.Tensor  # (T, N)
    segments: torch.Tensor  # (T,)
    static: torch.Tensor  # (T, N)
    grid: tuple[int, int]
    num_merged: int
    kept: torch.Tensor | None  # (M,) bool
    scores: torch.Tensor | None  # (M,)
    details: dict[str, Any] = field(default_factory=dict)  # from_stages' other arguments

    @classmethod
    def of(
        cls, merge: MergeResult, kept: torch.Tensor | None, scores: torch.Tensor | None, **details: Any
    ) -> PendingTrace:
        return cls(
            merge.assignment,
            merge.segments,
            merge.static,
            merge.grid,
            merge.num_tokens,
            kept,
            scores,
            details,
        )

    def _parts(self) -> list[torch.Tensor]:
        parts = [self.assignment, self.segments, self.static]
        parts += [t for t in (self.kept, self.scores) if t is not None]
        return [t.reshape(-1) for t in parts]


def materialize(traces: list[PendingTrace | PruningTrace | None]) -> list[PruningTrace | None]:
    """PruningTraces of a batch's traces: the pending ones' tensors in one transfer (as
    float64, exact for their indices, flags and float32 scores)."""
    pending = [t for t in traces if isinstance(t, PendingTrace)]
    if not pending:
        return list(traces)
    parts = [p for t in pending for p in t._parts()]
    values = torch.cat([p.to(parts[0].device, torch.float64) for p in parts]).cpu().numpy()
    chunks = iter(np.split(values, np.cumsum([p.numel() for p in parts])[:-1]))
    done = {}
    for t in pending:
        assignment, segments, static = (next(chunks) for _ in range(3))
        kept = None if t.kept is None else next(chunks).astype(bool)
        scores = None if t.scores is None else next(chunks).astype(np.float32)
        shape = tuple(t.assignment.shape)
        merge = MergeResult(
            tokens=torch.empty(t.num_merged, 0),
            assignment=torch.from_numpy(assignment.astype(np.int64).reshape(shape)),
            segments=torch.from_numpy(segments.astype(np.int64)),
            static=torch.from_numpy(static.astype(bool).reshape(shape)),
            groups=torch.empty(0, dtype=torch.long),
            grid=t.grid,
        )
        details = dict(t.details)
        # Timings may still be device intervals (`models.timing.Interval`): read them now.
        timings = details.pop("timings", {})
        timings = {k: v if isinstance(v, float) else v.seconds() for k, v in timings.items()}
        done[id(t)] = PruningTrace.from_stages(merge, kept=kept, scores=scores, timings=timings, **details)
    return [done.get(id(t), t) for t in traces]


@dataclass
class PruningTrace:
    """Per original token (frame t, grid row, grid col), stored as (T, H, W) arrays.

    segment: (T,) temporal segment of each frame.
    static: (T, H, W) merged over time as static in stage 1.
    merged_index: (T, H, W) index of the stage-1 token it went into (0 .. num_after_stage1 - 1),
        -1 when a method dropped it before the language model (EVS-style pruning).
    kept: (T, H, W) whether that merged token survived stage 2 (False for dropped tokens).
    score: (T, H, W) stage-2 relevance of that merged token (NaN when stage 2 is off).
    timings: seconds per stage: "stage1_s", "stage2_s" (scoring and selection) and
        "llm_prefill_s" (the decoder prefill, stage 2 included, stage 1 not).
    stage1_reused: stage 1's result was reused from an earlier call on the same features.
    method: the method that ran (`prunevid.baselines.METHODS`); stage 1 / stage 2 above mean its
        rules before and inside the language model.
    num_layers: decoder layers of the model (for the layer-averaged retention), if known.
    """

    segment: np.ndarray
    static: np.ndarray
    merged_index: np.ndarray
    kept: np.ndarray
    score: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    stage1_reused: bool = False
    method: str = "prunevid"
    num_layers: int | None = None

    @property
    def num_frames(self) -> int:
        return self.static.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.static.shape[1], self.static.shape[2]

    @property
    def num_visual_tokens(self) -> int:
        return int(self.static.size)

    @property
    def num_after_stage1(self) -> int:
        return int(self.merged_index.max()) + 1

    @property
    def num_after_stage2(self) -> int:
        return int(np.unique(self.merged_index[self.kept]).size)

    @property
    def retention(self) -> float:
        """Visual tokens that reach the last layers, as a share of the video's."""
        return self.num_after_stage2 / self.num_visual_tokens

    @property
    def layer_retention(self) -> float | None:
        """Visual tokens averaged over all decoder layers, as a share of the video's: the
        stage-1 count up to `selected_layer`, the final count after it (what FLOPs follow)."""
        if self.num_layers is None:
            return None
        before = self.config.get("selected_layer", 0) + 1 if self.config.get("stage2") else self.num_layers
        before = min(before, self.num_layers)
        tokens = before * self.num_after_stage1 + (self.num_layers - before) * self.num_after_stage2
        return tokens / (self.num_layers * self.num_visual_tokens)

    @classmethod
    def from_stages(
        cls,
        merge: MergeResult,
        kept: np.ndarray | None = None,
        scores: np.ndarray | None = None,
        timings: dict[str, float] | None = None,
        config: dict[str, Any] | None = None,
        stage1_reused: bool = False,
        method: str = "prunevid",
        num_layers: int | None = None,
    ) -> PruningTrace:
        """Combine stage 1's result with stage 2's per-merged-token kept mask and scores (M,)."""
        shape = (merge.assignment.shape[0], *merge.grid)
        index = merge.assignment.cpu().numpy().reshape(shape)
        num_merged = merge.num_tokens
        kept = np.ones(num_merged, dtype=bool) if kept is None else np.asarray(kept, dtype=bool)
        scores = np.full(num_merged, np.nan, dtype=np.float32) if scores is None else np.asarray(scores)
        dropped = index < 0  # gone before the language model: not kept, no score
        return cls(
            segment=merge.segments.cpu().numpy(),
            static=merge.static.cpu().numpy().reshape(shape),
            merged_index=index,
            kept=np.where(dropped, False, kept[index]),
            score=np.where(dropped, np.nan, scores.astype(np.float32)[index]),
            timings=dict(timings or {}),
            config=dict(config or {}),
            stage1_reused=stage1_reused,
            method=method,
            num_layers=num_layers,
        )

    def summary(self) -> dict[str, Any]:
        """Counts, retention and timings: the small part that UIs and benchmarks print."""
        return {
            "method": self.method,
            "num_visual_tokens": self.num_visual_tokens,
            "num_after_stage1": self.num_after_stage1,
            "num_after_stage2": self.num_after_stage2,
            "retention_target": self.config.get("retention"),
            "retention": self.retention,
            "retention_layer_averaged": self.layer_retention,
            "num_segments": int(self.segment.max()) + 1,
            "stage1_reused": self.stage1_reused,
            "timings": dict(self.timings),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary, the config and one column per field over all T*H*W tokens."""
        frame, row, col = np.indices(self.static.shape).reshape(3, -1)
        score = self.score.reshape(-1)
        return {
            **self.summary(),
            "grid": list(self.grid),
            "num_frames": self.num_frames,
            "num_layers": self.num_layers,
            "config": self.config,
            "segment_of_frame": self.segment.tolist(),
            "tokens": {
                "frame": frame.tolist(),
                "row": row.tolist(),
                "col": col.tolist(),
                "segment": self.segment[frame].tolist(),
                "static": self.static.reshape(-1).tolist(),
                "merged_index": self.merged_index.reshape(-1).tolist(),
                "kept": self.kept.reshape(-1).tolist(),
                "score": [None if np.isnan(s) else float(s) for s in score],
            },
        }

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict())
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningTrace:
        shape = (data["num_frames"], *data["grid"])
        tokens = data["tokens"]
        score = np.array([np.nan if s is None else s for s in tokens["score"]], dtype=np.float32)
        return cls(
            segment=np.asarray(data["segment_of_frame"], dtype=np.int64),
            static=np.asarray(tokens["static"], dtype=bool).reshape(shape),
            merged_index=np.asarray(tokens["merged_index"], dtype=np.int64).reshape(shape),
            kept=np.asarray(tokens["kept"], dtype=bool).reshape(shape),
            score=score.reshape(shape),
            timings=dict(data.get("timings", {})),
            config=dict(data.get("config", {})),
            stage1_reused=bool(data.get("stage1_reused", False)),
            method=data.get("method", "prunevid"),
            num_layers=data.get("num_layers"),
        )

    @classmethod
    def from_json(cls, text: str) -> PruningTrace:
        return cls.from_dict(json.loads(text))
