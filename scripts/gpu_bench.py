"""`prunevid bench speed` on a GPU, its markdown appended to a results file: what gpu_check.sh runs.

    python scripts/gpu_bench.py --append docs/bench_speed.md -- --arch qwen2-7b --dtype bfloat16

The benchmark builds its random-weight models on the CPU. Here the family adapters' entry points
(`build_inputs`, `video_features`) put every input on the device and the model there (with SDPA
attention) the first time its vision tower runs, which is before any timed call; the vision tower
then waits for the device before its time is read (CUDA runs asynchronously). The benchmark's
own code is unchanged. The appended section names the device, its peak memory and the settings;
the benchmark's RSS columns count host memory only.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


def place_on(device: torch.device) -> None:
    """Route every model and input of the family adapters to `device` (see the module docstring)."""
    from prunevid.models import llava_onevision, qwen2_vl

    for family in (llava_onevision, qwen2_vl):
        family.build_inputs = _inputs_on(family.build_inputs, device)
        family.video_features = _model_on(family.video_features, device)


def _inputs_on(build, device: torch.device):
    @functools.wraps(build)
    def build_inputs(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return {key: value.to(device) for key, value in build(*args, **kwargs).items()}

    return build_inputs


def _model_on(encode, device: torch.device):
    @functools.wraps(encode)
    def video_features(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        if next(model.parameters()).device != device:
            model.to(device)
            if model.config._attn_implementation != "sdpa":
                model.set_attn_implementation("sdpa")
        output = encode(model, {key: value.to(device) for key, value in inputs.items()})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return output

    return video_features


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def section(device: torch.device, report: str, bench_args: list[str]) -> str:
    """The markdown appended to the results file."""
    peak = ""
    if device.type == "cuda":
        peak = f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    command = " ".join(["prunevid bench speed", *bench_args])
    return "\n".join(
        [
            "",
            f"## On {device_name(device)}: {_value(bench_args, '--arch')}, {_value(bench_args, '--dtype', 'float32')}, SDPA",
            "",
            f"Measured {date} by `scripts/gpu_check.sh` (torch {torch.__version__}{cuda}{peak}); "
            "models and inputs placed on the device by `scripts/gpu_bench.py`. The RSS columns are host memory.",
            "",
            "```bash",
            command,
            "```",
            "",
            report.strip(),
            "",
        ]
    )


def _value(args: list[str], flag: str, default: str = "default") -> str:
    return args[args.index(flag) + 1] if flag in args else default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="default cuda")
    parser.add_argument("--append", required=True, help="markdown file the results are appended to")
    parser.add_argument("bench", nargs=argparse.REMAINDER, help="-- then `prunevid bench speed` arguments")
    args = parser.parse_args(argv)
    bench_args = [a for a in args.bench if a != "--"]
    device = torch.device(args.device)
    place_on(device)
    from prunevid.cli import main as prunevid

    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.md"
        code = prunevid(["bench", "speed", *bench_args, "--markdown", str(report)])
        if code != 0:
            return code
        with open(args.append, "a") as f:
            f.write(section(device, report.read_text(), bench_args))
    print(f"gpu_bench: appended {_value(bench_args, '--arch')} on {device_name(device)} to {args.append}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
