"""PruneVid's vLLM plugin for LLaVA-OneVision inside vLLM (its CPU build), on a tiny random
LLaVA-OneVision checkpoint (`prunevid.testing.save_tiny_llava_onevision`: 112 px frames of 8 px
patches, 7 x 7 = 49 pooled tokens per frame, a newline after each video).

Needs vLLM: skipped elsewhere. Run with `bash .ci/vllm`, which sets PRUNEVID_REFERENCE_PYTHON to
the main environment's interpreter: tests/vllm_reference.py runs our transformers adapter's
stage 1 on the same pixels there. Engines run in this process, as in tests/test_vllm.py, whose
helpers these tests share. The checks:
* plugin on, pruning off (retention 1) == stock vLLM: prompt tokens, the embeddings and positions
  the language model receives, greedy tokens and log-probabilities, alone and in a batch;
* pruned: each video gets max(1, round(r * T * 49)) placeholders and the newline; the embeddings
  and positions the language model receives == the transformers adapter's stage 1 at the same
  retention and == tests/reference.py's logical prompt; chunked prefill splitting the video; a
  batch mixing two videos and a text-only request gives each its solo answer; a prefix-cache hit
  gives the same answer;
* a budget per request (mm_processor_kwargs), exact, equal to the transformers path at that
  retention, and solo == batched with three budgets in one batch; a bad one fails its request;
* images are untouched, alone or beside a pruned video;
* "prunevid" without the plugin's architecture, and --video-pruning-rate beside it, refuse to start;
* `vllm serve` answers an OpenAI chat request with a video as the in-process engine does.
"""

from __future__ import annotations

import gc
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
from test_vllm import (
    IMAGE,
    NEW_TOKENS,
    SERVE_MEDIA,
    _chat,
    _error_messages,
    _free_port,
    _serve,
    _wait_until_healthy,
    answers,
    chat_messages,
    greedy,
    prefill_inputs,
    take_log,
    video,
)
from test_vllm import engine as shared_engine
from vllm import LLM
from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

from prunevid.integrations import vllm as plugin
from prunevid.testing import save_tiny_llava_onevision, tiny_tokenizer

ARCH = [plugin.LLAVA_ARCHITECTURE]
PRUNED = {"retention": 0.25}
HALF = {"retention": 0.5}
PROMPT = "<|im_start|>user <video>\nwhat colour is the object ?<|im_end|><|im_start|>assistant\n"
LONG_PROMPT = PROMPT.replace(
    "what colour is the object ?",
    "what colour is the object that moves in the video , and where does it move from the first frame "
    "to the last frame ? describe the scene , the background and the small objects , and say which "
    "object appears first and which one disappears ?",
)
TEXT_PROMPT = "<|im_start|>user how many objects are there ?<|im_end|><|im_start|>assistant\n"
IMAGE_PROMPT = "<|im_start|>user how many objects are there ? <image>\n<|im_end|><|im_start|>assistant\n"
IMAGE_VIDEO_PROMPT = PROMPT.replace("<video>", "<image> <video>")
VIDEO = tiny_tokenizer().convert_tokens_to_ids("<video>")
IMAGE_TOKEN = tiny_tokenizer().convert_tokens_to_ids("<image>")
# 6 and 8 frames of 7 x 7 pooled tokens: 294 and 392 visual tokens (the newline comes on top).
VIDEOS = {"six": video(6, 112, 2.0), "eight": video(8, 160, 2.0, seed=2)}


def request(name: str, prompt: str = PROMPT, retention: float | None = None) -> dict:
    own = {} if retention is None else {"mm_processor_kwargs": {plugin.REQUEST_RETENTION: retention}}
    return {"prompt": prompt, "multi_modal_data": {"video": VIDEOS[name]}, **own}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return save_tiny_llava_onevision(str(tmp_path_factory.mktemp("tiny-llava-onevision")))


def engine(checkpoint: str, **options):
    """One in-process engine, instrumented: what `embed_multimodal` gets and the positions and
    embeddings of every language-model call."""
    return shared_engine(
        checkpoint, _instrument, **{"limit_mm_per_prompt": {"video": 1, "image": 1}, **options}
    )


def _instrument(model: torch.nn.Module) -> None:
    log = model.prunevid_log = {"mm": [], "lm": []}
    embed = model.embed_multimodal

    def embed_multimodal(**kwargs):
        log["mm"].append(
            {
                k: [x.clone() for x in v] if isinstance(v, list) else v.clone()
                for k, v in kwargs.items()
                if isinstance(v, torch.Tensor | list)
            }
        )
        return embed(**kwargs)

    model.embed_multimodal = embed_multimodal
    model.register_forward_pre_hook(
        lambda m, args, kw: log["lm"].append((kw["positions"][None].clone(), kw["inputs_embeds"].clone())),
        with_kwargs=True,
    )


def observe(llm: LLM, prompt: dict) -> dict:
    """One request alone: its output and what the model saw (positions (1, L), embeddings (L, C))."""
    take_log(llm)
    out = llm.generate(prompt, greedy(), use_tqdm=False)[0]
    log = take_log(llm)
    positions, embeds = prefill_inputs(log, len(out.prompt_token_ids) - (out.num_cached_tokens or 0))
    return {
        "out": out,
        "positions": positions[0],
        "embeds": embeds,
        "calls": [p.shape[1] for p, _ in log["lm"]],
        "mm": log["mm"][0] if log["mm"] else None,
    }


def mixed_batch(llm: LLM) -> list:
    return llm.generate([request("six"), request("eight"), {"prompt": TEXT_PROMPT}], greedy(), use_tqdm=False)


def media_requests(llm: LLM) -> dict:
    return {
        "image": observe(llm, {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": IMAGE}}),
        "image_video": observe(
            llm,
            {"prompt": IMAGE_VIDEO_PROMPT, "multi_modal_data": {"image": IMAGE, "video": VIDEOS["six"]}},
        ),
    }


@pytest.fixture(scope="module")
def stock(checkpoint) -> dict:
    with engine(checkpoint, media_io_kwargs=SERVE_MEDIA) as llm:
        results = {name: observe(llm, request(name)) for name in VIDEOS}
        results["batch"] = mixed_batch(llm)
        results.update(media_requests(llm))
        results["chat"] = llm.chat(chat_messages(), greedy(), use_tqdm=False)[0]
        return results


@pytest.fixture(scope="module")
def off(checkpoint) -> dict:
    with engine(checkpoint, hf_overrides={"architectures": ARCH, "prunevid": {"retention": 1.0}}) as llm:
        results = {name: observe(llm, request(name)) for name in VIDEOS}
        results["batch"] = mixed_batch(llm)
        return results


@pytest.fixture(scope="module")
def pruned(checkpoint) -> dict:
    # Chunks of 48 tokens split the six-frame video's 74 merged tokens across two steps.
    with engine(
        checkpoint,
        hf_overrides={"architectures": ARCH, "prunevid": PRUNED},
        enable_chunked_prefill=True,
        max_num_batched_tokens=48,
        block_size=32,
        media_io_kwargs=SERVE_MEDIA,
    ) as llm:
        with pytest.raises(ValueError) as refused:
            llm.generate(request("six", retention=1.5), greedy(), use_tqdm=False)
        results = {"bad_budget": str(refused.value)}
        results.update({name: observe(llm, request(name)) for name in VIDEOS})
        results["text"] = llm.generate({"prompt": TEXT_PROMPT}, greedy(), use_tqdm=False)[0]
        results["batch"] = mixed_batch(llm)
        results["long_question"] = observe(llm, request("six", LONG_PROMPT))
        results["again"] = observe(llm, request("six", LONG_PROMPT))
        results.update(media_requests(llm))
        results["six_half"] = observe(llm, request("six", retention=HALF["retention"]))
        batch = [
            request("six", retention=HALF["retention"]),
            request("eight"),
            request("eight", retention=0.125),
        ]
        results["budget_batch"] = llm.generate(batch, greedy(), use_tqdm=False)
        results["eight_eighth"] = observe(llm, request("eight", retention=0.125))
        results["chat"] = llm.chat(chat_messages(), greedy(), use_tqdm=False)[0]
        return results


@pytest.fixture(scope="module")
def reference(checkpoint, pruned, tmp_path_factory) -> dict:
    """Our transformers adapter's stage 1 on the same pixels, in the main environment."""
    python = os.environ.get("PRUNEVID_REFERENCE_PYTHON")
    if not python:
        pytest.fail(
            "set PRUNEVID_REFERENCE_PYTHON to an interpreter of prunevid's main environment "
            "(transformers>=5.24), as .ci/vllm does"
        )
    folder = tmp_path_factory.mktemp("reference")
    results = {}
    for name, settings in {"six": PRUNED, "eight": PRUNED, "six_half": HALF}.items():
        seen = pruned[name]
        pixels = seen["mm"]["pixel_values_videos"][0].unsqueeze(0)  # (1, T, 3, H, W): a list or a stack
        ids = torch.tensor(seen["out"].prompt_token_ids)
        full = pixels.shape[1] * 49 + 1  # one placeholder per pooled token, and the newline: as stock
        start, count = int((ids == VIDEO).nonzero()[0]), int((ids == VIDEO).sum())
        ids = torch.cat([ids[:start], torch.full((full,), VIDEO), ids[start + count :]])
        path, out = folder / f"{name}.pt", folder / f"{name}-out.pt"
        torch.save({"input_ids": ids, "pixel_values_videos": pixels, "settings": settings}, path)
        script = Path(__file__).parent / "vllm_reference.py"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PYTHONPATH"] = str(Path(__file__).parent.parent)
        subprocess.run(
            [python, str(script), checkpoint, str(path), str(out)], check=True, env=env, timeout=300
        )
        results[name] = torch.load(out)
    return results


# ---- plugin on, pruning off == stock ------------------------------------------------------


@pytest.mark.parametrize("name", list(VIDEOS))
def test_llava_pruning_off_is_stock_vllm(stock, off, name):
    assert off[name]["out"].prompt_token_ids == stock[name]["out"].prompt_token_ids
    assert torch.equal(off[name]["positions"], stock[name]["positions"])
    torch.testing.assert_close(off[name]["embeds"], stock[name]["embeds"], rtol=0, atol=0)
    assert answers([off[name]["out"]]) == answers([stock[name]["out"]])


def test_llava_pruning_off_batch_is_stock_vllm(stock, off):
    assert answers(off["batch"]) == answers(stock["batch"])


# ---- pruned == the transformers path's stage 1 ----------------------------------------------


def test_llava_video_gets_the_budgeted_count_and_its_newline(pruned, stock):
    # 6 x 49 = 294 tokens: round(73.5) = 74 (half to even); 8 x 49 = 392: 98. Stock: all, + 1.
    for name, (kept, whole) in {"six": (74, 294), "eight": (98, 392)}.items():
        ids = pruned[name]["out"].prompt_token_ids
        assert ids.count(VIDEO) == kept + 1
        assert stock[name]["out"].prompt_token_ids.count(VIDEO) == whole + 1
        assert [i for i in ids if i != VIDEO] == [
            i for i in stock[name]["out"].prompt_token_ids if i != VIDEO
        ]


@pytest.mark.parametrize("name", list(VIDEOS))
def test_llava_pruned_inputs_equal_the_transformers_path(pruned, reference, stock, name):
    seen, expected = pruned[name], reference[name]
    assert torch.equal(seen["positions"], expected["positions"])
    torch.testing.assert_close(seen["embeds"], expected["embeds"], rtol=1e-4, atol=1e-5)
    # The same, from tests/reference.py's logical prompt (written without the adapter).
    assert torch.equal(seen["positions"], expected["logical_positions"])
    torch.testing.assert_close(seen["embeds"], expected["logical_embeds"], rtol=1e-4, atol=1e-5)
    # 1-D RoPE: the shorter prompt is numbered afresh, as vLLM numbers any prompt.
    assert seen["positions"].tolist() == list(range(len(seen["out"].prompt_token_ids)))
    # The video's last row is the stock newline; the merged rows before it are not stock rows
    # (stage 1 averaged them), and the text around the video is the stock text.
    ids, stock_ids = (
        torch.tensor(seen["out"].prompt_token_ids),
        torch.tensor(stock[name]["out"].prompt_token_ids),
    )
    rows, stock_rows = (ids == VIDEO).nonzero().squeeze(1), (stock_ids == VIDEO).nonzero().squeeze(1)
    torch.testing.assert_close(
        seen["embeds"][rows[-1]], stock[name]["embeds"][stock_rows[-1]], rtol=0, atol=0
    )
    merged, whole = seen["embeds"][rows[:-1]], stock[name]["embeds"][stock_rows[:-1]]
    assert bool((torch.cdist(merged, whole).min(1).values > 1e-4).any())
    torch.testing.assert_close(
        seen["embeds"][: rows[0]], stock[name]["embeds"][: stock_rows[0]], rtol=0, atol=0
    )


def test_llava_chunked_prefill_split_the_video(pruned):
    ids = pruned["six"]["out"].prompt_token_ids
    start, end = ids.index(VIDEO), len(ids) - ids[::-1].index(VIDEO)
    assert pruned["six"]["calls"] == [48, len(ids) - 48] + [1] * (NEW_TOKENS - 1)
    assert start < 48 < end


def test_llava_mixed_batch_gives_each_request_its_solo_answer(pruned):
    alone = answers([pruned["six"]["out"], pruned["eight"]["out"], pruned["text"]])
    for (tokens, logprobs), (solo_tokens, solo_logprobs) in zip(answers(pruned["batch"]), alone):
        assert tokens == solo_tokens
        np.testing.assert_allclose(logprobs, solo_logprobs, atol=1e-4)


def test_llava_prefix_cache_hit_keeps_the_answer(pruned):
    first, again = pruned["long_question"], pruned["again"]
    ids = again["out"].prompt_token_ids
    assert again["out"].num_cached_tokens >= len(ids) - ids[::-1].index(VIDEO)  # the whole video
    assert again["mm"] is None  # not encoded again
    assert answers([again["out"]]) == answers([first["out"]])


# ---- a budget per request -------------------------------------------------------------------------


def test_llava_request_budget_is_exact_and_equals_the_transformers_path_at_that_retention(pruned, reference):
    seen, expected = pruned["six_half"], reference["six_half"]
    assert seen["out"].prompt_token_ids.count(VIDEO) == 147 + 1  # 0.5 * 294, and the newline
    assert torch.equal(seen["positions"], expected["positions"])
    torch.testing.assert_close(seen["embeds"], expected["embeds"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen["embeds"], expected["logical_embeds"], rtol=1e-4, atol=1e-5)


def test_llava_requests_with_different_budgets_in_one_batch_each_get_their_solo_answer(pruned):
    batch = pruned["budget_batch"]
    # 50% of 294, 25% of 392, 12.5% of 392 (each + the newline).
    assert [o.prompt_token_ids.count(VIDEO) for o in batch] == [148, 99, 50]
    alone = [pruned["six_half"]["out"], pruned["eight"]["out"], pruned["eight_eighth"]["out"]]
    assert [o.prompt_token_ids for o in batch] == [o.prompt_token_ids for o in alone]
    for (tokens, logprobs), (solo_tokens, solo_logprobs) in zip(answers(batch), answers(alone)):
        assert tokens == solo_tokens
        np.testing.assert_allclose(logprobs, solo_logprobs, atol=1e-4)


def test_llava_bad_request_budget_fails_that_request(pruned):
    assert pruned["bad_budget"] == "retention must be in (0, 1], got 1.5"


# ---- images: untouched -------------------------------------------------------------------------


def test_llava_image_only_prompt_with_the_plugin_is_stock_vllm(stock, pruned):
    seen, base = pruned["image"], stock["image"]
    assert seen["out"].prompt_token_ids == base["out"].prompt_token_ids
    assert seen["out"].prompt_token_ids.count(IMAGE_TOKEN) > 49
    assert torch.equal(seen["positions"], base["positions"])
    torch.testing.assert_close(seen["embeds"], base["embeds"], rtol=0, atol=0)
    assert answers([seen["out"]]) == answers([base["out"]])


def test_llava_image_beside_a_pruned_video_is_untouched(stock, pruned):
    seen, base = pruned["image_video"], stock["image_video"]
    ids, stock_ids = torch.tensor(seen["out"].prompt_token_ids), torch.tensor(base["out"].prompt_token_ids)
    assert int((ids == VIDEO).sum()) == 75 and int((stock_ids == VIDEO).sum()) == 295
    image = (ids == IMAGE_TOKEN).nonzero().squeeze(1)  # the image comes first: the same rows in both
    assert torch.equal(image, (stock_ids == IMAGE_TOKEN).nonzero().squeeze(1))
    torch.testing.assert_close(seen["embeds"][image], base["embeds"][image], rtol=0, atol=0)
    # The video beside it is merged as when it comes alone.
    alone = torch.tensor(pruned["six"]["out"].prompt_token_ids) == VIDEO
    torch.testing.assert_close(
        seen["embeds"][ids == VIDEO], pruned["six"]["embeds"][alone], rtol=1e-5, atol=1e-6
    )


# ---- refusals at start-up ----------------------------------------------------------------------


def _refused(checkpoint: str, **options) -> list[str]:
    try:
        with pytest.raises(Exception) as error, engine(checkpoint, **options):
            pass
    finally:
        gc.collect()
        cleanup_dist_env_and_memory()
    return _error_messages(error.value)


def test_llava_prunevid_settings_without_the_architecture_refuse_to_start(checkpoint):
    messages = _refused(checkpoint, hf_overrides={"prunevid": PRUNED})
    expected = (
        'hf_overrides "prunevid" does nothing on LlavaOnevisionForConditionalGeneration: add "architectures": '
        '["PruneVidLlavaOnevisionForConditionalGeneration"] to hf_overrides'
    )
    assert any(expected in m for m in messages)


def test_llava_vllm_video_pruning_rate_is_refused_beside_prunevid(checkpoint):
    messages = _refused(
        checkpoint, hf_overrides={"architectures": ARCH, "prunevid": PRUNED}, video_pruning_rate=0.5
    )
    assert any("PruneVid replaces vLLM's own video pruning" in m for m in messages)


# ---- vllm serve ------------------------------------------------------------------------------


def test_llava_vllm_serve_answers_a_chat_request_with_a_video(checkpoint, stock, pruned, tmp_path):
    """`vllm serve` (front-end and engine in separate processes) with the LLaVA-OneVision
    architecture: the served prompt and greedy tokens are the in-process engine's, a request's own
    budget is exact, and the start-up line is logged once."""
    port, log = _free_port(), tmp_path / "serve.log"
    server = _serve(checkpoint, PRUNED, port, log, plugin.LLAVA_ARCHITECTURE)
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
        half = _chat(port, {**body, "mm_processor_kwargs": {plugin.REQUEST_RETENTION: 0.5}})
    finally:
        server.terminate()
        server.wait(timeout=60)
    # The served video, 8 frames: 8 x 49 = 392 tokens and the newline in stock vLLM; 25%: 98 + 1.
    assert stock["chat"].prompt_token_ids.count(VIDEO) == 393
    assert reply["prompt_token_ids"].count(VIDEO) == 99
    assert reply["prompt_token_ids"] == pruned["chat"].prompt_token_ids
    assert reply["choices"][0]["token_ids"] == list(pruned["chat"].outputs[0].token_ids)
    assert half["prompt_token_ids"].count(VIDEO) == 197  # 0.5 x 392, and the newline
    said = [line for line in log.read_text().splitlines() if "PruneVid stage 1 on" in line]
    assert len(said) == 1, said
    assert said[0].endswith(
        "PruneVid stage 1 on PruneVidLlavaOnevisionForConditionalGeneration, retention 0.25"
    )
