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
    # The facts `PruningTrace.explain` reads, where the run has them:
    similarity: torch.Tensor | None = None  # (T, N) stage 1's static similarity
    group: torch.Tensor | None = None  # (M,) stage-2 budget sets
    question_attention: torch.Tensor | None = None  # (Q, M), zero rows before the question
    density: torch.Tensor | None = None  # (T, N) DPC-KNN density, NaN where not clustered
    separation: torch.Tensor | None = None  # (T, N) DPC-KNN separation, likewise

    @classmethod
    def of(
        cls,
        merge: MergeResult,
        kept: torch.Tensor | None,
        scores: torch.Tensor | None,
        question_attention: torch.Tensor | None = None,
        **details: Any,
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
            merge.similarity,
            merge.groups,
            question_attention,
            merge.density,
            merge.separation,
        )

    def _optional(self) -> tuple[torch.Tensor | None, ...]:
        return (
            self.kept,
            self.scores,
            self.similarity,
            self.group,
            self.question_attention,
            self.density,
            self.separation,
        )

    def _parts(self) -> list[torch.Tensor]:
        parts = [self.assignment, self.segments, self.static]
        parts += [t for t in self._optional() if t is not None]
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
        kept, scores, similarity, group, attention, density, separation = (
            None if x is None else next(chunks).reshape(x.shape) for x in t._optional()
        )
        kept = None if kept is None else kept.astype(bool)
        scores = None if scores is None else scores.astype(np.float32)
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
        trace = PruningTrace.from_stages(merge, kept=kept, scores=scores, timings=timings, **details)
        if similarity is not None:
            trace.similarity = similarity.astype(np.float32).reshape(trace.static.shape)
        if density is not None:
            trace.density = density.astype(np.float32).reshape(trace.static.shape)
            trace.separation = separation.astype(np.float32).reshape(trace.static.shape)
        if group is not None:
            trace.group = group.astype(np.int64)
        if attention is not None:  # the rows before the question are zero: only its rows stay
            asks = attention.any(1)
            trace.question_attention = attention[asks.argmax() if asks.any() else 0 :].astype(np.float32)
        done[id(t)] = trace
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

    Optional facts for `explain` (None where the run did not record them):
    similarity: (T, H, W) stage 1's static similarity of the token's grid position over the
        frames of its segment (mean pairwise cosine; static when above `tau` in the paper's mode).
    group: (M,) stage-2 budget set of each merged token (`MergeResult.groups`).
    question_attention: (Q, M) attention of each question row to each merged token at layer M,
        max over heads (the rows stage 2's scores are the max of).
    question_tokens: (Q,) the text of those question rows (the prompt's last Q tokens).
    density, separation: (T, H, W) stage 1's DPC-KNN density and separation of each token in
        the set it was clustered in (`MergeResult.density`); NaN where its set was not clustered.
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
    similarity: np.ndarray | None = None
    group: np.ndarray | None = None
    question_attention: np.ndarray | None = None
    question_tokens: list[str] | None = None
    density: np.ndarray | None = None
    separation: np.ndarray | None = None

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

    # ---- one token's story (`explain`) ------------------------------------------------------

    def members(self, frame: int, row: int, col: int) -> np.ndarray:
        """(T, H, W) bool: every original token that went into the same stage-1 token as
        (frame, row, col) (static tokens over time, a cluster within a frame); the token alone
        where a method dropped it before the language model."""
        index = self.merged_index[frame, row, col]
        if index < 0:
            alone = np.zeros(self.merged_index.shape, dtype=bool)
            alone[frame, row, col] = True
            return alone
        return self.merged_index == index

    def explain(
        self, frame: int, row: int, col: int, times: np.ndarray | None = None, neighbours: int = 3
    ) -> dict[str, Any]:
        """Why (frame, row, col) was merged, kept or dropped, as plain JSON-ready facts.

        times: (T,) seconds of each frame, if known. neighbours: how many scores either side of
        stage 2's cut-off to show. Keys: where the token is (frame, time_s, row, col, segment,
        segment_frames), `fate`, `stage1` (static or dynamic, its similarity against tau, the
        size of its stage-1 token and the frames it spans) and `stage2` (score, rank and cut-off
        in its budget set, and the question words that attended to it most), None where that
        stage did not run. Facts the run did not record (`similarity`, `question_attention`)
        are None.
        """
        frames, height, width = self.static.shape
        if not (0 <= frame < frames and 0 <= row < height and 0 <= col < width):
            raise ValueError(
                f"token ({frame}, {row}, {col}) is outside the trace's {frames} frames of {height} x {width} tokens"
            )
        segment = int(self.segment[frame])
        in_segment = np.flatnonzero(self.segment == segment)
        index = int(self.merged_index[frame, row, col])
        kept = bool(self.kept[frame, row, col])
        members = self.members(frame, row, col)
        if index < 0:
            fate = "dropped before the language model"
        elif kept or not self.config.get("stage2"):
            fate = "kept"
        else:
            fate = "dropped by stage 2"
        return {
            "frame": frame,
            "time_s": None if times is None else float(times[frame]),
            "row": row,
            "col": col,
            "segment": segment,
            "segment_frames": [int(in_segment[0]), int(in_segment[-1])],
            "method": self.method,
            "fate": fate,
            "merged_index": index,
            "stage1": self._stage1_facts(frame, row, col, members),
            "stage2": None if index < 0 else self._stage2_facts(index, neighbours),
        }

    def _stage1_facts(self, frame: int, row: int, col: int, members: np.ndarray) -> dict[str, Any]:
        static = bool(self.static[frame, row, col])
        similarity = None if self.similarity is None else float(self.similarity[frame, row, col])
        if similarity is not None and not np.isfinite(similarity):
            similarity = None  # a one-frame segment: nothing to compare with
        if not self.config.get("stage1", True):
            rule = "stage 1 off: every token goes on alone"
        elif self.method not in ("prunevid", "stage1"):
            rule = f"the {self.method} rule decides before the language model; similarity for reference"
        elif self.config.get("retention") is None:
            rule = "static when similarity > tau"
        else:
            rule = "under a token budget, the most similar positions of a segment are static"
        spanned = np.flatnonzero(members.any((1, 2)))
        return {
            "static": static,
            "similarity": similarity,
            "tau": self.config.get("tau"),
            "rule": rule,
            "members": int(members.sum()),
            "members_in_frame": int(members[frame].sum()),
            "member_frames": [int(spanned[0]), int(spanned[-1])],
            "density": _finite(self.density, frame, row, col),
            "separation": _finite(self.separation, frame, row, col),
        }

    def _stage2_facts(self, index: int, neighbours: int) -> dict[str, Any] | None:
        scores, kept = self._merged_scores()
        if not self.config.get("stage2") or np.isnan(scores[index]):
            return None
        sets = self._budget_sets()
        scope = np.flatnonzero(sets == sets[index])
        # Highest score first; ties in stage-1 order (the order `topk` sees them).
        order = scope[np.argsort(-scores[scope], kind="stable")]
        rank = int(np.flatnonzero(order == index)[0]) + 1
        kept_order = order[kept[order]]
        dropped_order = order[~kept[order]]
        facts: dict[str, Any] = {
            "score": float(scores[index]),
            "kept": bool(kept[index]),
            "rank": rank,
            "set_size": int(scope.size),
            "kept_in_set": int(kept_order.size),
            "kept_rank": int(np.flatnonzero(kept_order == index)[0]) + 1 if kept[index] else None,
            "scope": "budget set" if self._sets_by_stage1() else "video",
            "lowest_kept": [float(s) for s in scores[kept_order[-neighbours:]][::-1]],
            "highest_dropped": [float(s) for s in scores[dropped_order[:neighbours]]],
            "question_words": self._question_words(index),
        }
        return facts

    def _merged_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(M,) stage-2 score and kept flag of each stage-1 token, from its members."""
        flat = self.merged_index.reshape(-1)
        real = flat >= 0
        scores = np.full(self.num_after_stage1, np.nan, dtype=np.float32)
        kept = np.zeros(self.num_after_stage1, dtype=bool)
        scores[flat[real]] = self.score.reshape(-1)[real]
        kept[flat[real]] = self.kept.reshape(-1)[real]
        return scores, kept

    def _sets_by_stage1(self) -> bool:
        """PruneVid's own rule keeps a share of each budget set; FastV- and random-style rules
        rank the whole video."""
        return self.method in ("prunevid", "stage2")

    def _budget_sets(self) -> np.ndarray:
        """(M,) budget set of each stage-1 token: recorded (`group`), else one set per segment's
        static tokens and one per frame's dynamic tokens (`MergeResult.groups`' rule)."""
        count = self.num_after_stage1
        if not self._sets_by_stage1():
            return np.zeros(count, dtype=np.int64)
        if self.group is not None:
            return np.asarray(self.group)
        flat = self.merged_index.reshape(-1)
        real = np.flatnonzero(flat >= 0)
        first = np.full(count, flat.size, dtype=np.int64)
        np.minimum.at(first, flat[real], real)  # each stage-1 token's first member
        frame = first // (self.grid[0] * self.grid[1])
        static = self.static.reshape(-1)[first]
        num_segments = int(self.segment.max()) + 1
        return np.where(static, self.segment[frame], num_segments + frame)

    def _question_words(self, index: int, top: int = 5) -> list[dict[str, Any]] | None:
        """The question rows that attended most to stage-1 token `index`, highest first."""
        if self.question_attention is None:
            return None
        column = np.asarray(self.question_attention)[:, index]
        words = self.question_tokens or [f"#{q}" for q in range(column.size)]
        order = np.argsort(-column, kind="stable")[:top]
        return [{"token": words[q], "position": int(q), "attention": float(column[q])} for q in order]


def _finite(values: np.ndarray | None, frame: int, row: int, col: int) -> float | None:
    """One token's value of an optional (T, H, W) fact, None where absent or not a number."""
    if values is None or not np.isfinite(values[frame, row, col]):
        return None
    return float(values[frame, row, col])
