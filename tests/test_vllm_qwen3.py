"""PruneVid's vLLM plugin for Qwen3-VL inside vLLM (its CPU build), on a tiny random Qwen3-VL
checkpoint (`prunevid.testing.save_tiny_qwen3_vl`: 16 px patches, 2 x 2 merge, deepstack features
from both vision blocks).

Qwen3-VL writes a video as one run of placeholders per time step, each after its timestamp; the
plugin gives every step a fixed share of the budget (`PruneVidConfig.per_step_budget`), so each
run's length is known before the video is encoded. Needs vLLM: skipped elsewhere. Run with
`bash .ci/vllm`, which sets PRUNEVID_REFERENCE_PYTHON to the main environment's interpreter:
tests/vllm_reference.py runs our transformers adapter's stage 1 (per_step_budget) on the same
pixels there. Engines run in this process, as in tests/test_vllm.py, whose helpers these share.
The checks:
* plugin on, pruning off (retention 1) == stock vLLM: prompt tokens, the embeddings and positions
  the language model receives, greedy tokens and log-probabilities, alone and in a batch;
* pruned: each time step's run holds its literal share; the embeddings, deepstack inputs and
  positions the language model receives == the transformers adapter's stage 1 with
  per_step_budget at the same retention, and == tests/reference.py's logical prompt, with chunked
  prefill splitting the video; a batch of two videos and a text-only request gives each its solo
  answer; a prefix-cache hit over the whole video gives the same positions and answer;
* a budget per request (mm_processor_kwargs): exact, uneven shares (earlier steps one more),
  equal to the transformers path at that retention; three budgets in one batch each equal their
  solo run; a budget below a token per time step fails its request, and the engine keeps serving;
* images are untouched, alone or beside a pruned video.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed: run these with `bash .ci/vllm` (GPU: pip install 'prunevid[vllm]')"
)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np
import torch
from test_vllm import IMAGE, NEW_TOKENS, answers, greedy, prefill_inputs, take_log, video
from test_vllm import engine as shared_engine
from vllm import LLM

from prunevid.integrations import vllm as plugin
from prunevid.testing import save_tiny_qwen3_vl, tiny_tokenizer

ARCH = [plugin.QWEN3_ARCHITECTURE]
PRUNED = {"retention": 0.25}
TENTH = 0.1  # a request's own budget: 26 of 256 tokens, shared 7, 7, 6, 6
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
IMAGE_PROMPT = (
    "<|im_start|>user\nhow many objects are there ? <|vision_start|><|image_pad|><|vision_end|>"
    "<|im_end|>\n<|im_start|>assistant\n"
)
IMAGE_VIDEO_PROMPT = PROMPT.replace(
    "<|vision_start|>", "<|vision_start|><|image_pad|><|vision_end|><|vision_start|>", 1
)
VIDEO_PAD = tiny_tokenizer().convert_tokens_to_ids("<|video_pad|>")
IMAGE_PAD = tiny_tokenizer().convert_tokens_to_ids("<|image_pad|>")
VISUAL_DIM = 128  # the tower's output width; two deepstack levels of the same width follow it
# SHORT: 8 frames of 256 px: 4 time steps of 8 x 8 tokens. LONG: 16 frames of 128 px: 8 of 4 x 4.
VIDEOS = {"short": video(8, 256, 2.0), "long": video(16, 128, 2.0, seed=2)}


def request(name: str, prompt: str = PROMPT, retention: float | None = None) -> dict:
    own = {} if retention is None else {"mm_processor_kwargs": {plugin.REQUEST_RETENTION: retention}}
    return {"prompt": prompt, "multi_modal_data": {"video": VIDEOS[name]}, **own}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return save_tiny_qwen3_vl(str(tmp_path_factory.mktemp("tiny-qwen3-vl")))


def engine(checkpoint: str, **options):
    """One in-process engine, instrumented: what `embed_multimodal` gets, the tower's input and
    output, and the positions, embeddings and deepstack inputs of every language-model call."""
    return shared_engine(checkpoint, _instrument, **options)


def _instrument(model: torch.nn.Module) -> None:
    log = model.prunevid_log = {"mm": [], "pixels": [], "vision": [], "lm": [], "deepstack": []}
    embed = model.embed_multimodal

    def embed_multimodal(**kwargs):
        log["mm"].append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return embed(**kwargs)

    deepstack_inputs = model._get_deepstack_input_embeds

    def deepstack(num_tokens: int):  # what the language model adds after its first layers, per call
        levels = deepstack_inputs(num_tokens)
        log["deepstack"].append([x.clone() for x in levels.tensors.values()])
        return levels

    model.embed_multimodal = embed_multimodal
    # vLLM normalises pixels on the device by default: the tower's first step gives what transformers takes.
    model.visual.input_norm.register_forward_hook(lambda m, args, out: log["pixels"].append(out.clone()))
    model.visual.register_forward_hook(lambda m, args, out: log["vision"].append(out.clone()))
    model.register_forward_pre_hook(
        lambda m, args, kw: log["lm"].append((kw["positions"].clone(), kw["inputs_embeds"].clone())),
        with_kwargs=True,
    )
    model._get_deepstack_input_embeds = deepstack


def observe(llm: LLM, prompt: dict) -> dict:
    """One request alone: its output and what the model saw."""
    take_log(llm)
    out = llm.generate(prompt, greedy(), use_tqdm=False)[0]
    log = take_log(llm)
    # A prefix-cache hit computes only the rest of the prompt (and may not encode the video).
    length = len(out.prompt_token_ids) - (out.num_cached_tokens or 0)
    positions, embeds = prefill_inputs(log, length)
    # Each call's deepstack inputs, per level, in call order: the prompt's are the first `length` rows.
    deepstack = [torch.cat(level)[:length] for level in zip(*log["deepstack"])]
    encoded = bool(log["mm"])
    return {
        "out": out,
        "positions": positions,
        "embeds": embeds,
        "deepstack": deepstack,
        "calls": [p.shape[1] for p, _ in log["lm"]],
        "mm": log["mm"][0] if encoded else None,
        "pixels": log["pixels"][0] if encoded else None,
        "vision": log["vision"][0] if encoded else None,
    }


def runs(ids: list[int], token: int = VIDEO_PAD) -> list[int]:
    """The length of every run of `token` in a prompt."""
    return [length for _, length in plugin.token_runs(ids, token)]


def media_requests(llm: LLM) -> dict:
    """An image-only prompt, then an image and a video in one prompt."""
    return {
        "image": observe(llm, {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": IMAGE}}),
        "image_video": observe(
            llm,
            {"prompt": IMAGE_VIDEO_PROMPT, "multi_modal_data": {"image": IMAGE, "video": VIDEOS["short"]}},
        ),
    }


def mixed_batch(llm: LLM) -> list:
    prompts = [request("short"), request("long"), {"prompt": TEXT_PROMPT}]
    return llm.generate(prompts, greedy(), use_tqdm=False)


@pytest.fixture(scope="module")
def stock(checkpoint) -> dict:
    with engine(checkpoint) as llm:
        results = {"short": observe(llm, request("short")), "long": observe(llm, request("long"))}
        results["batch"] = mixed_batch(llm)
        results.update(media_requests(llm))
        return results


@pytest.fixture(scope="module")
def off(checkpoint) -> dict:
    overrides = {"architectures": ARCH, "prunevid": {"retention": 1.0}}
    with engine(checkpoint, hf_overrides=overrides) as llm:
        results = {"short": observe(llm, request("short")), "long": observe(llm, request("long"))}
        results["batch"] = mixed_batch(llm)
        return results


@pytest.fixture(scope="module")
def pruned(checkpoint) -> dict:
    # Chunks of 48 tokens split the short video's runs across prefill steps.
    overrides = {"architectures": ARCH, "prunevid": PRUNED}
    with engine(
        checkpoint,
        hf_overrides=overrides,
        enable_chunked_prefill=True,
        max_num_batched_tokens=48,
        block_size=32,
    ) as llm:
        # A budget below a token per time step: refused; the engine goes on serving.
        with pytest.raises(ValueError) as refused:
            llm.generate(request("short", retention=0.01), greedy(), use_tqdm=False)
        results = {"too_small": str(refused.value)}
        results.update(short=observe(llm, request("short")), long=observe(llm, request("long")))
        results["text"] = llm.generate({"prompt": TEXT_PROMPT}, greedy(), use_tqdm=False)[0]
        results["batch"] = mixed_batch(llm)
        # Twice the same long question: the second time the prefix cache holds the whole video.
        results["long_question"] = observe(llm, request("short", LONG_PROMPT))
        results["again"] = observe(llm, request("short", LONG_PROMPT))
        results.update(media_requests(llm))
        # Budgets per request: one alone, then three budgets in one batch.
        results["short_tenth"] = observe(llm, request("short", retention=TENTH))
        results["long_sixteenth"] = observe(llm, request("long", retention=0.0625))
        batch = [request("short", retention=TENTH), request("long"), request("long", retention=0.0625)]
        results["budget_batch"] = llm.generate(batch, greedy(), use_tqdm=False)
        return results


@pytest.fixture(scope="module")
def reference(checkpoint, stock, pruned, tmp_path_factory) -> dict:
    """Our transformers path's stage 1 (per_step_budget) on the same pixels and the stock prompt,
    in the main environment."""
    python = os.environ.get("PRUNEVID_REFERENCE_PYTHON")
    if not python:
        pytest.fail(
            "set PRUNEVID_REFERENCE_PYTHON to an interpreter of prunevid's main environment "
            "(transformers>=5.24), as .ci/vllm does"
        )
    folder = tmp_path_factory.mktemp("reference")
    results = {}
    cases = {"short": ("short", 0.25), "long": ("long", 0.25), "short_tenth": ("short", TENTH)}
    for name, (video_name, retention) in cases.items():
        seen = pruned[name]
        path, out = folder / f"{name}.pt", folder / f"{name}-out.pt"
        torch.save(
            {
                "input_ids": torch.tensor(stock[video_name]["out"].prompt_token_ids),
                "pixel_values_videos": seen["pixels"],
                "video_grid_thw": seen["mm"]["video_grid_thw"],
                "settings": {"retention": retention, "per_step_budget": True},
            },
            path,
        )
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
    assert len(stock[name]["deepstack"]) == 2
    for level, base in zip(off[name]["deepstack"], stock[name]["deepstack"], strict=True):
        torch.testing.assert_close(level, base, rtol=0, atol=0)
    assert answers([off[name]["out"]]) == answers([stock[name]["out"]])


def test_pruning_off_batch_is_stock_vllm(stock, off):
    assert answers(off["batch"]) == answers(stock["batch"])


# ---- pruned: each time step's run holds its share ------------------------------------------


def test_each_time_step_gets_its_literal_share(stock, pruned):
    assert runs(stock["short"]["out"].prompt_token_ids) == [64] * 4
    assert runs(pruned["short"]["out"].prompt_token_ids) == [16] * 4  # 0.25 * 256 = 64, 4 steps
    assert runs(stock["long"]["out"].prompt_token_ids) == [16] * 8
    assert runs(pruned["long"]["out"].prompt_token_ids) == [4] * 8  # 0.25 * 128 = 32, 8 steps
    assert runs(pruned["short_tenth"]["out"].prompt_token_ids) == [7, 7, 6, 6]  # round(25.6) = 26
    assert runs(pruned["long_sixteenth"]["out"].prompt_token_ids) == [1] * 8  # 0.0625 * 128 = 8
    for name in ("short", "long"):  # the timestamps and every other token as in stock vLLM
        ids = pruned[name]["out"].prompt_token_ids
        assert [i for i in ids if i != VIDEO_PAD] == [
            i for i in stock[name]["out"].prompt_token_ids if i != VIDEO_PAD
        ]


@pytest.mark.parametrize("name", ["short", "long", "short_tenth"])
def test_pruned_inputs_equal_the_transformers_path(pruned, reference, name):
    seen, expected = pruned[name], reference[name]
    torch.testing.assert_close(seen["vision"][:, :VISUAL_DIM], expected["features"], rtol=1e-4, atol=1e-5)
    assert torch.equal(seen["positions"], expected["positions"])
    torch.testing.assert_close(seen["embeds"], expected["embeds"], rtol=1e-4, atol=1e-5)
    assert len(seen["deepstack"]) == len(expected["deepstack"]) == 2
    for level, theirs in zip(seen["deepstack"], expected["deepstack"]):
        torch.testing.assert_close(level, theirs, rtol=1e-4, atol=1e-5)
    # The same, from tests/reference.py's logical prompt (neither the adapter nor `first_members`).
    assert torch.equal(seen["positions"], expected["logical_positions"])
    torch.testing.assert_close(seen["embeds"], expected["logical_embeds"], rtol=1e-4, atol=1e-5)
    for level, theirs in zip(seen["deepstack"], expected["logical_deepstack"]):
        torch.testing.assert_close(level, theirs, rtol=1e-4, atol=1e-5)


def test_merged_tokens_sit_at_their_first_members_positions_in_every_run(pruned, stock):
    """Stage 1 really merged: each run's tokens sit at positions of that step's grid, not at the
    first tokens of it, and the text after the video is where stock vLLM numbers it."""
    seen, base = pruned["short"], stock["short"]
    ids, stock_ids = torch.tensor(seen["out"].prompt_token_ids), torch.tensor(base["out"].prompt_token_ids)
    video, stock_video = ids == VIDEO_PAD, stock_ids == VIDEO_PAD
    spread = seen["positions"][1:, video].view(2, 4, 16)  # (h, w) of each step's 16 tokens
    stock_spread = base["positions"][1:, stock_video].view(2, 4, 64)
    for step in range(4):
        grid = set(map(tuple, stock_spread[:, step].T.tolist()))
        mine = list(map(tuple, spread[:, step].T.tolist()))
        assert set(mine) <= grid and len(set(mine)) == 16  # 16 distinct cells of that step's 8 x 8
        assert mine != sorted(grid)[:16]
    after, stock_after = int(video.nonzero()[-1]) + 1, int(stock_video.nonzero()[-1]) + 1
    assert torch.equal(seen["positions"][:, after:], base["positions"][:, stock_after:])


def test_stock_positions_of_vllm_and_transformers_agree(stock, reference):
    """Qwen3-VL numbers each run afresh (t offset 0), so the two engines agree on the whole prompt."""
    assert torch.equal(stock["short"]["positions"], reference["short"]["stock_positions"])
    assert torch.equal(stock["long"]["positions"], reference["long"]["stock_positions"])


def test_chunked_prefill_split_the_video(pruned):
    ids = pruned["short"]["out"].prompt_token_ids
    start, end = ids.index(VIDEO_PAD), len(ids) - ids[::-1].index(VIDEO_PAD)
    chunks = [48] * ((len(ids) - 1) // 48) + [len(ids) - 48 * ((len(ids) - 1) // 48)]
    assert pruned["short"]["calls"] == chunks + [1] * (NEW_TOKENS - 1)
    assert len(chunks) >= 2 and start < 48 < end  # the first split falls inside the video


def test_mixed_batch_gives_each_request_its_solo_answer(pruned):
    alone = answers([pruned["short"]["out"], pruned["long"]["out"], pruned["text"]])
    for (tokens, logprobs), (solo_tokens, solo_logprobs) in zip(answers(pruned["batch"]), alone):
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
    assert answers([again["out"]]) == answers([first["out"]])


# ---- a budget per request -------------------------------------------------------------------


def test_requests_with_different_budgets_in_one_batch_each_get_their_solo_answer(pruned):
    batch = pruned["budget_batch"]
    assert [runs(o.prompt_token_ids) for o in batch] == [[7, 7, 6, 6], [4] * 8, [1] * 8]
    alone = [pruned["short_tenth"]["out"], pruned["long"]["out"], pruned["long_sixteenth"]["out"]]
    assert [o.prompt_token_ids for o in batch] == [o.prompt_token_ids for o in alone]
    for (tokens, logprobs), (solo_tokens, solo_logprobs) in zip(answers(batch), answers(alone)):
        assert tokens == solo_tokens
        np.testing.assert_allclose(logprobs, solo_logprobs, atol=1e-4)


def test_a_budget_below_a_token_per_time_step_fails_its_request(pruned):
    assert pruned["too_small"] == (
        "a per-step budget needs a token per time step: retention 0.01 leaves 3 of 256 tokens for 4 time "
        "steps (raise the retention, or sample fewer frames)"
    )
    assert len(pruned["short"]["out"].outputs[0].token_ids) == NEW_TOKENS  # served after it


# ---- images beside the plugin: untouched -------------------------------------------------------


def test_an_image_only_prompt_with_the_plugin_is_stock_vllm(stock, pruned):
    seen, base = pruned["image"], stock["image"]
    assert seen["out"].prompt_token_ids == base["out"].prompt_token_ids
    assert seen["out"].prompt_token_ids.count(IMAGE_PAD) == 16
    assert torch.equal(seen["positions"], base["positions"])
    torch.testing.assert_close(seen["embeds"], base["embeds"], rtol=0, atol=0)
    for level, theirs in zip(seen["deepstack"], base["deepstack"], strict=True):
        torch.testing.assert_close(level, theirs, rtol=0, atol=0)
    assert answers([seen["out"]]) == answers([base["out"]])


def test_an_image_beside_a_pruned_video_is_untouched(stock, pruned):
    seen, base = pruned["image_video"], stock["image_video"]
    ids, stock_ids = torch.tensor(seen["out"].prompt_token_ids), torch.tensor(base["out"].prompt_token_ids)
    assert runs(ids.tolist()) == [16] * 4 and runs(stock_ids.tolist()) == [64] * 4
    image = (ids == IMAGE_PAD).nonzero().squeeze(1)  # the image comes first: the same rows in both
    assert torch.equal(image, (stock_ids == IMAGE_PAD).nonzero().squeeze(1)) and len(image) == 16
    torch.testing.assert_close(seen["embeds"][image], base["embeds"][image], rtol=0, atol=0)
    assert torch.equal(seen["positions"][:, image], base["positions"][:, image])
    for level, theirs in zip(seen["deepstack"], base["deepstack"], strict=True):
        torch.testing.assert_close(level[image], theirs[image], rtol=0, atol=0)
    # The video beside it is merged as when it comes alone, every token moved by the same offset.
    video, alone = ids == VIDEO_PAD, torch.tensor(pruned["short"]["out"].prompt_token_ids) == VIDEO_PAD
    torch.testing.assert_close(seen["embeds"][video], pruned["short"]["embeds"][alone], rtol=1e-5, atol=1e-6)
    moved = seen["positions"][:, video] - pruned["short"]["positions"][:, alone]
    assert moved.unique().numel() == 1 and int(moved[0, 0]) > 0
