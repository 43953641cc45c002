"""PruneVid's vLLM plugin inside vLLM (its CPU build), on a tiny random Qwen2.5-VL checkpoint.

Needs vLLM: skipped elsewhere. Run with `bash .ci/vllm` (it builds the environment: vLLM's CPU
build with its workarounds, and sets PRUNEVID_REFERENCE_PYTHON to the main environment's
interpreter, which computes our transformers path's stage 1 for the equivalence checks).

Each engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so the tests can read what
the language model receives) inside one module fixture, which serves every request the tests
need and shuts it down; tests then compare what was recorded. The checks:
* plugin on, pruning off (retention 1) == stock vLLM: outputs, and the embeddings and positions
  the language model receives;
* pruned: the merged embeddings and positions the language model receives == the transformers
  adapter's stage 1 at the same retention (float tolerance; positions exactly), with chunked
  prefill splitting the video; a batch mixing videos of two sizes with a text-only request gives
  each its solo answer; a prefix-cache hit gives the same answer;
* bf16: positions above 256 arrive exactly;
* images are untouched, alone or beside a pruned video;
* an over-long video fails its request, and the engine serves the next ones;
* on any vLLM: every vLLM name the plugin touches imports; vLLM's plugin loader with a faked
  untested version starts and registers nothing; "prunevid" without the architecture refuses
  to start;
* vLLM's own EVS runs on the CPU build (opted in to the plugin's runner fix), and its prefix-cache
  misnumbering is pinned;
* `vllm serve` (front-end and engine in separate processes) answers an OpenAI chat request with
  a video exactly as the in-process engine, logs the start-up line, and refuses bad settings at
  start-up.
"""

from __future__ import annotations

import base64
import gc
import importlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed: run these with `bash .ci/vllm` (GPU: pip install 'prunevid[vllm]')"
)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np
import torch
from PIL import Image
from vllm import LLM, SamplingParams
from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

from prunevid.integrations import vllm as plugin
from prunevid.merge import merge_tokens
from prunevid.synthetic import make_sample
from prunevid.testing import save_tiny_qwen_vl, tiny_tokenizer

PRUNED = {"retention": 0.25}
HALF = {"retention": 0.5}  # a request's own budget: mm_processor_kwargs {"prunevid_retention": 0.5}
ARCH = [plugin.ARCHITECTURE]
PROMPT = (
    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what colour is the object ?"
    "<|im_end|>\n<|im_start|>assistant\n"
)
# A question long enough that the prefix cache can hold the whole video and more (blocks of 32).
LONG_PROMPT = PROMPT.replace(
    "what colour is the object ?",
    "what colour is the object that moves in the video , and where does it move from the first frame "
    "to the last frame ? describe the scene , the background and the small objects , and say which "
    "object appears first and which one disappears ?",
)
TEXT_PROMPT = "<|im_start|>user\nhow many objects are there ?<|im_end|>\n<|im_start|>assistant\n"
# An image before a video, and an image alone (its prompt shares no cache block with the first).
IMAGE_VIDEO_PROMPT = PROMPT.replace(
    "<|vision_start|>", "<|vision_start|><|image_pad|><|vision_end|><|vision_start|>"
)
IMAGE_PROMPT = (
    "<|im_start|>user\nhow many objects are there ? <|vision_start|><|image_pad|><|vision_end|>"
    "<|im_end|>\n<|im_start|>assistant\n"
)
NEW_TOKENS = 4
VIDEO_PAD = tiny_tokenizer().convert_tokens_to_ids("<|video_pad|>")
IMAGE_PAD = tiny_tokenizer().convert_tokens_to_ids("<|image_pad|>")
SERVE_VIDEO = Path(__file__).parent.parent / "prunevid/eval_tasks/prunevid_synth/videos/synth_7000000.mp4"
SERVE_MEDIA = {"video": {"num_frames": 8}}


def video(num_frames: int, size: int, fps: float, seed: int = 1) -> tuple[np.ndarray, dict]:
    """A synthetic shape video (static textured background, moving objects) as vLLM takes it."""
    frames = make_sample(seed, num_frames=num_frames, size=size).frames
    metadata = {
        "fps": fps,
        "duration": num_frames / fps,
        "total_num_frames": num_frames,
        "frames_indices": list(range(num_frames)),
        "video_backend": "opencv",
        "do_sample_frames": False,
    }
    return frames, metadata


# SHORT: 4 steps of 8 x 8 tokens, t spaced by 2 (fps 2, 2 tokens per second): t stays inside the
# frame's extent. LONG: 8 steps of 4 x 4: t reaches 14, past the frame's extent of 4.
# FAR: 3 steps of 4 x 4 at 0.01 fps: t = 0, 400, 800, beyond what bf16 holds exactly.
VIDEOS = {
    "short": video(8, 224, 2.0),
    "long": video(16, 112, 2.0, seed=2),
    "far": video(6, 112, 0.01, seed=3),
    # 3 steps 20,000 s apart: t = 0, 40,000, 80,000.
    "too_long": video(6, 112, 0.0001, seed=4),
}


# 112 x 112 px: 4 x 4 merged tokens.
IMAGE = Image.fromarray(make_sample(5, num_frames=6, size=112).frames[0])


def request(name: str, prompt: str = PROMPT, retention: float | None = None) -> dict:
    """A video request; with a retention, its own (the plugin's per-request budget)."""
    own = {} if retention is None else {"mm_processor_kwargs": {plugin.REQUEST_RETENTION: retention}}
    return {"prompt": prompt, "multi_modal_data": {"video": VIDEOS[name]}, **own}


def media_requests(llm: LLM) -> dict:
    """An image-only prompt, then an image and a video in one prompt."""
    return {
        "image": observe(llm, {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": IMAGE}}),
        "image_video": observe(
            llm,
            {"prompt": IMAGE_VIDEO_PROMPT, "multi_modal_data": {"image": IMAGE, "video": VIDEOS["short"]}},
        ),
    }


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return save_tiny_qwen_vl(str(tmp_path_factory.mktemp("tiny-qwen2.5-vl")))


@contextmanager
def engine(checkpoint: str, instrument=None, **options):
    """One in-process engine with the model instrumented (`instrument`, by default `_instrument`:
    what `embed_multimodal` gets, what the vision tower returns, and the positions and embeddings
    of every language-model call); `options` override the engine settings."""
    settings = dict(
        max_model_len=1024,
        enforce_eager=True,
        dtype="float32",
        limit_mm_per_prompt={"video": 2, "image": 1},
        max_num_seqs=4,
        seed=0,
    )
    llm = LLM(checkpoint, **{**settings, **options})
    llm.apply_model(instrument or _instrument)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def _instrument(model: torch.nn.Module) -> None:
    log = model.prunevid_log = {"mm": [], "pixels": [], "vision": [], "lm": []}
    embed = model.embed_multimodal

    def embed_multimodal(**kwargs):
        log["mm"].append({k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return embed(**kwargs)

    model.embed_multimodal = embed_multimodal
    # vLLM normalises pixels on the device by default: the tower's first step gives what transformers takes.
    model.visual.input_norm.register_forward_hook(lambda m, args, out: log["pixels"].append(out.clone()))
    model.visual.register_forward_hook(lambda m, args, out: log["vision"].append(out.clone()))
    model.register_forward_pre_hook(
        lambda m, args, kw: log["lm"].append((kw["positions"].clone(), kw["inputs_embeds"].clone())),
        with_kwargs=True,
    )


def take_log(llm: LLM) -> dict:
    def take(model):
        log = {k: list(v) for k, v in model.prunevid_log.items()}
        for v in model.prunevid_log.values():
            v.clear()
        return log

    return llm.apply_model(take)[0]


def prefill_inputs(log: dict, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions (3, L) and embeddings (L, C) the language model got for a prompt of `length`
    tokens sent alone, whatever the chunks."""
    positions, embeds, seen = [], [], 0
    for p, e in log["lm"]:
        if seen == length:
            break
        positions.append(p[:, : length - seen])
        embeds.append(e[: length - seen])
        seen += positions[-1].shape[1]
    return torch.cat(positions, 1), torch.cat(embeds)


def solo(llm: LLM, name: str, prompt: str = PROMPT) -> dict:
    """One video request alone: its output and what the model saw."""
    return observe(llm, request(name, prompt))


def observe(llm: LLM, prompt: dict) -> dict:
    """One request alone: its output and what the model saw."""
    take_log(llm)
    out = llm.generate(prompt, greedy(), use_tqdm=False)[0]
    log = take_log(llm)
    # A prefix-cache hit computes only the rest of the prompt (and may not encode the video).
    positions, embeds = prefill_inputs(log, len(out.prompt_token_ids) - (out.num_cached_tokens or 0))
    encoded = bool(log["mm"])
    return {
        "out": out,
        "positions": positions,
        "embeds": embeds,
        "calls": [p.shape[1] for p, _ in log["lm"]],  # tokens of each language-model call
        "mm": log["mm"][0] if encoded else None,
        "pixels": log["pixels"][0] if encoded else None,
        "vision": log["vision"][0] if encoded else None,
    }


def answers(outputs) -> list[tuple[list[int], list[float]]]:
    return [
        (o.outputs[0].token_ids, [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs])
        for o in outputs
    ]


def mixed_batch(llm: LLM) -> list:
    prompts = [request("short"), request("long"), {"prompt": TEXT_PROMPT}]
    return llm.generate(prompts, greedy(), use_tqdm=False)


def chat_messages() -> list[dict]:
    """An OpenAI-style chat with the served test video, as a data URL."""
    url = "data:video/mp4;base64," + base64.b64encode(SERVE_VIDEO.read_bytes()).decode()
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "what colour ?"}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def stock(checkpoint) -> dict:
    with engine(checkpoint, media_io_kwargs=SERVE_MEDIA) as llm:
        results = {"short": solo(llm, "short"), "long": solo(llm, "long"), "batch": mixed_batch(llm)}
        take_log(llm)
        results["chat"] = llm.chat(chat_messages(), greedy(), use_tqdm=False)[0]
        results.update(media_requests(llm))
        return results


@pytest.fixture(scope="module")
def off(checkpoint) -> dict:
    overrides = {"architectures": ARCH, "prunevid": {"retention": 1.0}}
    with engine(checkpoint, hf_overrides=overrides) as llm:
        return {"short": solo(llm, "short"), "long": solo(llm, "long"), "batch": mixed_batch(llm)}


@pytest.fixture(scope="module")
def pruned(checkpoint) -> dict:
    # Chunks of 48 tokens split the short video's 64 merged tokens across two steps.
    overrides = {"architectures": ARCH, "prunevid": PRUNED}
    with engine(
        checkpoint,
        hf_overrides=overrides,
        enable_chunked_prefill=True,
        max_num_batched_tokens=48,
        block_size=32,
        media_io_kwargs=SERVE_MEDIA,
    ) as llm:
        # First a video whose positions the plugin cannot carry: refused; the engine goes on serving.
        with pytest.raises(ValueError) as refused:
            llm.generate(request("too_long"), greedy(), use_tqdm=False)
        results = {"too_long": str(refused.value)}
        with pytest.raises(ValueError) as refused:
            llm.generate(request("short", retention=1.5), greedy(), use_tqdm=False)
        results["bad_budget"] = str(refused.value)
        results.update(short=solo(llm, "short"), long=solo(llm, "long"))
        results["text"] = llm.generate({"prompt": TEXT_PROMPT}, greedy(), use_tqdm=False)[0]
        results["batch"] = mixed_batch(llm)
        # Twice the same long question: the second time the prefix cache holds the whole video.
        results["long_question"] = solo(llm, "short", LONG_PROMPT)
        results["again"] = solo(llm, "short", LONG_PROMPT)
        results["chat"] = llm.chat(chat_messages(), greedy(), use_tqdm=False)[0]
        results.update(media_requests(llm))
        # Budgets per request: one alone, then two budgets in one batch (and the default's).
        results["short_half"] = observe(llm, request("short", retention=HALF["retention"]))
        batch = [
            request("short", retention=HALF["retention"]),
            request("long"),
            request("long", retention=0.125),
        ]
        results["budget_batch"] = llm.generate(batch, greedy(), use_tqdm=False)
        results["long_eighth"] = observe(llm, request("long", retention=0.125))
        return results


@pytest.fixture(scope="module")
def reference(checkpoint, pruned, tmp_path_factory) -> dict:
    """Our transformers path's stage 1 on the same requests (same pixels), in the main environment."""
    python = os.environ.get("PRUNEVID_REFERENCE_PYTHON")
    if not python:
        pytest.fail(
            "set PRUNEVID_REFERENCE_PYTHON to an interpreter of prunevid's main environment "
            "(transformers>=5.24), as .ci/vllm does"
        )
    folder = tmp_path_factory.mktemp("reference")
    results = {}
    for name, settings in {"short": PRUNED, "long": PRUNED, "short_half": HALF}.items():
        seen = pruned[name]
        grid = seen["mm"]["video_grid_thw"]
        ids = torch.tensor(seen["out"].prompt_token_ids)
        full = int(grid.prod()) // 4  # one placeholder per merged patch, as stock
        start = int((ids == VIDEO_PAD).nonzero()[0])
        count = int((ids == VIDEO_PAD).sum())
        ids = torch.cat([ids[:start], torch.full((full,), VIDEO_PAD), ids[start + count :]])
        path = folder / f"{name}.pt"
        torch.save(
            {
                "input_ids": ids,
                "pixel_values_videos": seen["pixels"],
                "video_grid_thw": grid,
                "second_per_grid_ts": seen["mm"]["second_per_grid_ts"],
                "settings": settings,
            },
            path,
        )
        out = folder / f"{name}-out.pt"
        script = Path(__file__).parent / "vllm_reference.py"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PYTHONPATH"] = str(Path(__file__).parent.parent)
        subprocess.run(
            [python, str(script), checkpoint, str(path), str(out)], check=True, env=env, timeout=300
        )
        results[name] = torch.load(out)
    return results


# ---- plugin on, pruning off == stock ------------------------------------------------------


@pytest.mark.parametrize("name", ["short", "long"])
def test_pruning_off_is_stock_vllm(stock, off, name):
    assert off[name]["out"].prompt_token_ids == stock[name]["out"].prompt_token_ids
    assert torch.equal(off[name]["positions"], stock[name]["positions"])
    torch.testing.assert_close(off[name]["embeds"], stock[name]["embeds"], rtol=0, atol=0)
    assert answers([off[name]["out"]]) == answers([stock[name]["out"]])


def test_pruning_off_batch_is_stock_vllm(stock, off):
    assert answers(off["batch"]) == answers(stock["batch"])


# ---- pruned == the transformers path's stage 1 ----------------------------------------------


def test_video_gets_the_budgeted_count(pruned, stock):
    for name, (steps, per_step) in {"short": (4, 64), "long": (8, 16)}.items():
        ids = pruned[name]["out"].prompt_token_ids
        assert ids.count(VIDEO_PAD) == round(PRUNED["retention"] * steps * per_step)
        assert stock[name]["out"].prompt_token_ids.count(VIDEO_PAD) == steps * per_step
        text = [i for i in ids if i != VIDEO_PAD]
        assert text == [i for i in stock[name]["out"].prompt_token_ids if i != VIDEO_PAD]


def test_pruned_inputs_equal_the_transformers_path(pruned, reference):
    # The short video: t stays inside the frame's extent, where vLLM and transformers number alike.
    seen, expected = pruned["short"], reference["short"]
    torch.testing.assert_close(seen["vision"], expected["features"], rtol=1e-4, atol=1e-5)
    assert torch.equal(seen["positions"], expected["positions"])
    torch.testing.assert_close(seen["embeds"], expected["embeds"], rtol=1e-4, atol=1e-5)
    # The same, from tests/reference.py's logical prompt (neither the adapter nor `first_members`).
    assert torch.equal(seen["positions"], expected["logical_positions"])
    torch.testing.assert_close(seen["embeds"], expected["logical_embeds"], rtol=1e-4, atol=1e-5)
    # Stage 1 really merged: the positions are those of 64 of the 256 tokens, not a prefix of them.
    is_video = torch.tensor(seen["out"].prompt_token_ids) == VIDEO_PAD
    assert len(set(seen["positions"][0, is_video].tolist())) == 4  # every time step kept some


def test_long_video_inputs_equal_the_transformers_path_up_to_its_text_numbering(pruned, reference, stock):
    seen, expected = pruned["long"], reference["long"]
    torch.testing.assert_close(seen["embeds"], expected["embeds"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen["embeds"], expected["logical_embeds"], rtol=1e-4, atol=1e-5)
    ids = torch.tensor(seen["out"].prompt_token_ids)
    after = int((ids == VIDEO_PAD).nonzero()[-1]) + 1
    assert torch.equal(seen["positions"][:, :after], expected["positions"][:, :after])
    assert torch.equal(seen["positions"][:, :after], expected["logical_positions"][:, :after])
    # What follows the video: vLLM continues after the largest position (t = 14: 15 on from the
    # video's start), transformers 5.x after the frame's widest side (4): 11 apart, as stock.
    assert torch.equal(seen["positions"][:, after:], expected["positions"][:, after:] + 11)
    stock_ids = torch.tensor(stock["long"]["out"].prompt_token_ids)
    stock_after = int((stock_ids == VIDEO_PAD).nonzero()[-1]) + 1
    assert torch.equal(stock["long"]["positions"][:, stock_after:], seen["positions"][:, after:])


def test_stock_positions_of_vllm_and_transformers(stock, reference):
    """docs/vllm.md, "Positions": the two stock numberings agree up to the end of a video and differ
    after it only when the video's temporal positions outgrow its frame."""
    short = stock["short"]["positions"]
    assert torch.equal(short, reference["short"]["stock_positions"])
    long, theirs = stock["long"]["positions"], reference["long"]["stock_positions"]
    ids = torch.tensor(stock["long"]["out"].prompt_token_ids)
    after = int((ids == VIDEO_PAD).nonzero()[-1]) + 1
    assert torch.equal(long[:, :after], theirs[:, :after])
    assert torch.equal(long[:, after:], theirs[:, after:] + 11)


def test_chunked_prefill_split_the_video(pruned):
    ids = pruned["short"]["out"].prompt_token_ids
    start, end = ids.index(VIDEO_PAD), len(ids) - ids[::-1].index(VIDEO_PAD)
    # Two prefill chunks of at most 48 tokens, then one call per further new token.
    assert pruned["short"]["calls"] == [48, len(ids) - 48] + [1] * (NEW_TOKENS - 1)
    assert start < 48 < end  # the split falls inside the video
    assert pruned["short"]["positions"].shape[1] == len(ids)


def test_an_over_long_video_fails_its_request_and_the_engine_keeps_serving(pruned):
    assert pruned["too_long"] == (
        "this video is too long for PruneVid's vLLM plugin: its 3 time steps reach position 80000 from its "
        "start, and the plugin carries positions below 65,536 (sample fewer frames, or send a shorter clip)"
    )
    # The requests after it (every other one the fixture sent) were served.
    assert len(pruned["short"]["out"].outputs[0].token_ids) == NEW_TOKENS


def test_mixed_batch_gives_each_request_its_solo_answer(pruned):
    batch = answers(pruned["batch"])
    alone = answers([pruned["short"]["out"], pruned["long"]["out"], pruned["text"]])
    for (tokens, logprobs), (solo_tokens, solo_logprobs) in zip(batch, alone):
        assert tokens == solo_tokens
        np.testing.assert_allclose(logprobs, solo_logprobs, atol=1e-4)


def test_prefix_cache_hit_keeps_positions_and_answer(pruned):
    first, again = pruned["long_question"], pruned["again"]
    ids = again["out"].prompt_token_ids
    video_end = len(ids) - ids[::-1].index(VIDEO_PAD)
    cached, cached_first = again["out"].num_cached_tokens, first["out"].num_cached_tokens or 0
    assert cached >= video_end  # the video came from the cache: no encoding, no position rewrite
    assert again["mm"] is None
    assert torch.equal(again["positions"], first["positions"][:, cached - cached_first :])
    # The text after the video continues past its extent (t = 6 on from its start: 7; frame: 8).
    start = ids.index(VIDEO_PAD)
    assert again["positions"][0].tolist() == list(
        range(start + 8 + cached - video_end, start + 8 + len(ids) - video_end)
    )
    assert answers([again["out"]]) == answers([first["out"]])


# ---- a budget per request -------------------------------------------------------------------------


def test_a_request_budget_is_exact_and_equals_the_transformers_path_at_that_retention(pruned, reference):
    seen, expected = pruned["short_half"], reference["short_half"]
    assert seen["out"].prompt_token_ids.count(VIDEO_PAD) == 128  # round(0.5 * 256)
    assert torch.equal(seen["positions"], expected["positions"])
    torch.testing.assert_close(seen["embeds"], expected["embeds"], rtol=1e-4, atol=1e-5)
    assert torch.equal(seen["positions"], expected["logical_positions"])
    # Not the engine's 25%: its 64 placeholders and merged tokens differ.
    assert pruned["short"]["out"].prompt_token_ids.count(VIDEO_PAD) == 64


def test_requests_with_different_budgets_in_one_batch_each_get_their_solo_answer(pruned):
    batch = pruned["budget_batch"]
    assert [o.prompt_token_ids.count(VIDEO_PAD) for o in batch] == [128, 32, 16]  # 50%, 25%, 12.5%
    alone = [pruned["short_half"]["out"], pruned["long"]["out"], pruned["long_eighth"]["out"]]
    assert [o.prompt_token_ids for o in batch] == [o.prompt_token_ids for o in alone]
    for (tokens, logprobs), (solo_tokens, solo_logprobs) in zip(answers(batch), answers(alone)):
        assert tokens == solo_tokens
        np.testing.assert_allclose(logprobs, solo_logprobs, atol=1e-4)


def test_a_bad_request_budget_fails_that_request(pruned):
    assert pruned["bad_budget"] == "retention must be in (0, 1], got 1.5"


# ---- images beside the plugin: untouched -------------------------------------------------------


def test_an_image_only_prompt_with_the_plugin_is_stock_vllm(stock, pruned):
    seen, base = pruned["image"], stock["image"]
    assert seen["out"].prompt_token_ids == base["out"].prompt_token_ids
    assert seen["out"].prompt_token_ids.count(IMAGE_PAD) == 16
    assert torch.equal(seen["positions"], base["positions"])
    torch.testing.assert_close(seen["embeds"], base["embeds"], rtol=0, atol=0)
    assert answers([seen["out"]]) == answers([base["out"]])


def test_an_image_beside_a_pruned_video_is_untouched(stock, pruned):
    seen, base = pruned["image_video"], stock["image_video"]
    ids, stock_ids = torch.tensor(seen["out"].prompt_token_ids), torch.tensor(base["out"].prompt_token_ids)
    assert int((ids == VIDEO_PAD).sum()) == 64 and int((stock_ids == VIDEO_PAD).sum()) == 256
    image = (ids == IMAGE_PAD).nonzero().squeeze(1)  # the image comes first: the same rows in both
    assert torch.equal(image, (stock_ids == IMAGE_PAD).nonzero().squeeze(1)) and len(image) == 16
    torch.testing.assert_close(seen["embeds"][image], base["embeds"][image], rtol=0, atol=0)
    assert torch.equal(seen["positions"][:, image], base["positions"][:, image])
    # The video beside it is merged as when it comes alone.
    is_video, alone = ids == VIDEO_PAD, torch.tensor(pruned["short"]["out"].prompt_token_ids) == VIDEO_PAD
    torch.testing.assert_close(
        seen["embeds"][is_video], pruned["short"]["embeds"][alone], rtol=1e-5, atol=1e-6
    )
    # Its tokens sit where they sit alone, moved from the stock video start alone (s = 3) to the
    # stock video start here (s = 9: after the image's 4 x 4).
    start, start_alone = int(is_video.nonzero()[0]), int(alone.nonzero()[0])
    moved = (
        base["positions"][:, start : start + 1]
        - stock["short"]["positions"][:, start_alone : start_alone + 1]
    )
    assert moved.tolist() == [[6], [6], [6]]
    assert torch.equal(seen["positions"][:, is_video], pruned["short"]["positions"][:, alone] + moved)


# ---- bf16: positions above 256 -------------------------------------------------------------


def test_bf16_positions_beyond_256_arrive_exact(checkpoint):
    overrides = {"architectures": ARCH, "prunevid": {"retention": 0.5}}
    with engine(checkpoint, hf_overrides=overrides, dtype="bfloat16") as llm:
        seen = solo(llm, "far")
    ids = torch.tensor(seen["out"].prompt_token_ids)
    is_video = ids == VIDEO_PAD
    start = int(is_video.nonzero()[0])  # the video's first position: one past <|vision_start|>'s
    features = seen["vision"]  # (3 * 16, C) bf16, what stage 1 merged
    merge = merge_tokens(features.view(3, 16, -1), plugin.settings({"retention": 0.5}), (4, 4))
    # Each merged token's first member, read off the assignment (not `first_members`).
    assignment = merge.assignment.flatten()
    first = torch.stack([(assignment == m).nonzero()[0, 0] for m in range(merge.num_tokens)])
    expected_t = first // 16 * 400 + start  # 0.01 fps: 200 s per step, 2 positions per second
    assert torch.equal(seen["positions"][0, is_video], expected_t)
    assert torch.equal(seen["positions"][1, is_video], first % 16 // 4 + start)
    assert torch.equal(seen["positions"][2, is_video], first % 4 + start)
    assert int(seen["positions"][0, is_video].max()) > 256
    after = int(is_video.nonzero()[-1]) + 1
    assert seen["positions"][0, after:].tolist() == list(range(start + 801, start + 801 + len(ids) - after))


# ---- the plugin on any vLLM --------------------------------------------------------------------


@pytest.mark.parametrize("name", plugin.VLLM_NAMES)
def test_every_vllm_name_the_plugin_touches_exists(name):
    module, attributes = name.split(":")
    found = importlib.import_module(module)
    for attribute in attributes.split("."):
        found = getattr(found, attribute)


@pytest.mark.parametrize("version", [None, "0.99.0", "0.31.0"])
def test_vllm_starts_with_prunevid_installed_whatever_its_version(version):
    """vLLM's own plugin loader, in a fresh process, with vLLM's version replaced: on an untested
    version the plugin registers nothing and logs one line; on this one it registers."""
    fake = "" if version is None else f"vllm.__version__ = {version!r}\n"
    code = (
        f"import vllm\n{fake}"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm import ModelRegistry\n"
        "from vllm.model_executor.models.config import MODELS_CONFIG_MAP\n"
        "archs = ModelRegistry.get_supported_archs()\n"
        "ours = [(a in archs, a in MODELS_CONFIG_MAP) for a in "
        f"{[plugin.ARCHITECTURE, plugin.LLAVA_ARCHITECTURE, plugin.QWEN3_ARCHITECTURE]!r}]\n"
        "print('registered', *[flag for pair in ours for flag in pair])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    said = [line for line in (run.stdout + run.stderr).splitlines() if "PruneVid" in line]
    if version is None:
        assert "registered True True True True True True" in run.stdout
        assert said == []
    else:
        assert "registered False False False False False False" in run.stdout
        assert len(said) == 1
        assert f"it is tested on vLLM >=0.32,<0.33 and this is vLLM {version}" in said[0]


def _error_messages(error: BaseException) -> list[str]:
    messages, cause = [], error
    while cause is not None:
        messages.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    return messages


def test_prunevid_settings_without_the_architecture_refuse_to_start(checkpoint):
    try:
        with pytest.raises(Exception) as error, engine(checkpoint, hf_overrides={"prunevid": PRUNED}):
            pass
    finally:
        gc.collect()
        cleanup_dist_env_and_memory()
    expected = (
        'hf_overrides "prunevid" does nothing on Qwen2_5_VLForConditionalGeneration: add "architectures": '
        '["PruneVidQwen2_5_VLForConditionalGeneration"] to hf_overrides'
    )
    assert any(expected in m for m in _error_messages(error.value))


# ---- vLLM's own EVS on the CPU build ---------------------------------------------------------


def test_vllm_evs_runs_on_cpu_and_misplaces_text_after_a_cached_video(checkpoint):
    """vLLM's own EVS runs on the CPU build with the plugin's runner fix. docs/vllm.md: on a
    prefix-cache hit over the whole video, EVS numbers the text after it as if the video were
    whole (the plugin does not: test_prefix_cache_hit_keeps_positions_and_answer)."""
    plugin.enable_evs_on_cpu()  # the plugin's CPU runner fix, which it scopes to its own model
    with engine(
        checkpoint,
        video_pruning_rate=0.75,
        enable_chunked_prefill=True,
        max_num_batched_tokens=48,
        block_size=32,
    ) as llm:
        out = llm.generate(request("short"), greedy(), use_tqdm=False)[0]
        first = solo(llm, "short", LONG_PROMPT)
        again = solo(llm, "short", LONG_PROMPT)
    assert out.prompt_token_ids.count(VIDEO_PAD) == 64  # EVS keeps 25% of 256
    assert len(out.outputs[0].token_ids) == NEW_TOKENS
    ids = again["out"].prompt_token_ids
    cached = again["out"].num_cached_tokens
    start, end = ids.index(VIDEO_PAD), len(ids) - ids[::-1].index(VIDEO_PAD)
    assert cached >= end
    index = torch.arange(cached, len(ids))  # the prompt rows computed on the cache hit: text
    # Without the hit, EVS numbers the text after the video from s + w' (the frame width, 8), not
    # from the stock extent (t = 6: 7): row k sits at k - 64 + 8.
    assert torch.equal(first["positions"][:, -len(index) :], (index - (end - start) + 8).expand(3, -1))
    # With it, each text row gets the position the unpruned video's token j = k - s would have
    # (4 steps of 8 x 8, t spaced by 2): text on video positions.
    j = index - start
    assert torch.equal(
        again["positions"], torch.stack([start + j // 64 * 2, start + j % 64 // 8, start + j % 8])
    )


def test_vllm_video_pruning_rate_is_refused_beside_prunevid(checkpoint):
    overrides = {"architectures": ARCH, "prunevid": PRUNED}
    try:
        with (
            pytest.raises(Exception) as error,
            engine(checkpoint, hf_overrides=overrides, video_pruning_rate=0.5),
        ):
            pass
    finally:
        gc.collect()
        cleanup_dist_env_and_memory()
    assert any("PruneVid replaces vLLM's own video pruning" in m for m in _error_messages(error.value))


# ---- vllm serve ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(
    checkpoint: str, settings: dict, port: int, log: Path, architecture: str = plugin.ARCHITECTURE
) -> subprocess.Popen:
    overrides = {"architectures": [architecture], "prunevid": settings}
    command = [
        *(str(Path(sys.executable).parent / "vllm"), "serve", checkpoint),
        *("--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024", "--enforce-eager"),
        *("--dtype", "float32", "--hf-overrides", json.dumps(overrides)),
        *("--media-io-kwargs", json.dumps(SERVE_MEDIA)),
        *("--limit-mm-per-prompt", json.dumps({"video": 1, "image": 0})),
        "--trust-request-mm-kwargs",  # vLLM refuses per-request mm_processor_kwargs (budgets) without it
    ]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def _wait_until_healthy(server: subprocess.Popen, port: int, log: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert server.poll() is None, f"vllm serve exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"vllm serve did not come up in {seconds:.0f} s"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            time.sleep(1)


def _chat(port: int, body: dict) -> dict:
    call = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    return json.load(urllib.request.urlopen(call, timeout=120))


def test_vllm_serve_answers_a_chat_request_with_a_video(checkpoint, stock, pruned, tmp_path):
    """`vllm serve` runs the front-end (the config hook, the processor) and the engine in separate
    processes: the settings reach the engine through vLLM's config (the model refuses to start
    when its pruning rate is not set), and the served answer is the in-process engine's."""
    port, log = _free_port(), tmp_path / "serve.log"
    server = _serve(checkpoint, PRUNED, port, log)
    try:
        _wait_until_healthy(server, port, log)
        body = {
            "model": checkpoint,
            "messages": chat_messages(),
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "return_token_ids": True,
        }
        reply = _chat(port, body)
        # A request's own budget, as the OpenAI client's extra_body={"mm_processor_kwargs": {...}} sends it.
        half = _chat(port, {**body, "mm_processor_kwargs": {plugin.REQUEST_RETENTION: 0.5}})
    finally:
        server.terminate()
        server.wait(timeout=60)
    # The served video: 18 merged tokens in stock vLLM; 25% keeps round(4.5) = 4 (half to even).
    assert stock["chat"].prompt_token_ids.count(VIDEO_PAD) == 18
    assert reply["prompt_token_ids"].count(VIDEO_PAD) == 4
    assert reply["prompt_token_ids"] == pruned["chat"].prompt_token_ids
    assert reply["choices"][0]["token_ids"] == list(pruned["chat"].outputs[0].token_ids)
    assert half["prompt_token_ids"].count(VIDEO_PAD) == 9  # round(0.5 * 18)
    said = [line for line in log.read_text().splitlines() if "PruneVid stage 1 on" in line]
    assert len(said) == 1, said  # once, in the front-end
    assert said[0].endswith("PruneVid stage 1 on PruneVidQwen2_5_VLForConditionalGeneration, retention 0.25")


def test_vllm_serve_refuses_bad_settings_at_startup(checkpoint, tmp_path):
    log = tmp_path / "serve.log"
    server = _serve(checkpoint, {"retention": 1.5}, _free_port(), log)
    try:
        code = server.wait(timeout=300)
    finally:
        server.kill()
    assert code != 0
    assert "retention must be in (0, 1], got 1.5" in log.read_text()
