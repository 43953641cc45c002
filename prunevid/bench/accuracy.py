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
* uniform     — average pooling of each frame's grid to that retention (`prunevid.baselines`).

`--retentions 0.25,0.2,0.15,0.1` adds every method of `prunevid.baselines.METHODS` at each budget
(`budgets`), with its share of the full model's accuracy, a methods-by-budgets table and, with
`--plot`, their accuracy-vs-retention picture.

Optionally a sweep of alpha x cluster_ratio, with the baselines at matching retentions, and an
accuracy-vs-retention PNG (drawn with OpenCV). Answers are single words, so an answer is the
greedy first token of the prefill (what `generate` would emit first). The scoring itself
(checkpoint, encoding, `evaluate`, intervals) is the library's: `prunevid.accuracy`.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..accuracy import WEIGHTS, Checkpoint, Method, encode_videos, evaluate, load_checkpoint, summarise
from ..baselines import METHODS
from ..config import PruneVidConfig
from ..synthetic import FAMILIES, TRAIN_SEED_START, Sample, make_sample


def methods_at(preset: PruneVidConfig, retention: float) -> list[Method]:
    """The three baselines at one retention (stage-2 rules at the preset's layer, and uniform pooling)."""
    budget = preset.replace(retention=retention)
    return [Method(name, budget, name) for name in ("fastv", "random", "uniform")]


def paper_defaults(checkpoint: Checkpoint) -> PruneVidConfig:
    """The paper's settings, `selected_layer` scaled by depth (10 of 28 layers), the preset's frame count."""
    layers = checkpoint.model.config.text_config.num_hidden_layers
    return PruneVidConfig(num_frames=checkpoint.preset.num_frames, selected_layer=max(0, layers * 10 // 28))


def score(
    checkpoint: Checkpoint,
    methods: list[Method],
    samples: list[Sample],
    features: torch.Tensor,
    log: Callable,
) -> list[dict]:
    """The record of every method (`summarise`), each logged as soon as it is scored."""
    records = []
    for method in methods:
        records.append(summarise(method.name, evaluate(checkpoint, method, samples, features)))
        log(records[-1])
    return records


def compare(
    checkpoint: Checkpoint, samples: list[Sample], features: torch.Tensor, log: Callable
) -> list[dict]:
    """Full model, PruneVid (preset), stage 1 only, stage 2 only, the paper's defaults (raw and
    centred similarity), then the baselines at PruneVid's retention."""
    preset = checkpoint.preset
    first = [
        Method("full", preset.replace(stage1=False, stage2=False)),
        Method("prunevid", preset),
        Method("stage1", preset.replace(stage2=False)),
        Method("stage2", preset.replace(stage1=False)),
        Method("prunevid_defaults", paper_defaults(checkpoint)),
        # Beyond the paper: the same settings with similarity on centred tokens (one tau for all towers?).
        Method("prunevid_defaults_centred", paper_defaults(checkpoint).replace(centre=True)),
    ]
    records = score(checkpoint, first, samples, features, log)
    return records + score(checkpoint, methods_at(preset, records[1]["retention"]), samples, features, log)


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
            records += score(
                checkpoint, methods_at(checkpoint.preset, result["retention"]), samples, features, log
            )
    return records


# RGB colour of each method in the accuracy-vs-retention plot.
COLOURS = {
    "prunevid": (20, 60, 200),
    "stage1": (90, 150, 240),
    "stage2": (0, 170, 200),
    "fastv": (30, 140, 30),
    "random": (200, 40, 40),
    "uniform": (160, 0, 160),
    "evs": (230, 140, 0),
    "dycoke": (120, 80, 40),
}


def budgets(
    checkpoint: Checkpoint,
    samples: list[Sample],
    features: torch.Tensor,
    retentions: list[float],
    full: dict,
    log: Callable,
) -> list[dict]:
    """Every method of `prunevid.baselines.METHODS` at every budget, the preset's other settings
    unchanged; each record has its `retention_target` and its accuracy as a share of `full`'s."""
    records = []
    for retention in retentions:
        config = checkpoint.preset.replace(retention=retention)
        for name in METHODS:
            result = evaluate(checkpoint, Method(name, config, name), samples, features)
            record = summarise(name, result, retention_target=retention)
            record["of_full"] = round(record["accuracy"] / full["accuracy"], 4) if full["accuracy"] else None
            records.append(record)
            log(record)
    return records


def budget_markdown(records: list[dict], full: dict) -> str:
    """Methods down, budgets across: accuracy, its 95% interval and its share of the full model's."""
    targets = sorted({r["retention_target"] for r in records}, reverse=True)
    head = " | ".join(f"{100 * t:g}%" for t in targets)
    lines = [f"| method | {head} |", "|---|" + "---|" * len(targets)]
    low, high = full["interval95"]
    lines.append(
        f"| full model (100%) | {full['accuracy']:.3f} [{low:.3f}, {high:.3f}] |" + " |" * (len(targets) - 1)
    )
    for name in dict.fromkeys(r["name"] for r in records):
        cells = []
        for target in targets:
            r = next(r for r in records if r["name"] == name and r["retention_target"] == target)
            low, high = r["interval95"]
            share = "" if r["of_full"] is None else f" ({100 * r['of_full']:.1f}%)"
            cells.append(f"{r['accuracy']:.3f} [{low:.3f}, {high:.3f}]{share}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: str | Path, full: float | None = None) -> None:
    """Accuracy vs retention, one colour per method, drawn with OpenCV into a PNG; the axes
    span the points (retention from 0, accuracy from the nearest tenth below the lowest)."""
    import cv2

    width, height, margin = 720, 460, 60
    image = np.full((height, width, 3), 255, np.uint8)
    # Drawn in RGB, written as BGR below.
    colours = {name: rgb for name, rgb in COLOURS.items() if any(r["name"] == name for r in records)}
    right = min(1.0, np.ceil(max(r["retention"] for r in records) * 12) / 10)
    bottom = np.floor(min(r["accuracy"] for r in records) * 10) / 10

    def point(retention: float, accuracy: float) -> tuple[int, int]:
        x = margin + retention / right * (width - 2 * margin)
        y = height - margin - (accuracy - bottom) / (1 - bottom) * (height - 2 * margin)
        return round(x), round(y)

    cv2.rectangle(image, point(0, bottom), point(right, 1), (0, 0, 0), 1)
    for tick in np.linspace(0, right, 6):
        cv2.putText(
            image, f"{tick:.2f}", (point(tick, bottom)[0] - 12, height - margin + 18), 0, 0.4, (0, 0, 0), 1
        )
    for tick in np.linspace(bottom, 1, 6):
        cv2.putText(image, f"{tick:.2f}", (margin - 42, point(0, tick)[1] + 4), 0, 0.4, (0, 0, 0), 1)
    cv2.putText(
        image, "retention (visual tokens kept)", (width // 2 - 110, height - 15), 0, 0.5, (0, 0, 0), 1
    )
    cv2.putText(image, "accuracy", (5, margin - 20), 0, 0.5, (0, 0, 0), 1)
    if full is not None:
        cv2.line(image, point(0, full), point(right, full), (120, 120, 120), 1)
        cv2.putText(
            image, "full model", (point(0, full)[0] + 5, point(0, full)[1] - 5), 0, 0.4, (90, 90, 90), 1
        )
    for name, colour in colours.items():
        points = sorted(point(r["retention"], r["accuracy"]) for r in records if r["name"] == name)
        for a, b in itertools.pairwise(points):
            cv2.line(image, a, b, colour, 1, cv2.LINE_AA)
        for p in points:
            cv2.circle(image, p, 4, colour, -1, cv2.LINE_AA)
    for i, (name, colour) in enumerate(colours.items()):
        row = height - margin - 18 * (len(colours) - i)  # the legend sits in the lower right corner
        cv2.circle(image, (width - margin - 95, row), 5, colour, -1)
        cv2.putText(image, name, (width - margin - 83, row + 5), 0, 0.45, (0, 0, 0), 1)
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
    parser.add_argument(
        "--retentions",
        default=None,
        help="also score every method at these budgets (final retention), e.g. 0.25,0.2,0.15,0.1",
    )
    parser.add_argument(
        "--plot",
        default=None,
        help="accuracy-vs-retention PNG of the budgets (--retentions), else of --sweep",
    )


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
    if args.retentions:
        retentions = [float(v) for v in args.retentions.split(",") if v.strip()]
        result["budgets"] = budgets(checkpoint, samples, features, retentions, methods[0], _print_row)
        print("\n" + budget_markdown(result["budgets"], methods[0]))
    if args.plot and ("budgets" in result or "sweep" in result):
        plot(result.get("budgets") or result["sweep"], args.plot, full=methods[0]["accuracy"])
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
