"""What `prunevid bench speed` reports: rows, summaries, tables, targets, machine, CSV and plot.

`summarize` turns each method's `Sample`s into a `Row` (medians over repeats, min-max spread,
speedups against the stock row, analytic FLOPs from `prunevid.flops`); `row_json` is its JSON
record and `markdown_table` the table. `check_targets` evaluates the performance targets on the
rows (reported, never asserted), `machine_info` says what the numbers were measured on, and
`report_markdown` / `write_outputs` print and write the whole result (JSON, markdown, the sweep's
CSV and speedup-vs-retention plot).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from ..flops import DecoderShape, prefill_flops
from .measure import Method, Prompt, Sample, VisionCost, load_average

MIB = 2**20


@dataclass
class Row:
    """One method's results: medians over repeats (spread: min and max)."""

    name: str
    visual_tokens: int
    stage1_tokens: int
    total_visual: int
    seq_before: int
    seq_after: int
    llm_prefill_s: float
    prefill_min: float
    prefill_max: float
    prefill_cpu_s: float
    stage1_s: float
    stage2_s: float
    decoder_s: float | None
    ttft_s: float
    decode_ms_per_token: float | None
    decode_median_ms: float | None
    kv_bytes: int
    kv_tokens: int
    peak_rss: int
    rss_delta: int
    flops: float
    preprocess_s: float | None = None  # the clip's, the same for every method (None: not measured)
    vision_s: float | None = None
    speedup: float = 1.0
    flops_speedup: float = 1.0
    ttft_speedup: float = 1.0
    cpu_speedup: float = 1.0
    kv_ratio: float = 1.0
    layer_retention: float = 1.0
    samples: list[float] = field(default_factory=list)
    decode_steps: list[list[float]] = field(default_factory=list)  # per repeat, ms between tokens

    @property
    def retention(self) -> float:
        return self.visual_tokens / self.total_visual

    @property
    def efficiency(self) -> float:
        """Measured speedup / FLOPs-predicted speedup (1 = the physical limit)."""
        return self.speedup / self.flops_speedup


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def method_flops(
    shape: DecoderShape, method: Method, prompt: Prompt, stage1: int, kept: int
) -> tuple[float, int, int]:
    """Analytic prefill FLOPs (text tokens included) and the sequence length before/after stage 2."""
    before = prompt.length - prompt.visual_tokens + stage1
    after = before - stage1 + kept
    if method.config is None or not method.config.stage2:
        return prefill_flops(shape, before), before, before
    return prefill_flops(shape, before, after, method.config.selected_layer), before, after


def summarize(
    methods: Sequence[Method],
    samples: dict[str, list[Sample]],
    prompt: Prompt,
    shape: DecoderShape,
    vision: VisionCost | None,
    reference: str = "stock",
) -> list[Row]:
    rows = [_row(m, samples[m.name], prompt, shape, vision) for m in methods]
    base = next(r for r in rows if r.name == reference)
    for row in rows:
        row.speedup = base.llm_prefill_s / row.llm_prefill_s
        row.flops_speedup = base.flops / row.flops
        row.ttft_speedup = base.ttft_s / row.ttft_s
        row.cpu_speedup = base.prefill_cpu_s / row.prefill_cpu_s if row.prefill_cpu_s > 0 else float("nan")
        row.kv_ratio = row.kv_bytes / base.kv_bytes if base.kv_bytes else float("nan")
    return rows


def _row(
    method: Method, runs: list[Sample], prompt: Prompt, shape: DecoderShape, vision: VisionCost | None
) -> Row:
    first = runs[0]
    stage1, kept = first.stage1_tokens or prompt.visual_tokens, first.visual_tokens or prompt.visual_tokens
    flops, before, after = method_flops(shape, method, prompt, stage1, kept)
    prefill = [s.prefill_s for s in runs]
    median = statistics.median(prefill)
    fixed = 0.0 if vision is None else vision.preprocess_s + vision.vision_s
    return Row(
        name=method.name,
        visual_tokens=kept,
        stage1_tokens=stage1,
        total_visual=prompt.visual_tokens,
        seq_before=before,
        seq_after=after,
        llm_prefill_s=median,
        prefill_min=min(prefill),
        prefill_max=max(prefill),
        prefill_cpu_s=statistics.median(s.prefill_cpu_s for s in runs),
        stage1_s=statistics.median(s.stage1_s for s in runs),
        stage2_s=statistics.median(s.stage2_s for s in runs),
        decoder_s=_median([s.decoder_s for s in runs]),
        ttft_s=fixed + median,
        decode_ms_per_token=_median([s.decode_ms for s in runs]),
        decode_median_ms=_median([s.decode_median_ms for s in runs]),
        kv_bytes=first.kv_bytes,
        kv_tokens=first.kv_tokens,
        peak_rss=max(s.peak_rss for s in runs),
        rss_delta=max(s.peak_rss - s.rss_before for s in runs),
        flops=flops,
        preprocess_s=None if vision is None else vision.preprocess_s,
        vision_s=None if vision is None else vision.vision_s,
        layer_retention=first.layer_retention,
        samples=prefill,
        decode_steps=[s.decode_steps_ms for s in runs],
    )


def markdown_table(rows: Sequence[Row], vision: VisionCost | None) -> str:
    """The results as a GitHub markdown table: the time to the first token from pixels split into
    frame preprocessing, vision tower and LM prefill (stage 1 is part of the prefill; its own
    column is fenced on a GPU)."""
    head = (
        "| method | visual tokens kept | preprocess s | vision s | stage 1 s | LM prefill s, median [min-max] | speedup "
        "(FLOPs-predicted, efficiency) | prefill CPU s (speedup) | TTFT from pixels s | decode ms/token (median step) "
        "| KV cache MiB (% stock) | peak RSS MiB (+ during call) | prefill TFLOPs |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        decode = "-" if r.decode_ms_per_token is None else f"{r.decode_ms_per_token:.1f}"
        if r.decode_median_ms is not None:
            decode += f" ({r.decode_median_ms:.1f})"
        ttft = "-" if vision is None else f"{r.ttft_s:.2f} ({r.ttft_speedup:.2f}x)"
        lines.append(
            f"| {r.name} | {r.visual_tokens} ({100 * r.retention:.1f}%) | {_seconds(r.preprocess_s)} "
            f"| {_seconds(r.vision_s)} | {r.stage1_s:.3f} "
            f"| {r.llm_prefill_s:.3f} [{r.prefill_min:.3f}-{r.prefill_max:.3f}] "
            f"| {r.speedup:.2f}x ({r.flops_speedup:.2f}x, {100 * r.efficiency:.0f}%) "
            f"| {r.prefill_cpu_s:.2f} ({r.cpu_speedup:.2f}x) | {ttft} | {decode} "
            f"| {r.kv_bytes / MIB:.1f} ({100 * r.kv_ratio:.1f}%) | {r.peak_rss / MIB:.0f} (+{r.rss_delta / MIB:.0f}) "
            f"| {r.flops / 1e12:.3f} |"
        )
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@dataclass
class Target:
    name: str
    met: bool
    detail: str

    def line(self) -> str:
        return f"- [{'x' if self.met else ' '}] {self.name}: {self.detail}"


def check_targets(rows: Sequence[Row], sweep_rows: Sequence[Row] = ()) -> list[Target]:
    """The issue's targets, evaluated on these results (benchmark only: never asserted)."""
    by = {r.name: r for r in rows}
    stock, ours, fastv = by["stock"], by["prunevid"], by["fastv"]
    targets = [
        Target("LM prefill >= 3x faster than stock", ours.speedup >= 3, f"{ours.speedup:.2f}x"),
        Target(
            "stage 1 < 5% of stock prefill",
            ours.stage1_s < 0.05 * stock.llm_prefill_s,
            f"{ours.stage1_s:.3f} s = {100 * ours.stage1_s / stock.llm_prefill_s:.2f}% of {stock.llm_prefill_s:.2f} s",
        ),
        Target("KV cache <= 25% of stock", ours.kv_ratio <= 0.25, f"{100 * ours.kv_ratio:.1f}%"),
        Target(
            "PruneVid at least as fast as FastV at equal retention",
            ours.llm_prefill_s <= fastv.llm_prefill_s,
            f"{ours.llm_prefill_s:.3f} s vs {fastv.llm_prefill_s:.3f} s ({ours.visual_tokens} vs {fastv.visual_tokens} tokens)",
        ),
        Target(
            "PruneVid within 15% of its FLOPs-predicted speedup",
            ours.efficiency >= 0.85,
            f"{ours.speedup:.2f}x of {ours.flops_speedup:.2f}x ({100 * ours.efficiency:.0f}%)",
        ),
    ]
    if sweep_rows:
        points = [r for r in sweep_rows if r.name != "stock"]
        worst = min(points, key=lambda r: r.efficiency)
        targets.append(
            Target(
                "every sweep point within 15% of its FLOPs-predicted speedup",
                worst.efficiency >= 0.85,
                f"worst {worst.name}: {worst.speedup:.2f}x of {worst.flops_speedup:.2f}x ({100 * worst.efficiency:.0f}%); "
                f"{sum(r.efficiency >= 0.85 for r in points)}/{len(points)} points within",
            )
        )
    return targets


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import transformers

    return {
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf")
        else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    """The CPU features that decide fp32/bf16 matmul speed (AVX-512, AVX-512 BF16, AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return [flag for flag in wanted if flag in flags]


def row_json(row: Row) -> dict[str, Any]:
    return {
        "name": row.name,
        "visual_tokens": row.visual_tokens,
        "stage1_tokens": row.stage1_tokens,
        "total_visual_tokens": row.total_visual,
        "retention": row.retention,
        "retention_layer_averaged": row.layer_retention,
        "sequence_tokens": [row.seq_before, row.seq_after],
        "llm_prefill_s": row.llm_prefill_s,
        "llm_prefill_min_s": row.prefill_min,
        "llm_prefill_max_s": row.prefill_max,
        "llm_prefill_samples_s": row.samples,
        "llm_prefill_cpu_s": row.prefill_cpu_s,
        "cpu_speedup": row.cpu_speedup,
        "stage1_s": row.stage1_s,
        "stage2_select_s": row.stage2_s,
        "decoder_s": row.decoder_s,
        "preprocess_s": row.preprocess_s,
        "vision_s": row.vision_s,
        "ttft_s": row.ttft_s,
        "decode_ms_per_token": row.decode_ms_per_token,
        "decode_median_step_ms": row.decode_median_ms,
        "decode_steps_ms": row.decode_steps,
        "kv_bytes": row.kv_bytes,
        "kv_tokens": row.kv_tokens,
        "kv_ratio": row.kv_ratio,
        "peak_rss_bytes": row.peak_rss,
        "rss_increase_bytes": row.rss_delta,
        "flops": row.flops,
        "speedup": row.speedup,
        "flops_speedup": row.flops_speedup,
        "efficiency": row.efficiency,
        "ttft_speedup": row.ttft_speedup,
    }


def sweep_record(row: Row, method: Method) -> dict[str, Any]:
    config = method.config
    return {
        "cluster_ratio": None if config is None else config.cluster_ratio,
        "alpha": None if config is None else config.alpha,
        **{k: v for k, v in row_json(row).items() if k not in ("llm_prefill_samples_s", "name")},
        "name": row.name,
    }


def budget_record(row: Row, method: Method) -> dict[str, Any]:
    """One method at one budget: `name` is the method, `retention_target` the budget (None: stock)."""
    record = {k: v for k, v in row_json(row).items() if k != "llm_prefill_samples_s"}
    config = method.config
    return {**record, "name": method.method if config else "stock", "label": row.name,
            "retention_target": None if config is None else config.retention}  # fmt: skip


def budget_table(records: Sequence[dict[str, Any]]) -> str:
    """Every method at every budget: tokens kept (after the selected layer, and averaged over the
    layers), LM prefill speedup against stock (FLOPs-predicted) and KV cache after prefill."""
    lines = [
        "| budget | method | visual tokens kept | layer-averaged | LM prefill speedup (FLOPs-predicted) | KV cache |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in records:
        if r["retention_target"] is None:
            continue
        lines.append(
            f"| {100 * r['retention_target']:g}% | {r['name']} | {r['visual_tokens']} ({100 * r['retention']:.1f}%) "
            f"| {100 * r['retention_layer_averaged']:.1f}% | {r['speedup']:.2f}x ({r['flops_speedup']:.2f}x) "
            f"| {100 * r['kv_ratio']:.1f}% |"
        )
    return "\n".join(lines)


PROFILE_COLUMNS = [
    ("wall_ms", "wall ms"),
    ("busy_ms", "busy ms"),
    ("host_ms", "host overhead ms"),
    ("ops", "aten ops"),
    ("reads", "host reads"),
    ("uploads", "host uploads"),
]
GPU_COLUMNS = [("kernels", "kernels"), ("syncs", "syncs"), ("copies", "device-host copies")]


def profile_table(records: Sequence[dict[str, Any]]) -> str:
    """`--profile`'s table (records: `MethodProfile.record()`): per method its prefill and one
    decode step; busy is GPU-kernel time on a GPU, the ops' own CPU time on the CPU; the GPU's
    kernels, syncs and copies where it ran on one."""
    gpu = any(r["prefill"]["kernels"] is not None for r in records)
    columns = PROFILE_COLUMNS + (GPU_COLUMNS if gpu else [])
    lines = [
        "| method | call | " + " | ".join(label for _, label in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for r in records:
        for call in ("prefill", "decode_step"):
            cells = [_amount(r[call][key], key.endswith("_ms")) for key, _ in columns]
            lines.append(f"| {r['name']} | {call.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _amount(value: float | None, ms: bool) -> str:
    if value is None:
        return "-"
    if ms:
        return f"{value:.2f}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def write_csv(records: Sequence[dict[str, Any]], path: str) -> None:
    columns = [k for k, v in records[0].items() if not isinstance(v, list | dict)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def plot_sweep(records: Sequence[dict[str, Any]], path: str, title: str) -> None:
    """Measured and FLOPs-predicted speedup vs final retention, with the ideal 1/retention line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in records if r["name"] != "stock"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    grid = np.geomspace(min(r["retention"] for r in points) * 0.8, 1.0, 100)
    ax.plot(grid, 1 / grid, "k--", lw=1, label="ideal 1/retention (every layer at the kept length)")
    for i, ratio in enumerate(sorted({r["cluster_ratio"] for r in points})):
        mine = sorted((r for r in points if r["cluster_ratio"] == ratio), key=lambda r: r["retention"])
        x = [r["retention"] for r in mine]
        colour = f"C{i}"
        low = [r["speedup"] - r["speedup"] * r["llm_prefill_s"] / r["llm_prefill_max_s"] for r in mine]
        high = [r["speedup"] * r["llm_prefill_s"] / r["llm_prefill_min_s"] - r["speedup"] for r in mine]
        ax.errorbar(x, [r["speedup"] for r in mine], yerr=[low, high], fmt="o-", color=colour,
                    label=f"measured, cluster_ratio={ratio:g}")  # fmt: skip
        ax.plot(x, [r["flops_speedup"] for r in mine], "s:", color=colour, mfc="none",
                label=f"FLOPs-predicted, cluster_ratio={ratio:g}")  # fmt: skip
        for r in mine:
            ax.annotate(f"a={r['alpha']:g}", (r["retention"], r["speedup"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="visual tokens kept (fraction of T x N)",
           ylabel="LM prefill speedup vs stock", title=title)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report_markdown(result: dict[str, Any]) -> str:
    """Settings, the table and the targets, as markdown."""
    m = result["machine"]
    vision = result["vision"]
    lines = [
        f"`{result['command']}`",
        "",
        f"**{result['arch']['name']}**, {result['dtype']}: {result['arch']['note']}.",
        f"Clip `{result['video']}`, {result['frames']} frames; {result['repeats']} repeats "
        f"(medians, [min-max]); decode over {result['new_tokens']} new tokens.",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads, "
        f"flags {' '.join(m['cpu_flags']) or '-'}; torch {m['torch']}, transformers {m['transformers']}; "
        f"{m['date']}; load average {_load(m)}.",
        *_device_line(result.get("device")),
        f"{result['calibration']['text']}; PruneVid settings {_settings(result['config'])}.",
        f"{vision['text']}: {100 * vision['share_of_stock_ttft']:.0f}% of the stock TTFT.",
        "",
        result["table"],
        "",
        "Targets:",
        *[Target(**t).line() for t in result["targets"]],
    ]
    if "profile" in result:
        lines += ["", "Profile (`--profile`; prefill = one new token, decode step = the difference of "
                  "two calls over their extra steps):", "", profile_table(result["profile"])]  # fmt: skip
    if "budgets" in result:
        lines += ["", "Every method at the same budgets (one new token: prefill only):", "",
                  budget_table(result["budgets"])]  # fmt: skip
    return "\n".join(lines)


def _device_line(device: dict[str, Any] | None) -> list[str]:
    """A line naming the GPU the model ran on (none for the CPU: the machine line says it all)."""
    if not device or device["type"] == "cpu":
        return []
    return [
        f"Model on {device['name']} (CUDA {device['cuda']}, {device['attention']} attention), peak GPU memory "
        f"{device['peak_memory_gib']:.1f} GiB; the RSS columns count host memory only."
    ]


def _load(machine: dict[str, Any]) -> str:
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    if not start:
        return "n/a"
    return f"{start[0]:.1f} at start, {end[0]:.1f} at end (1-min)" if end else f"{start[0]:.1f}"


def _settings(config: dict[str, Any]) -> str:
    keys = ("tau", "cluster_ratio", "temporal_segment_ratio", "alpha", "selected_layer", "k")
    return ", ".join(
        f"{k}={config[k]:.4g}" if isinstance(config[k], float) else f"{k}={config[k]}" for k in keys
    )


def write_outputs(result: dict[str, Any], args: argparse.Namespace) -> None:
    """The JSON and markdown reports, and the sweep's CSV and plot, where `args` asks for them."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report_markdown(result) + "\n")
    if "sweep" in result:
        write_csv(result["sweep"], args.sweep_csv)
        title = f"PruneVid prefill speedup, {result['arch']['name']} {result['dtype']}, {result['machine']['date'][:10]}"
        try:
            plot_sweep(result["sweep"], args.sweep_png, title)
        except ImportError:
            print("matplotlib is not installed: sweep plot skipped (pip install matplotlib)", file=sys.stderr)
