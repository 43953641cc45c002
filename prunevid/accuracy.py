"""`prunevid bench accuracy`: known-answer accuracy of the shipped tiny model, pruned and not.

On held-out `prunevid.synthetic` videos (seeds below `TRAIN_SEED_START`) it scores, per
question family and with 95% Wilson intervals:

* full        — no pruning;
* prunevid    — the checkpoint's preset (`prunevid.json`), stages 1 + 2;
* stage1      — stage 1 only;  stage2 — stage 2 only (each frame its own budget set);
* prunevid_defaults — the paper's settings (tau 0.8, cluster_ratio 0.5, alpha 0.4) with
                `selected_layer` scaled by depth (10 of 28 layers);
* fastv       — FastV-style stage-2 rule at PruneVid's measured retention (stage 1 off);
* random      — random stage-2 rule at that retention (stage 1 off);
* uniform     — uniform temporal/spatial average pooling of the visual tokens to that retention,
                fed to the stock model (no PruneVid patch).

Optionally a sweep of alpha x cluster_ratio, with the baselines at matching retentions, and an
accuracy-vs-retention PNG (drawn with OpenCV). Answers are single words, so an answer is the
greedy first token of the prefill (what `generate` would emit first).
"""

from __future__ import annotations

import argparse
import itertools
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


@dataclass
class Method:
    """One way of answering: settings and a method of `prunevid.baselines.METHODS`."""

    name: str
    config: PruneVidConfig
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
    patch(model, method.config, method.method)
    retentions, stage1 = [], []
    correct: dict[str, list[int]] = {f: [] for f in FAMILIES}
    answer_ids = {f: [_single_token(checkpoint, s.answer(f)) for s in samples] for f in FAMILIES}
    for family in FAMILIES:
        for start in range(0, len(samples), batch):
            chunk = features[start : start + batch]
            predicted = _answer(checkpoint, QUESTIONS[family], chunk).tolist()
            correct[family] += [int(p == a) for p, a in zip(predicted, answer_ids[family][start:])]
            traces = last_traces(model)
            retentions += [t.num_after_stage2 / t.num_visual_tokens for t in traces]
            stage1 += [t.num_after_stage1 / t.num_visual_tokens for t in traces]
    unpatch(model)
    return {
        "correct": correct,
        "retention": float(np.mean(retentions)),
        "stage1_retention": float(np.mean(stage1)),
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


# ---- the benchmark ----------------------------------------------------------------------------


def methods_at(preset: PruneVidConfig, retention: float) -> list[Method]:
    """The three baselines at one retention (stage-2 rules at the preset's layer, and uniform pooling)."""
    budget = preset.replace(retention=retention)
    return [Method(name, budget, name) for name in ("fastv", "random", "uniform")]


def paper_defaults(checkpoint: Checkpoint) -> PruneVidConfig:
    """The paper's settings, `selected_layer` scaled by depth (10 of 28 layers), the preset's frame count."""
    layers = checkpoint.model.config.text_config.num_hidden_layers
    return PruneVidConfig(num_frames=checkpoint.preset.num_frames, selected_layer=max(0, layers * 10 // 28))


def compare(
    checkpoint: Checkpoint, samples: list[Sample], features: torch.Tensor, log: Callable
) -> list[dict]:
    """Full model, PruneVid (preset), stage 1 only, stage 2 only, the paper's defaults (raw and
    centred similarity), then the baselines at PruneVid's retention."""
    preset = checkpoint.preset
    records = []
    first = [
        Method("full", preset.replace(stage1=False, stage2=False)),
        Method("prunevid", preset),
        Method("stage1", preset.replace(stage2=False)),
        Method("stage2", preset.replace(stage1=False)),
        Method("prunevid_defaults", paper_defaults(checkpoint)),
        # Beyond the paper: the same settings with similarity on centred tokens (one tau for all towers?).
        Method("prunevid_defaults_centred", paper_defaults(checkpoint).replace(centre=True)),
    ]
    for method in first:
        records.append(summarise(method.name, evaluate(checkpoint, method, samples, features)))
        log(records[-1])
    target = records[1]["retention"]
    for method in methods_at(preset, target):
        records.append(summarise(method.name, evaluate(checkpoint, method, samples, features)))
        log(records[-1])
    return records


def sweep(
    checkpoint: Checkpoint,
    samples: list[Sample],
    features: torch.Tensor,
    alphas: list[float],
    cluster_ratios: list[float],
    log: Callable,
) -> list[dict]:
    """PruneVid over alpha x cluster_ratio, and each baseline at every retention reached."""
    records = []
    for alpha in alphas:
        for ratio in cluster_ratios:
            config = checkpoint.preset.replace(alpha=alpha, cluster_ratio=ratio)
            result = evaluate(checkpoint, Method("prunevid", config), samples, features)
            records.append(summarise("prunevid", result, alpha=alpha, cluster_ratio=ratio))
            log(records[-1])
            for method in methods_at(checkpoint.preset, result["retention"]):
                records.append(summarise(method.name, evaluate(checkpoint, method, samples, features)))
                log(records[-1])
    return records


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


def plot(records: list[dict], path: str | Path, full: float | None = None) -> None:
    """Accuracy vs retention, one colour per method, drawn with OpenCV into a PNG."""
    import cv2

    width, height, margin = 640, 420, 60
    image = np.full((height, width, 3), 255, np.uint8)
    colours = {
        "prunevid": (200, 60, 20),
        "fastv": (30, 140, 30),
        "random": (40, 40, 200),
        "uniform": (160, 0, 160),
    }

    def point(retention: float, accuracy: float) -> tuple[int, int]:
        x = margin + retention * (width - 2 * margin)
        y = height - margin - accuracy * (height - 2 * margin)
        return round(x), round(y)

    cv2.rectangle(image, point(0, 0), point(1, 1), (0, 0, 0), 1)
    for tick in np.linspace(0, 1, 6):
        cv2.putText(image, f"{tick:.1f}", (*point(tick, 0)[0:1], height - margin + 18), 0, 0.4, (0, 0, 0), 1)
        cv2.putText(image, f"{tick:.1f}", (margin - 35, point(0, tick)[1] + 4), 0, 0.4, (0, 0, 0), 1)
    cv2.putText(
        image, "retention (visual tokens kept)", (width // 2 - 110, height - 15), 0, 0.5, (0, 0, 0), 1
    )
    cv2.putText(image, "accuracy", (5, margin - 20), 0, 0.5, (0, 0, 0), 1)
    if full is not None:
        cv2.line(image, point(0, full), point(1, full), (120, 120, 120), 1)
        cv2.putText(image, "full", (*point(0.9, full)[0:1], point(0, full)[1] - 5), 0, 0.4, (90, 90, 90), 1)
    for name, colour in colours.items():
        points = sorted(point(r["retention"], r["accuracy"]) for r in records if r["name"] == name)
        for a, b in itertools.pairwise(points):
            cv2.line(image, a, b, colour, 1, cv2.LINE_AA)
        for p in points:
            cv2.circle(image, p, 4, colour, -1, cv2.LINE_AA)
    for i, (name, colour) in enumerate(colours.items()):
        cv2.circle(image, (width - 150, margin + 15 + 18 * i), 5, colour, -1)
        cv2.putText(image, name, (width - 138, margin + 20 + 18 * i), 0, 0.45, (0, 0, 0), 1)
    cv2.imwrite(str(path), image[..., ::-1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=str(WEIGHTS), help="checkpoint folder (default: the shipped tiny model)"
    )
    parser.add_argument("--seed-start", type=int, default=0, help="first held-out video seed")
    parser.add_argument("--num-videos", type=int, default=200, help="videos (7 questions each)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--sweep", action="store_true", help="also sweep alpha x cluster_ratio")
    parser.add_argument("--sweep-videos", type=int, default=64)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.2, 0.4, 0.7])
    parser.add_argument("--cluster-ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--plot", default=None, help="accuracy-vs-retention PNG (needs --sweep)")


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; print a table; return (and optionally write) the JSON dict."""
    if args.seed_start + args.num_videos > TRAIN_SEED_START:
        raise ValueError(f"evaluation seeds must stay below {TRAIN_SEED_START} (the training range)")
    torch.manual_seed(0)
    checkpoint = load_checkpoint(args.model)
    samples = [make_sample(s, checkpoint.preset.num_frames, checkpoint.frame_size) for s in _seeds(args)]
    features = encode_videos(checkpoint, samples)
    print(_header())
    methods = compare(checkpoint, samples, features, _print_row)
    result = {
        "model": str(args.model),
        "seed_start": args.seed_start,
        "num_videos": args.num_videos,
        "preset": checkpoint.preset.to_dict(),
        "methods": methods,
    }
    if args.sweep:
        few = samples[: args.sweep_videos]
        result["sweep"] = sweep(
            checkpoint, few, features[: len(few)], args.alphas, args.cluster_ratios, _print_row
        )
        if args.plot:
            plot(result["sweep"], args.plot, full=methods[0]["accuracy"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def _seeds(args: argparse.Namespace) -> range:
    return range(args.seed_start, args.seed_start + args.num_videos)


def _header() -> str:
    families = " ".join(f"{f[:6]:>6}" for f in FAMILIES)
    return f"{'method':<26} {'stage1':>6} {'kept':>6} {'acc':>6} {'95% interval':>14}  {families}"


def _print_row(record: dict) -> None:
    low, high = record["interval95"]
    families = " ".join(f"{record['per_family'][f]:>6.3f}" for f in FAMILIES)
    print(
        f"{record['name']:<26} {record['stage1_retention']:>6.3f} {record['retention']:>6.3f} {record['accuracy']:>6.3f} "
        f"[{low:.3f}, {high:.3f}]  {families}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
