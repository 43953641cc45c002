"""Time to first token and throughput in vLLM: stock Qwen2.5-VL or Qwen3-VL, vLLM's EVS and
PruneVid stage 1 (the plugin) at the same budgets. By default on Qwen2.5-VL-3B layer sizes
(`--family qwen3-vl`: Qwen3-VL-4B's) with dummy weights (speed does not depend on weight values;
which tokens merge does, but not how many); `--model` takes a local folder with real weights
instead (its family from its config).

Run in an environment with vLLM and prunevid (`.ci/vllm` builds one on the CPU build; on a GPU:
`pip install "prunevid[vllm]"`, nothing else):

    python scripts/vllm_bench.py --enforce-eager --json docs/vllm_bench_cpu.json      # this machine
    python scripts/vllm_bench.py --layers 36 --vision-depth 32 --dtype bfloat16 --frames 32 \
        --size 448 --repeats 5 --json vllm_bench_gpu.json                           # 3B sizes, GPU
    python scripts/vllm_bench.py --model /models/Qwen2.5-VL-7B-Instruct --dtype bfloat16 \
        --online --rate 2 --num-requests 64 --json vllm_online.json                 # serving load
    python scripts/vllm_bench.py --family qwen3-vl --size 384 --methods prunevid --enforce-eager \
        --json docs/vllm_bench_qwen3_cpu.json            # Qwen3-VL-4B sizes, this machine (docs/vllm.md)

Offline (default): each method gets its own engine (one at a time, in this process, prefix
caching and the processor cache off so every request encodes its video again). TTFT: the wall
time of one request with one new token, from the raw frames (preprocessing, vision tower, stage 1
or EVS, prefill), the fastest of `--repeats` (other work only adds time), split into the model's
`embed_multimodal` (vision tower, then stage 1 or EVS) and its language-model prefill (the rest
is preprocessing and scheduling); the clocks wait for the device, and nothing is copied to the
host inside a timed region. Throughput: `--batch` such requests at once with `--new-tokens`
each. The pruning step alone is then timed on the device, on the vision tower's output for the
same video, kept where the model computed it.

Online (`--online`): vLLM's async engine (its engine core in its own process, as `vllm serve`)
gets `--num-requests` requests at Poisson arrivals of `--rate` per second; per method: TTFT p50
and p95, completed requests per second and output tokens per second.

`--methods` picks the pruning methods beside stock (default EVS and PruneVid; vLLM 0.32's own
EVS for Qwen3-VL failed in its CPU build here, so its CPU run has PruneVid only).
CUDA graphs and torch.compile stay vLLM's defaults unless `--enforce-eager`. EVS keeps at least
a whole frame's tokens, so budgets below 1 / time steps have no equal-count EVS run; choose
retentions at or above it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

import numpy as np
import torch
from transformers import AutoConfig, Qwen2_5_VLConfig, Qwen3VLConfig
from vllm import LLM, SamplingParams
from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

from prunevid.bench.archs import ARCHS, QWEN25_VIT
from prunevid.integrations import vllm as plugin
from prunevid.models.timing import clock
from prunevid.synthetic import make_sample
from prunevid.testing import save_tiny_qwen3_vl, save_tiny_qwen_vl, tiny_tokenizer

PROMPT = (
    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what is happening in the video ?"
    "<|im_end|>\n<|im_start|>assistant\n"
)
# Qwen2.5-VL-3B-Instruct's layer sizes (the speed benchmark's), its full vocabulary; the depths
# are chosen per run.
SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
TEXT_3B = {**{key: ARCHS["qwen2.5-vl-3b"].text[key] for key in SIZES}, "vocab_size": 151936}
VISION_3B = {key: value for key, value in QWEN25_VIT.items() if key not in ("depth", "fullatt_block_indexes")}
# Qwen3-VL-4B-Instruct's sizes (its published config.json), its full vocabulary; depths per run.
TEXT_QWEN3_4B = dict(
    hidden_size=2560,
    intermediate_size=9728,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
)
VISION_QWEN3_4B = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_heads=16,
    out_hidden_size=2560,
    num_position_embeddings=2304,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    hidden_act="gelu_pytorch_tanh",
)
QWEN3_DEEPSTACK = (5, 11, 17)  # of 24 blocks
FAMILIES = {"qwen2.5-vl": plugin.ARCHITECTURE, "qwen3-vl": plugin.QWEN3_ARCHITECTURE}


def write_checkpoint(folder: str, family: str, layers: int, vision_depth: int, size: int, frames: int) -> str:
    """Config, tokenizer and processor files of a Qwen2.5-VL-3B- or Qwen3-VL-4B-sized model (no
    weights) that keeps `frames` frames of `size` px whole."""
    if family == "qwen3-vl":
        # Its processor bounds the pixels of the whole clip; its three deepstack levels stay
        # three, at the same relative depths.
        save_tiny_qwen3_vl(folder, min_pixels=size * size, max_pixels=frames * size * size)
        deepstack = sorted({min(vision_depth - 1, round(i * vision_depth / 24)) for i in QWEN3_DEEPSTACK})
        make_config, architecture = Qwen3VLConfig, "Qwen3VLForConditionalGeneration"
        rope = {
            "rope_type": "default",
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
            "rope_theta": 5e6,
        }
        text = dict(TEXT_QWEN3_4B, rope_parameters=rope)
        vision = dict(VISION_QWEN3_4B, depth=vision_depth, deepstack_visual_indexes=deepstack)
    else:
        save_tiny_qwen_vl(folder, min_pixels=size * size, max_pixels=size * size)
        full_attention = [i for i in (7, 15, 23, 31) if i < vision_depth] or [vision_depth - 1]
        make_config, architecture = Qwen2_5_VLConfig, "Qwen2_5_VLForConditionalGeneration"
        rope = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}
        text = dict(TEXT_3B, rope_parameters=rope)
        vision = dict(VISION_3B, depth=vision_depth, fullatt_block_indexes=full_attention)
    Path(folder, "model.safetensors").unlink()
    ids = tiny_tokenizer().convert_tokens_to_ids
    config = make_config(
        text_config=dict(
            text, num_hidden_layers=layers, max_position_embeddings=32768, tie_word_embeddings=True
        ),
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    config.architectures = [architecture]
    config.save_pretrained(folder)
    return folder


def family_of(folder: str) -> str:
    """The checkpoint's family, from its config (`FAMILIES`' keys)."""
    model_type = AutoConfig.from_pretrained(folder).model_type
    if model_type not in ("qwen2_5_vl", "qwen3_vl"):
        raise SystemExit(f"{folder} is a {model_type} checkpoint: this benchmark runs Qwen2.5-VL or Qwen3-VL")
    return "qwen3-vl" if model_type == "qwen3_vl" else "qwen2.5-vl"


def methods(
    retentions: list[float], architecture: str, names: tuple[str, ...] = ("evs", "prunevid")
) -> list[tuple[str, float | None, dict]]:
    """(name, retention, engine options) of every run of the pruning methods `names`; stock first
    and last, to see drift."""
    options = {
        "evs": lambda r: {"video_pruning_rate": round(1 - r, 6)},
        "prunevid": lambda r: {
            "hf_overrides": {"architectures": [architecture], "prunevid": {"retention": r}}
        },
    }
    runs = [(name, r, options[name](r)) for r in retentions for name in names]
    return [("stock", None, {}), *runs, ("stock", None, {})]


def _install_timers(model: torch.nn.Module) -> None:
    """Time the model's two parts of a prefill: `embed_multimodal` (vision tower, then stage 1 or
    EVS) and the language model's forward calls (with their lengths). Each clock waits for the
    device; nothing is copied to the host."""
    times = model.bench_times = {"encode": [], "forward": [], "started": []}
    device = next(model.parameters()).device
    embed = model.embed_multimodal

    def timed_embed(**kwargs):
        tic = clock(device)
        out = embed(**kwargs)
        times["encode"].append(clock(device) - tic)
        return out

    model.embed_multimodal = timed_embed
    model.register_forward_pre_hook(
        lambda m, args, kw: times["started"].append(clock(device)), with_kwargs=True
    )
    model.register_forward_hook(
        lambda m, args, kw, out: times["forward"].append(
            (kw["positions"].shape[-1], clock(device) - times["started"].pop())
        ),
        with_kwargs=True,
    )


def _keep_vision_output(model: torch.nn.Module) -> None:
    """Keep the next request's video grid and vision-tower output, where it was computed (for
    `pruning_cost`; set only for an untimed request)."""
    embed = model.embed_multimodal

    def keep_grid(**kwargs):
        model.bench_grid = tuple(kwargs["video_grid_thw"][0].tolist())  # a host tensor in vLLM
        model.bench_visual_dim = model.config.vision_config.out_hidden_size  # Qwen3-VL: deepstack follows
        model.embed_multimodal = embed
        return embed(**kwargs)

    def keep(module, args, out):
        model.bench_vision = out.detach()
        handle.remove()

    model.embed_multimodal = keep_grid
    handle = model.visual.register_forward_hook(keep)


def _vision_output(model: torch.nn.Module) -> tuple[torch.Tensor, tuple[int, int, int], int]:
    return model.bench_vision, model.bench_grid, model.bench_visual_dim


def _take_times(model: torch.nn.Module) -> dict:
    """The timings since the last call (and forget them)."""
    taken = {"encode": list(model.bench_times["encode"]), "forward": list(model.bench_times["forward"])}
    model.bench_times["encode"].clear()
    model.bench_times["forward"].clear()
    return taken


def measure(llm: LLM, request: dict, repeats: int, batch: int, new_tokens: int) -> dict:
    first = SamplingParams(max_tokens=1, temperature=0)
    llm.apply_model(_install_timers)
    llm.generate(request, first, use_tqdm=False)  # warm-up
    ttft, encode, prefill, prompt_tokens = [], [], [], 0
    for _ in range(repeats):
        llm.apply_model(_take_times)
        tic = time.perf_counter()
        out = llm.generate(request, first, use_tqdm=False)[0]
        ttft.append(time.perf_counter() - tic)
        prompt_tokens = len(out.prompt_token_ids)
        times = llm.apply_model(_take_times)[0]
        encode.append(sum(times["encode"]))
        prefill.append(sum(seconds for length, seconds in times["forward"] if length > 1))
    many = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    batches = []
    for _ in range(2):
        tic = time.perf_counter()
        outs = llm.generate([request] * batch, many, use_tqdm=False)
        batches.append(time.perf_counter() - tic)
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    # Other work on a shared machine only adds time: the fastest repeat is the best estimate.
    return {
        "prompt_tokens": prompt_tokens,
        "ttft_s": min(ttft),
        "ttft_all_s": ttft,
        "encode_s": min(encode),
        "lm_prefill_s": min(prefill),
        "batch_s": min(batches),
        "requests_per_s": batch / min(batches),
        "output_tokens_per_s": generated / min(batches),
    }


def pruning_cost(
    features: torch.Tensor, grid: tuple[int, int, int], retentions: list[float], family: str, visual_dim: int
) -> list[dict]:
    """Seconds of the pruning step alone on one video's vision-tower output (T * N, C), on the
    device that computed it, fastest of 10, at each retention. Qwen2.5-VL: PruneVid stage 1 with
    its position channels (`merged_video`) and vLLM's EVS as its Qwen2.5-VL runs it (retention
    mask on the device, positions built on the host and uploaded). Qwen3-VL (features: the main
    `visual_dim` channels, then the deepstack levels): stage 1 per time step with the deepstack
    means and channels (`merged_qwen3_video`) and EVS's retention mask, gather and per-step counts
    (its Qwen3-VL then also embeds the timestamps, not timed)."""
    from vllm.multimodal.video_prune.evs import compute_mrope_for_media, compute_retention_mask

    device = features.device

    def fastest(run) -> float:
        run()  # warm-up (kernels, allocator)
        seconds = []
        for _ in range(10):
            tic = clock(device)
            run()
            seconds.append(clock(device) - tic)
        return min(seconds)

    rows = []
    for r in retentions:
        if family == "qwen3-vl":
            config = plugin.qwen3_settings({"retention": r})

            def prunevid(config=config):
                return plugin.merged_qwen3_video(features, grid, 2, visual_dim, config)

            def evs(r=r):
                mask = compute_retention_mask(features, grid, spatial_merge_size=2, q=1 - r)
                return features[mask], mask.view(grid[0], -1).sum(1).tolist()

        else:
            config = plugin.settings({"retention": r})

            def prunevid(config=config):
                return plugin.merged_video(features, grid, 2, 2.0, config)

            def evs(r=r):
                mask = compute_retention_mask(features, grid, spatial_merge_size=2, q=1 - r)
                positions = compute_mrope_for_media(torch.tensor(grid), 2, 2.0, 1.0).to(device)
                return torch.cat([features[mask], positions[mask].to(features.dtype)], 1)

        rows.append({"retention": r, "prunevid_s": fastest(prunevid), "evs_s": fastest(evs)})
    return rows


def engine_options(args: argparse.Namespace, folder: str) -> dict:
    """What every method's engine shares."""
    options = dict(
        model=folder,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.batch,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
        limit_mm_per_prompt={"video": 1, "image": 0},
        seed=0,
    )
    if args.model is None:
        options["load_format"] = "dummy"
    if args.gpu_memory_utilization is not None:
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    return options


async def _serve(options: dict, request: dict, rate: float, count: int, new_tokens: int) -> dict:
    """`count` requests at Poisson arrivals of `rate` per second to vLLM's async engine."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**options))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

    async def one(name: str, delay: float) -> tuple[float, int]:
        await asyncio.sleep(delay)
        sent, first, tokens = time.perf_counter(), None, 0
        async for out in engine.generate(request, params, request_id=name):
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter() - sent
            tokens = len(out.outputs[0].token_ids)
        return first, tokens

    try:
        await one("warm-up", 0.0)
        arrivals = np.cumsum(np.random.default_rng(0).exponential(1 / rate, count))
        tic = time.perf_counter()
        done = await asyncio.gather(*(one(f"r{i}", float(t)) for i, t in enumerate(arrivals)))
        elapsed = time.perf_counter() - tic
    finally:
        engine.shutdown()
    ttft = [first for first, _ in done]
    return {
        "rate": rate,
        "requests": count,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p95_s": float(np.percentile(ttft, 95)),
        "requests_per_s": count / elapsed,
        "output_tokens_per_s": sum(tokens for _, tokens in done) / elapsed,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="a local Qwen2.5-VL or Qwen3-VL folder with weights (default: dummy weights)"
    )
    parser.add_argument(
        "--family", choices=sorted(FAMILIES), default="qwen2.5-vl", help="without --model: 3B or 4B sizes"
    )
    parser.add_argument("--layers", type=int, default=8, help="decoder layers, without --model (3B: 36)")
    parser.add_argument("--vision-depth", type=int, default=8, help="vision blocks, without --model (3B: 32)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument(
        "--size", type=int, default=336, help="frame side in pixels (a multiple of 28; Qwen3-VL: of 32)"
    )
    parser.add_argument("--retentions", default="0.25,0.125")
    parser.add_argument("--methods", default="evs,prunevid", help="pruning methods to run beside stock")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="offline batch; the engines' max_num_seqs")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, help="vLLM's share of GPU memory")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile")
    parser.add_argument("--online", action="store_true", help="serving load instead of one request at a time")
    parser.add_argument("--rate", type=float, default=1.0, help="--online: requests per second (Poisson)")
    parser.add_argument("--num-requests", type=int, default=32, help="--online: requests per method")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        plugin.enable_evs_on_cpu()  # vLLM 0.32's CPU runner cannot run its own EVS otherwise
    frames = make_sample(0, num_frames=args.frames, size=args.size).frames
    metadata = {
        "fps": 2.0,
        "duration": args.frames / 2.0,
        "total_num_frames": args.frames,
        "frames_indices": list(range(args.frames)),
        "video_backend": "opencv",
        "do_sample_frames": False,
    }
    request = {"prompt": PROMPT, "multi_modal_data": {"video": (frames, metadata)}}
    folder = args.model or write_checkpoint(
        tempfile.mkdtemp(prefix="vllm-bench-"),
        args.family,
        args.layers,
        args.vision_depth,
        args.size,
        args.frames,
    )
    family = family_of(folder)
    retentions = [float(r) for r in args.retentions.split(",")]
    results, features, grid, visual_dim = [], None, None, None
    names = tuple(args.methods.split(","))
    if not set(names) <= {"evs", "prunevid"}:
        raise SystemExit(f"--methods takes evs and prunevid, got {args.methods}")
    for name, retention, method in methods(retentions, FAMILIES[family], names):
        options = {**engine_options(args, folder), **method}
        row = {"method": name, "retention": retention}
        if args.online:
            row.update(asyncio.run(_serve(options, request, args.rate, args.num_requests, args.new_tokens)))
        else:
            tic = time.perf_counter()
            llm = LLM(**options)
            row["startup_s"] = time.perf_counter() - tic
            row.update(measure(llm, request, args.repeats, args.batch, args.new_tokens))
            if name == "stock" and features is None:  # one more request, untimed, keeps its vision output
                llm.apply_model(_keep_vision_output)
                llm.generate(request, SamplingParams(max_tokens=1), use_tqdm=False)
                features, grid, visual_dim = llm.apply_model(_vision_output)[0]
            llm.llm_engine.engine_core.shutdown()
            del llm
        results.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()
        cleanup_dist_env_and_memory()
    stock = [row for row in results if row["method"] == "stock"]  # ratios against their mean
    ratios = (
        [("ttft_p50_speedup", "ttft_p50_s", True), ("throughput_ratio", "output_tokens_per_s", False)]
        if args.online
        else [
            ("ttft_speedup", "ttft_s", True),
            ("lm_prefill_speedup", "lm_prefill_s", True),
            ("throughput_ratio", "output_tokens_per_s", False),
        ]
    )
    for row in results:
        for ratio, key, inverse in ratios:
            base = statistics.mean(s[key] for s in stock)
            row[ratio] = base / row[key] if inverse else row[key] / base
    report = {
        "settings": vars(args),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "video": {"frames": args.frames, "size": args.size, "pixels": int(np.prod(frames.shape))},
        "results": results,
    }
    if features is not None:
        video = features[: grid[0] * grid[1] * grid[2] // 4]
        report["pruning_step"] = pruning_cost(video, grid, retentions, family, visual_dim)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(online_table(report) if args.online else table(report))
    return report


def table(report: dict) -> str:
    """The results as a markdown table (ratios against the mean of the stock runs)."""
    lines = [
        "| method | retention | prompt tokens | TTFT s [all] | vision + pruning s | LM prefill s | "
        "TTFT speedup | LM prefill speedup | output tokens/s (x stock) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        spread = ", ".join(f"{t:.1f}" for t in row["ttft_all_s"])
        lines.append(
            f"| {row['method']} | {row['retention'] or '-'} | {row['prompt_tokens']} | "
            f"{row['ttft_s']:.2f} [{spread}] | {row['encode_s']:.2f} | {row['lm_prefill_s']:.2f} | "
            f"{row['ttft_speedup']:.2f}x | {row['lm_prefill_speedup']:.2f}x | "
            f"{row['output_tokens_per_s']:.2f} ({row['throughput_ratio']:.2f}x) |"
        )
    return "\n".join(lines)


def online_table(report: dict) -> str:
    """The online results as a markdown table (ratios against the mean of the stock runs)."""
    lines = [
        "| method | retention | requests/s offered | TTFT p50 s | TTFT p95 s | requests/s | output tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['method']} | {row['retention'] or '-'} | {row['rate']:g} | {row['ttft_p50_s']:.2f} "
            f"({row['ttft_p50_speedup']:.2f}x) | {row['ttft_p95_s']:.2f} | {row['requests_per_s']:.2f} | "
            f"{row['output_tokens_per_s']:.1f} ({row['throughput_ratio']:.2f}x) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
