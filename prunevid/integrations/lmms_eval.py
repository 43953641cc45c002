"""PruneVid as an lmms-eval model, without a fork of lmms-eval.

    pip install -e ".[eval]"      # registers `prunevid` through the `lmms_eval.models` entry point
    accelerate launch -m lmms_eval --model prunevid \
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,alpha=0.4 --tasks mvbench

`--model_args` take the checkpoint (`pretrained`: Hub id, local folder or "tiny"; any family
`prunevid.patch` supports), every `PruneVidConfig` knob (stage1, stage2, tau, ..., num_frames;
defaults: the model's preset; `retention=0.1` asks for exactly 10% of the visual tokens),
`method` (prunevid, or a baseline of `prunevid.baselines.METHODS` such as fastv or evs, at the
same `retention`) and `prune=false` for the full-model baseline (the stock model, unpatched).
Data parallel: every process holds the whole model and answers its share of the
documents (lmms-eval splits them).

Each request is one video (sampled to `num_frames`) and the task's text as the question, in the
model family's prompt, exactly as `prunevid.pipeline.answer` builds it; the samples file gets,
per request, the token counts of each stage, the timings from the pruning trace and the
process rank under `token_counts[i]["prunevid"]`.

Multiple-choice (`loglikelihood`) scoring prefills the prompt alone, so that stage 2 is guided by
the question only (as when generating), then scores the continuation on the pruned cache: the
value returned is its negative log-likelihood, summed over its tokens, because lmms-eval's
multiple-choice metric takes the argmin (the most likely choice).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from tqdm import tqdm

from ..api import last_trace, patch, unpatch
from ..config import PruneVidConfig
from ..lru import ByteLRU, cache_bytes
from ..pipeline import DEFAULT_MODEL, LoadedModel, encode_video, load_model, model_inputs, preset
from ..video import load_video

KNOBS = frozenset(f.name for f in dataclasses.fields(PruneVidConfig))
VIDEO, IMAGE = "<video>", "<image>"
MAX_ROUNDS = 64

# (round index, the answers so far, the task's round info, the last round's video)
#   -> (prompt, video, terminal, the answers so far, round info)
NextRound = Callable[[int, list[str], Any, str], tuple[str | None, str | None, bool, list[str], Any]]


@dataclasses.dataclass
class PruneVidTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts, plus what PruneVid did (written to the samples file)."""

    prunevid: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "prunevid": self.prunevid}


class PruneVid(lmms):
    """lmms-eval model `prunevid` (simple: task text + `doc_to_visual`)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        prune: bool = True,
        method: str = "prunevid",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int = 256,
        video_cache: int = 2,
        max_batch_size: int | None = None,
        **knobs: Any,
    ) -> None:
        super().__init__()
        _check_arguments(knobs, batch_size)
        self.accelerator = Accelerator()
        self._device = _device(device, self.accelerator)
        self.loaded: LoadedModel = load_model(str(pretrained), dtype=_dtype(dtype), device=str(self._device))
        self.config = preset(self.loaded.name, self.loaded.num_layers).replace(**knobs)
        self.prune = bool(prune)
        self.max_new_tokens = int(max_new_tokens)
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        # The last `video_cache` videos (multiple-choice options share theirs), within PRUNEVID_CACHE_MB.
        self._videos = ByteLRU(cache_bytes(), max_items=int(video_cache))
        self.method = str(method)
        if self.prune:
            patch(self.model, self.config, self.method)
        else:
            unpatch(self.model)

    # ---- what lmms-eval reads --------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return 1

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        return [self._generate_request(*r.args) for r in self._progress(requests)]

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        # A GenerationResult around the (value, is_greedy) pair: lmms-eval 0.7.3 turns a bare
        # tuple into its string, and the wrapper also carries the per-request trace.
        return [self._loglikelihood_request(*r.args) for r in self._progress(requests)]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[GenerationResult]:
        return [self._multi_round_request(*r.args) for r in self._progress(requests)]

    # ---- requests ----------------------------------------------------------------------------

    def _generate_request(
        self, context: str, gen_kwargs: dict, doc_to_visual: Callable, doc_id: int, task: str, split: str
    ) -> GenerationResult:
        doc = self.task_dict[task][split][doc_id]
        return self.respond(question_text(context), one_video(doc_to_visual(doc)), gen_kwargs)

    def _loglikelihood_request(
        self,
        context: str,
        continuation: str | Callable,
        doc_to_visual: Callable,
        doc_id: int,
        task: str,
        split: str,
    ) -> GenerationResult:
        doc = self.task_dict[task][split][doc_id]
        if callable(continuation):
            continuation = continuation(doc)
        return self.score(question_text(context), str(continuation), one_video(doc_to_visual(doc)))

    def _multi_round_request(
        self,
        context: str,
        gen_kwargs: dict,
        doc_to_visual: Callable,
        doc_to_text: Callable,
        doc_id: int,
        task: str,
        split: str,
    ) -> GenerationResult:
        doc = self.task_dict[task][split][doc_id]

        def next_round(index: int, answers: list[str], info: Any, video: str):
            visuals, text, terminal, answers, info = doc_to_text(
                doc, previous_output=answers, round_idx=index, previous_round_info=info
            )
            video = one_video(visuals) if visuals else video
            return None if terminal else question_text(text), video, terminal, answers, info

        first = question_text(context), one_video(doc_to_visual(doc))
        return self.rounds(first, next_round, gen_kwargs)

    # ---- the model ---------------------------------------------------------------------------

    @torch.no_grad()
    def respond(self, question: str, video: str, gen_kwargs: dict) -> GenerationResult:
        """Generate the answer to `question` about `video` (the family's prompt around it)."""
        settings = generation_settings(gen_kwargs, self.max_new_tokens)
        inputs, features, vision_s = self.inputs(question, video)
        tic = time.perf_counter()
        out = self.model.generate(**inputs, mm_encoder_outputs={"video": features}, **settings)
        generate_s = time.perf_counter() - tic
        prompt_len = inputs["input_ids"].shape[1]
        new = out[0, prompt_len:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        text = cut_at(text, gen_kwargs.get("until")).strip()
        log = self.trace_log(inputs, vision_s=vision_s, generate_s=generate_s)
        counts = PruneVidTokenCounts(input_tokens=prompt_len, output_tokens=int(new.numel()), prunevid=log)
        return GenerationResult(text=text, token_counts=counts)

    @torch.no_grad()
    def score(self, question: str, continuation: str, video: str) -> GenerationResult:
        """(negative log-likelihood of `continuation` as the answer, whether greedy decoding
        would produce it), wrapped with the trace. The prompt alone is prefilled (and pruned);
        the continuation then runs on that cache."""
        inputs, features, vision_s = self.inputs(question, video)
        target = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if target.shape[1] == 0:
            raise ValueError(f"the continuation {continuation!r} has no tokens to score")
        target = target.to(self.device)
        tic = time.perf_counter()
        logits = self.continuation_logits(inputs, features, target)
        score_s = time.perf_counter() - tic
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        total = float(logprobs.gather(1, target[0, :, None]).sum())
        greedy = bool((logits.argmax(-1) == target[0]).all())
        log = self.trace_log(inputs, vision_s=vision_s, score_s=score_s, continuation_tokens=target.shape[1])
        counts = PruneVidTokenCounts(
            input_tokens=inputs["input_ids"].shape[1] + target.shape[1], prunevid=log
        )
        return GenerationResult(text=(-total, greedy), token_counts=counts)

    def continuation_logits(self, inputs: dict, features: Any, target: torch.Tensor) -> torch.Tensor:
        """(n, V) logits predicting the n tokens `target` (1, n) after the prompt `inputs`.

        Pruned: the prompt is prefilled alone (stage 2 sees only the question), then the
        continuation runs on its cache. Stock model: one forward over prompt + continuation."""
        encoded = {"video": features}
        if not self.prune:
            length = inputs["input_ids"].shape[1]
            whole = {key: _extend(key, value, target, length) for key, value in inputs.items()}
            logits = self.model(**whole, mm_encoder_outputs=encoded, use_cache=False).logits[0]
            return logits[-target.shape[1] - 1 : -1]
        first = self.model(**inputs, mm_encoder_outputs=encoded, use_cache=True, logits_to_keep=1)
        logits = [first.logits[0, -1:]]
        if target.shape[1] > 1:
            rest = target[:, :-1]
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(rest)], dim=1)
            logits.append(self.model(input_ids=rest, attention_mask=mask, cache=first.cache).logits[0])
        return torch.cat(logits)

    def rounds(self, first: tuple[str, str], next_round: NextRound, gen_kwargs: dict) -> GenerationResult:
        """Answer round after round (each question on its own, as the task phrases it) until
        the task says stop; a round without a video is about the previous round's video."""
        (question, video), answers, info, logs = first, [], None, []
        for index in range(MAX_ROUNDS + 1):
            if index > 0:
                question, video, terminal, answers, info = next_round(index, answers, info, video)
                answers = list(answers or [])
                if terminal:
                    counts = PruneVidTokenCounts(prunevid={"rounds": logs})
                    return GenerationResult(text=answers, token_counts=counts)
            result = self.respond(question, video, gen_kwargs)
            answers.append(result.text)
            logs.append(result.token_counts.to_dict())
        raise RuntimeError(f"the task asked for more than {MAX_ROUNDS} rounds")

    def inputs(self, question: str, video: str) -> tuple[dict[str, torch.Tensor], Any, float]:
        """The model inputs for `question` about `video` (built by the model family, as
        `prunevid.pipeline.answer` does; no pixels), the video's vision-tower output and the
        seconds spent on it (0 when cached: multiple-choice options share their video)."""
        frames, features, vision_s = self.video(video)
        inputs = model_inputs(self.loaded, frames, question)
        del inputs["pixel_values_videos"]
        return inputs, features, vision_s

    def video(self, video: str) -> tuple[np.ndarray, Any, float]:
        """The sampled frames of `video`, the vision tower's output on them, and the seconds spent
        (0 when they come from the small cache of the last videos)."""
        key = (os.fspath(video), self.config.num_frames)
        cached = self._videos.get(key)
        if cached is not None:
            return (*cached, 0.0)
        tic = time.perf_counter()
        frames = load_video(video, self.config.num_frames).frames
        features = encode_video(self.loaded, frames)
        self._videos.put(key, (frames, features))
        return frames, features, time.perf_counter() - tic

    def trace_log(self, inputs: dict[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
        """Visual token counts after each stage, their timings and `extra`, for the samples file.
        Unpruned, every count is the prompt's video placeholder tokens."""
        placeholders = int((inputs["input_ids"] == self.model.config.video_token_id).sum())
        if self.prune:
            trace = last_trace(self.model)
            counts = (trace.num_visual_tokens, trace.num_after_stage1, trace.num_after_stage2)
            timings = dict(trace.timings)
        else:
            counts, timings = (placeholders,) * 3, {}
        log = dict(zip(("visual_tokens", "after_stage1", "after_stage2"), counts))
        log["retention"] = counts[2] / counts[0]
        return {
            "prune": self.prune,
            "method": self.method if self.prune else None,
            "retention_target": self.config.retention if self.prune else None,
            "rank": self.rank,
            "video_placeholders": placeholders,
            **log,
            **timings,
            **extra,
        }

    def _progress(self, requests: list[Instance]) -> Iterable[Instance]:
        return tqdm(requests, disable=self.rank != 0, desc="PruneVid")


class PruneVidChat(PruneVid):
    """lmms-eval model `prunevid` (chat: the task's `doc_to_messages`)."""

    is_simple = False

    def _generate_request(
        self, context: str, doc_to_messages: Callable, gen_kwargs: dict, doc_id: int, task: str, split: str
    ) -> GenerationResult:
        doc = self.task_dict[task][split][doc_id]
        return self.respond(*chat_question(doc_to_messages(doc)), gen_kwargs)

    def _multi_round_request(
        self, context: str, doc_to_messages: Callable, gen_kwargs: dict, doc_id: int, task: str, split: str
    ) -> GenerationResult:
        doc = self.task_dict[task][split][doc_id]

        def next_round(index: int, answers: list[str], info: Any, video: str):
            messages, terminal, answers, info = doc_to_messages(
                doc, round_idx=index, previous_output=answers, previous_round_info=info
            )
            if terminal:
                return None, None, True, answers, info
            return *chat_question(messages, fallback_video=video), False, answers, info

        return self.rounds(chat_question(doc_to_messages(doc)), next_round, gen_kwargs)


# ---- prompts and settings (pure functions) ---------------------------------------------------


def question_text(text: str) -> str:
    """A task's text as the question: the model family's prompt places the video itself, so
    placeholders the task may have written are dropped."""
    return text.replace(VIDEO, "").replace(IMAGE, "").strip()


def chat_question(messages: list[dict], fallback_video: str | None = None) -> tuple[str, str]:
    """(question, video path) from lmms-eval chat messages: one user turn holding one video
    (or none, then it is about `fallback_video`) and text."""
    from lmms_eval.protocol import ChatMessages

    turns = ChatMessages(messages=messages).messages
    if [turn.role for turn in turns] != ["user"]:
        raise ValueError(
            "PruneVid's lmms-eval model answers a single user turn (no system or assistant turns)"
        )
    texts, videos = [], []
    for content in turns[0].content:
        if content.type == "text":
            texts.append(content.text)
        elif content.type == "video":
            videos.append(_video_path(content.url))
        else:
            raise ValueError(f"PruneVid's lmms-eval model takes video and text, not {content.type}")
    if not videos and fallback_video is not None:
        videos.append(fallback_video)
    if len(videos) != 1:
        raise ValueError(f"PruneVid's lmms-eval model needs exactly one video per prompt, got {len(videos)}")
    return question_text("\n".join(texts)), videos[0]


def one_video(visuals: Any) -> str:
    """The single video path of a request (lmms-eval gives a list of paths for video tasks)."""
    items = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
    if len(items) != 1:
        raise ValueError(f"PruneVid's lmms-eval model needs exactly one video per prompt, got {len(items)}")
    return _video_path(items[0])


def _video_path(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, dict) and not {"video_start", "video_end"} & set(item):
        path = item.get("video") or item.get("url") or item.get("path")
        if isinstance(path, str):
            return path
    raise ValueError(f"PruneVid's lmms-eval model takes a video file path, not {type(item).__name__}")


def generation_settings(gen_kwargs: dict, default_max_new_tokens: int) -> dict[str, Any]:
    """generate() arguments from a task's generation_kwargs: greedy unless temperature > 0
    (lmms-eval's convention); beam search is not supported with a pruned cache."""
    if int(gen_kwargs.get("num_beams") or 1) != 1:
        raise ValueError("PruneVid's lmms-eval model decodes greedily or by sampling: num_beams must be 1")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    settings: dict[str, Any] = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        settings["temperature"] = temperature
        if gen_kwargs.get("top_p") is not None:
            settings["top_p"] = float(gen_kwargs["top_p"])
    return settings


def cut_at(text: str, until: str | list[str] | None) -> str:
    """`text` up to the first of the stop strings `until`."""
    stops = [until] if isinstance(until, str) else list(until or [])
    ends = [text.find(stop) for stop in stops if stop and stop in text]
    return text[: min(ends)] if ends else text


def _check_arguments(knobs: dict[str, Any], batch_size: int | str) -> None:
    unknown = sorted(set(knobs) - KNOBS)
    if unknown:
        raise ValueError(
            f"unknown prunevid model_args: {', '.join(unknown)} (known: pretrained, prune, method, device, dtype, "
            f"batch_size, max_new_tokens, video_cache and the PruneVidConfig fields {', '.join(sorted(KNOBS))})"
        )
    if str(batch_size) != "1":
        raise ValueError(
            f"PruneVid's lmms-eval model answers one request at a time: batch_size must be 1, got {batch_size}"
        )


def _device(requested: str | None, accelerator: Accelerator) -> torch.device:
    """One device per process when data-parallel; else the requested one, or CUDA when present."""
    if accelerator.num_processes > 1:
        return accelerator.device
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(name: str | torch.dtype) -> str | torch.dtype:
    if isinstance(name, torch.dtype) or name == "auto":
        return name
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be auto or a torch dtype name such as bfloat16, got {name!r}")
    return value


def _extend(key: str, value: torch.Tensor, target: torch.Tensor, length: int) -> torch.Tensor:
    """A per-token model input (1, `length`) continued over the text tokens `target` (1, n): the
    ids themselves, 1 in the attention mask, 0 (text) in any other per-token input; other
    inputs (e.g. video grids) unchanged."""
    if key == "input_ids":
        return torch.cat([value, target], dim=1)
    if value.shape != (1, length):
        return value
    fill = torch.ones_like(target) if key == "attention_mask" else torch.zeros_like(target)
    return torch.cat([value, fill.to(value.dtype)], dim=1)
