"""Same results on the GPU: every method on tiny LLaVA-OV / Qwen2.5-VL / Qwen3-VL models, fp32,
CPU against CUDA from the same inputs (kept sets, merges, scores, greedy tokens, logits), and the
device preprocessing against the CPU one. Prints one line per case; exits 1 on any mismatch."""

import copy
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from helpers import QUESTIONS, greedy, moving_square, tiny, video_batch

import prunevid
from prunevid.bench.measure import model_inputs
from prunevid.testing import tiny_tokenizer

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
cuda = torch.device(__import__("os").environ.get("EQUIV_DEVICE", "cuda"))
tok = tiny_tokenizer()
bad = 0
CASES = [
    ("prunevid", None),
    ("prunevid", 0.25),
    ("stage1", None),
    ("stage2", None),
    ("stage1", 0.1),
    ("fastv", 0.25),
    ("random", 0.25),
    ("evs", 0.25),
    ("dycoke", 0.25),
    ("uniform", 0.25),
]


def compare(name, a, b):
    global bad
    same = {
        k: np.array_equal(getattr(a, k), getattr(b, k)) for k in ("segment", "static", "merged_index", "kept")
    }
    score = np.allclose(a.score, b.score, atol=1e-4, equal_nan=True)
    ok = all(same.values()) and score
    bad += not ok
    return ok, same, score


for family in ("llava_onevision", "qwen2_5_vl", "qwen3_vl"):
    cpu_model = tiny(family, tok)
    gpu_model = copy.deepcopy(cpu_model).to(cuda)
    size = 128 if family == "qwen3_vl" else 112
    frames = moving_square(3, size=size)
    a, _ = model_inputs(cpu_model, tok, frames, QUESTIONS[1])
    b, _ = model_inputs(gpu_model, tok, frames, QUESTIONS[1])
    pix = (a["pixel_values_videos"] - b["pixel_values_videos"].cpu()).abs().max().item()
    ids = all(torch.equal(a[k], b[k].cpu()) for k in a if k != "pixel_values_videos")
    print(f"{family}: device preprocessing max |diff| {pix:.2e}, other inputs equal {ids}", flush=True)
    for rows in (1, 2):
        inputs = video_batch(cpu_model, tok, [3, 5][:rows], QUESTIONS[:rows])
        on_gpu = {k: v.to(cuda) for k, v in inputs.items()}
        for method, retention in CASES:
            for m in (cpu_model, gpu_model):
                prunevid.patch(
                    m, prunevid.PruneVidConfig(selected_layer=1), method=method, retention=retention
                )
            tic = time.perf_counter()
            out_a = greedy(cpu_model, inputs, steps=6)
            out_b = greedy(gpu_model, on_gpu, steps=6)
            tokens = torch.equal(out_a.sequences, out_b.sequences.cpu())
            logit = max((x - y.cpu()).abs().max().item() for x, y in zip(out_a.logits, out_b.logits))
            traces = [
                compare(method, x, y)
                for x, y in zip(prunevid.last_traces(cpu_model), prunevid.last_traces(gpu_model))
                if x is not None
            ]
            ok = tokens and all(t[0] for t in traces) and logit < 1e-3
            bad += not (tokens and logit < 1e-3)
            print(
                f"  {'ok ' if ok else 'BAD'} {family} rows={rows} {method}@{retention}: tokens equal {tokens}, "
                f"logits max|diff| {logit:.1e}, traces {[(t[1], t[2]) for t in traces if not t[0]] or 'equal'} "
                f"({time.perf_counter() - tic:.1f} s)",
                flush=True,
            )
        for m in (cpu_model, gpu_model):
            prunevid.unpatch(m)
print(f"gpu_equiv: {bad} mismatches")
sys.exit(1 if bad else 0)
