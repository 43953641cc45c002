"""Known-answer accuracy of a tiny checkpoint, pruned and not: what the benchmark, the training
script and the pipeline share.

`load_checkpoint` / `load_preset` / `write_preset` read and write a trained tiny model with its
PruneVid preset (`prunevid.json`, beside the weights). `encode_videos` runs the vision tower
once, (V, T*N + 1, C), for all methods. `evaluate` scores one `Method` (a PruneVid config with an
optional stage-2 rule, or uniform pooling of the tokens) on `prunevid.synthetic` videos; answers
are single words, so an answer is the greedy first token of the prefill. `summarise` makes its
record with 95% Wilson intervals (`wilson`), and `calibrate` picks a preset on training seeds.
The `prunevid bench accuracy` command is `prunevid/bench/accuracy.py`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlavaOnevisionForConditionalGeneration, PreTrainedTokenizerFast
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .api import last_traces, patch, unpatch
from .config import PruneVidConfig
from .models.llava_onevision import PROMPT, FrameProcessing
from .synthetic import FAMILIES, QUESTIONS, TRAIN_SEED_START, Sample, make_sample

WEIGHTS = Path(__file__).parent / "weights" / "tiny"
PRESET_FILE = "prunevid.json"


@dataclass
class Checkpoint:
    """A trained tiny model with its tokenizer, PruneVid preset and frame size."""

    model: LlavaOnevisionForConditionalGeneration
    tokenizer: PreTrainedTokenizerFast
    preset: PruneVidConfig
    frame_size: int

    @property
    def processing(self) -> FrameProcessing:
        return FrameProcessing(size=(self.frame_size, self.frame_size))


@dataclass(frozen=True)
class Method:
    """One way of running the model, shared by both benchmarks: a method of
    `prunevid.baselines.METHODS` with its settings; `config` None is the stock model, unpatched."""

    name: str
    config: PruneVidConfig | None = None
    method: str = "prunevid"


def load_preset(path: str | Path = WEIGHTS) -> tuple[PruneVidConfig, int]:
    """The PruneVid preset and frame size stored beside a checkpoint in `prunevid.json`."""
    data = json.loads((Path(path) / PRESET_FILE).read_text())
    return PruneVidConfig(**data["preset"]), int(data["frame_size"])


def load_checkpoint(path: str | Path = WEIGHTS) -> Checkpoint:
    """`from_pretrained` of the model and tokenizer in `path`, plus its preset (eval mode, fp32)."""
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    preset, size = load_preset(path)
    return Checkpoint(model, tokenizer, preset, size)


# ---- scoring ---------------------------------------------------------------------------------


@torch.no_grad()
def encode_videos(checkpoint: Checkpoint, samples: list[Sample], batch: int = 8) -> torch.Tensor:
    """Pooled visual tokens of every video, (V, T*N + 1, C): shared by all methods."""
    inner = checkpoint.model.model
    chunks = []
    for start in range(0, len(samples), batch):
        pixels = torch.stack([checkpoint.processing(s.frames) for s in samples[start : start + batch]])
        chunks.append(inner.get_video_features(pixels, return_dict=True).pooler_output)
    return torch.cat(chunks)


def _prompt_ids(checkpoint: Checkpoint, question: str, num_video: int, rows: int) -> torch.Tensor:
    tokenizer = checkpoint.tokenizer
    video = tokenizer.convert_ids_to_tokens(checkpoint.model.config.video_token_id)
    prompt = PROMPT.format(question=question).replace("<video>", video * num_video)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids.expand(rows, -1)


@torch.no_grad()
def _answer(checkpoint: Checkpoint, question: str, features: torch.Tensor) -> torch.Tensor:
    """Greedy first answer token of every video for one question."""
    ids = _prompt_ids(checkpoint, question, features.shape[1], len(features))
    out = checkpoint.model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=features)},
        logits_to_keep=1,
        use_cache=False,
    )
    return out.logits[:, -1].argmax(-1)


def evaluate(
    checkpoint: Checkpoint, method: Method, samples: list[Sample], features: torch.Tensor, batch: int = 16
) -> dict:
    """Correctness per family (lists of 0/1) and the mean retention of one method, after
    stage 2 and after stage 1."""
    model = checkpoint.model
    if method.config is None:
        unpatch(model)
    else:
        patch(model, method.config, method.method)
    retentions, stage1, layers = [], [], []
    correct: dict[str, list[int]] = {f: [] for f in FAMILIES}
    answer_ids = {f: [_single_token(checkpoint, s.answer(f)) for s in samples] for f in FAMILIES}
    for family in FAMILIES:
        for start in range(0, len(samples), batch):
            chunk = features[start : start + batch]
            predicted = _answer(checkpoint, QUESTIONS[family], chunk).tolist()
            correct[family] += [int(p == a) for p, a in zip(predicted, answer_ids[family][start:])]
            if method.config is not None:
                traces = last_traces(model)
                retentions += [t.num_after_stage2 / t.num_visual_tokens for t in traces]
                stage1 += [t.num_after_stage1 / t.num_visual_tokens for t in traces]
                layers += [t.layer_retention for t in traces]
    unpatch(model)
    return {
        "correct": correct,
        "retention": float(np.mean(retentions or [1.0])),
        "stage1_retention": float(np.mean(stage1 or [1.0])),
        "layer_retention": float(np.mean(layers or [1.0])),
    }


def _single_token(checkpoint: Checkpoint, word: str) -> int:
    ids = checkpoint.tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"answer {word!r} is not one token of this tokenizer")
    return ids[0]


def wilson(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise(name: str, result: dict, **extra) -> dict:
    """The JSON record of one method: accuracy, interval and per-family accuracy."""
    everything = [c for family in FAMILIES for c in result["correct"][family]]
    per_family = {f: float(np.mean(result["correct"][f])) for f in FAMILIES}
    low, high = wilson(sum(everything), len(everything))
    record = {
        "name": name,
        "retention": round(result["retention"], 4),
        "stage1_retention": round(result["stage1_retention"], 4),
        "retention_layer_averaged": round(result["layer_retention"], 4),
        "accuracy": round(float(np.mean(everything)), 4),
        "interval95": [round(low, 4), round(high, 4)],
        "num_questions": len(everything),
        "per_family": {f: round(v, 4) for f, v in per_family.items()},
        "per_family_interval95": {
            f: [round(x, 4) for x in wilson(sum(result["correct"][f]), len(result["correct"][f]))]
            for f in FAMILIES
        },
    }
    record.update(extra)
    return record


# ---- the preset --------------------------------------------------------------------------------


CALIBRATION_SEED = TRAIN_SEED_START + 500_000_000  # training range, far past any training step


def calibrate(
    checkpoint: Checkpoint,
    num_videos: int = 96,
    taus: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95),
    cluster_ratios: tuple[float, ...] = (0.5, 0.75, 1.0),
    alphas: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7),
    max_retention: float = 0.2,
    log: Callable = print,
) -> tuple[PruneVidConfig, list[dict]]:
    """Choose tau, cluster_ratio, alpha and selected_layer on TRAINING seeds: the most accurate
    setting whose retention is at most `max_retention`; ties go to the lower retention.
    Returns the new preset and every setting tried."""
    preset = checkpoint.preset
    seeds = range(CALIBRATION_SEED, CALIBRATION_SEED + num_videos)
    samples = [make_sample(s, preset.num_frames, checkpoint.frame_size) for s in seeds]
    features = encode_videos(checkpoint, samples)
    layers = checkpoint.model.config.text_config.num_hidden_layers
    tried = []
    settings = [
        dict(selected_layer=layer, tau=tau, cluster_ratio=ratio, alpha=alpha)
        for layer in range(layers - 1)
        for tau in taus
        for ratio in cluster_ratios
        for alpha in alphas
    ]
    for setting in settings:
        result = evaluate(checkpoint, Method("prunevid", preset.replace(**setting)), samples, features)
        tried.append(summarise("prunevid", result, **setting))
        log({k: tried[-1][k] for k in ("retention", "accuracy", *setting)})
    allowed = [r for r in tried if r["retention"] <= max_retention] or tried
    best = max(allowed, key=lambda r: (r["accuracy"], -r["retention"]))
    return preset.replace(**{k: best[k] for k in settings[0]}), tried


def write_preset(
    path: str | Path, preset: PruneVidConfig, frame_size: int, notes: dict | None = None
) -> None:
    """Store a checkpoint's PruneVid preset and frame size in `path/prunevid.json`."""
    data = {"preset": preset.to_dict(), "frame_size": frame_size, **(notes or {})}
    (Path(path) / PRESET_FILE).write_text(json.dumps(data, indent=1) + "\n")
