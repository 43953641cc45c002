"""scripts/gpu_check.sh without a GPU (one line, exit 0), and the same script pointed at the CPU
with the tiny model (GPU_CHECK_DEVICE / GPU_CHECK_ARCHS): `prunevid bench speed --device` runs
and its report is appended under a heading naming the GPU ("CPU" here), model, dtype and device.
`--device` asks for a device this machine has, or says in one sentence why not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunevid.bench.speed import check_device
from prunevid.cli import main

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        # This interpreter: `python` on PATH may be another one (a venv used without activating it).
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would measure")
def test_gpu_check_without_a_gpu_says_so_and_exits_cleanly():
    before = (ROOT / "docs" / "bench_speed.md").read_text()
    done = gpu_check()
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout
        == "gpu_check: no CUDA GPU on this machine; nothing measured, docs/bench_speed.md unchanged.\n"
    )
    assert (ROOT / "docs" / "bench_speed.md").read_text() == before


def test_gpu_check_appends_each_report_under_its_own_heading(tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# earlier results\n")
    done = gpu_check({"GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_ARCHS": "tiny", "GPU_CHECK_OUT": str(results)})
    assert done.returncode == 0, done.stderr
    text = results.read_text()
    assert text.startswith("# earlier results\n\n## CPU: tiny, bfloat16, on cpu (scripts/gpu_check.sh, ")
    assert "`prunevid bench speed --arch tiny --dtype bfloat16 --video assets/bbb.mp4 --frames 16" in text
    assert "**tiny**, bfloat16:" in text and "| stock | 784 (100.0%) |" in text and "| prunevid |" in text
    record = json.loads((tmp_path / "bench_speed_tiny_bfloat16_cpu.json").read_text())
    assert record["device"] == {"type": "cpu", "name": "cpu", "attention": "sdpa"}
    assert record["dtype"] == "bfloat16" and record["frames"] == 16


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tpu", "--device must be cpu or cuda[:index], got 'tpu'"),
        ("not a device", "--device must be cpu or cuda[:index], got 'not a device'"),
        ("cuda:99", "--device cuda:99: "),
    ],
)
def test_bench_device_must_be_one_this_machine_has(name, message, capsys):
    with pytest.raises(ValueError) as error:
        check_device(name)
    assert str(error.value).startswith(message)
    assert main(["bench", "speed", "--quick", "--device", name]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_bench_on_cuda_without_a_gpu_is_one_sentence():
    with pytest.raises(ValueError, match=r"^--device cuda: torch sees no CUDA GPU on this machine$"):
        check_device("cuda")
