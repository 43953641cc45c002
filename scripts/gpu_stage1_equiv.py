"""Stage 1 on the GPU against the CPU on the SAME features (tiny towers' real features, and
tie-heavy synthetic ones), and how far the tiny towers' own features differ between devices."""

import os
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from helpers import QUESTIONS, tiny, video_batch

from prunevid import PruneVidConfig, merge_tokens
from prunevid.bench.measure import (
    make_prompt,
    video_tokens,
    vision_features,
)
from prunevid.testing import tiny_tokenizer

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
dev = torch.device(os.environ.get("EQUIV_DEVICE", "cuda"))
tok = tiny_tokenizer()
bad = 0
CONFIGS = [PruneVidConfig(selected_layer=1)] + [
    PruneVidConfig(selected_layer=1, retention=r) for r in (0.5, 0.25, 0.1)
]


def same(a, b):
    keys = ("segments", "static", "num_tokens", "set_sizes")

    def eq(u, v):
        if u is None or v is None:
            return u is v
        return torch.equal(torch.as_tensor(u).cpu(), torch.as_tensor(v).cpu())

    diff = [k for k in keys if not eq(getattr(a, k), getattr(b, k))]
    if not torch.allclose(a.tokens.cpu(), b.tokens.cpu(), atol=1e-5, rtol=1e-5):
        diff.append("tokens")
    return diff


def check(name, x, grid):
    global bad
    for cfg in CONFIGS:
        d = same(merge_tokens(x, cfg, grid), merge_tokens(x.to(dev), cfg, grid))
        bad += bool(d)
        if d:
            print(f"  BAD {name} retention={cfg.retention}: differs in {d}", flush=True)


for family in ("llava_onevision", "qwen2_5_vl", "qwen3_vl"):
    model = tiny(family, tok)
    inputs = video_batch(model, tok, [3], QUESTIONS[:1])
    x, grid = video_tokens(model, make_prompt(model, inputs, vision_features(model, inputs)[0]))
    model.to(dev)
    y, _ = video_tokens(
        model,
        make_prompt(
            model,
            {k: v.to(dev) for k, v in inputs.items()},
            vision_features(model, {k: v.to(dev) for k, v in inputs.items()})[0],
        ),
    )
    rel = ((x - y.cpu()).abs().max() / x.abs().max()).item()
    own = same(merge_tokens(x, CONFIGS[0], grid), merge_tokens(y, CONFIGS[0], grid))
    print(
        f"{family}: tower features CPU vs {dev}: max rel diff {rel:.2e}; stage 1 on each device's own features differs in {own or 'nothing'}",
        flush=True,
    )
    check(family, x, grid)

g = torch.Generator().manual_seed(0)
for seed in range(12):
    T, side, C = (8, 16, 32)[seed % 3], (4, 7, 14)[seed % 3], 16
    x = torch.randn(T, side * side, C, generator=g)
    if seed % 4 == 0:
        x[:] = x[0]  # every frame the same: ties everywhere
    elif seed % 4 == 1:
        x[:, : side * side // 2] = x[0, : side * side // 2]  # a still half
    elif seed % 4 == 2:
        x = x.round()  # coarse values: many equal distances
    check(f"synthetic seed={seed} T={T} grid={side}x{side}", x, (side, side))
print(f"stage1_equiv: {bad} mismatches")
