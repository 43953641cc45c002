"""PruneVid stage 1 as a vLLM plugin for Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision, without a fork.

    pip install "prunevid[vllm]"     # the entry point `vllm.general_plugins` runs `register`
    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --hf-overrides \\
        '{"architectures": ["PruneVidQwen2_5_VLForConditionalGeneration"], "prunevid": {"retention": 0.25}}'

`register` adds the architecture `ARCHITECTURE` (a subclass of vLLM's Qwen2.5-VL model and of its
multimodal processor, `vllm_qwen.py`), `QWEN3_ARCHITECTURE` (Qwen3-VL's, `vllm_qwen3.py`) and
`LLAVA_ARCHITECTURE` (LLaVA-OneVision's, `vllm_llava.py`); the checkpoint is pointed at one with
`hf_overrides`, whose `prunevid` mapping holds the settings (`SETTINGS`; `retention` is
required). A request may set its own retention in `mm_processor_kwargs` (`REQUEST_RETENTION`).
On a vLLM outside `SUPPORTED_VLLM`, `register` registers nothing and logs why; `VLLM_NAMES` lists every vLLM name the plugin relies on.
`ConfigHook` runs in vLLM's front-end: it validates the settings, turns vLLM's video pruning path
on in the config every process receives, and logs the start-up line.

How it fits vLLM. vLLM fixes each video's placeholder count in the front-end, before the vision
tower runs, so only stage 1 in budget mode can run there: a video of T time steps of N merged
patches gets exactly `budget.stage1_count(T * N)` placeholders (`video_token_count`), a function
of the grid and the settings. After the vision tower, `merged_video` runs stage 1 on the (T, N, C)
tokens; which tokens merge, their values and their (t, h, w) positions depend on the content, so
the positions travel with the embeddings as extra channels, the mechanism vLLM's own video
pruning (EVS) uses: its model runner hands the channels to the model's
`recompute_mrope_positions`, which strips them and rewrites the prompt's M-RoPE positions. Each
merged token takes its first member's stock position, and the text after a video continues
where it would without pruning (`grid_positions`' extent), as the transformers adapter does.
Positions travel in the model dtype, where bf16 holds integers exactly only up to 256, so each
is sent as two base-256 digits (`encode_positions`), exact up to 65,535 in bf16, fp16 and fp32.

LLaVA-OneVision numbers its prompt with 1-D RoPE: vLLM numbers the shorter prompt 0, 1, 2, ...
exactly as the transformers adapter renumbers it, so nothing travels but the tokens. Its videos
get `visual_token_count` placeholders and the trailing newline, and `merged_llava_video` runs
stage 1 on the pooled frame grids, with no position channels and vLLM's pruning path off
(`LlavaConfigHook`).

Qwen3-VL writes a video as one run of placeholders per time step, each after its timestamp, and
numbers each run afresh from its start. Its runs' lengths are fixed in the front-end too, so the
plugin gives every time step a fixed share of the budget (`qwen3_settings`: `per_step_budget`;
`step_quotas`), which stage 1 then meets step by step for any content (`merged_qwen3_video`). The
text's positions follow from the layout alone (`prompt_positions`, each run as a media item); a
merged token's channels carry its first member's position relative to its run's start, which
`place_media_positions` adds to the run's start once the video is encoded.

Stage 2 is not here: it needs the question inside the language model and would make the cached
prefix of a video depend on the question, defeating prefix caching.

This module imports vLLM only inside `register`, so its pure functions are tested without it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from packaging.version import Version

from ..budget import stage1_count, step_counts
from ..cluster import cluster_means
from ..config import PruneVidConfig
from ..merge import merge_tokens

ARCHITECTURE = "PruneVidQwen2_5_VLForConditionalGeneration"
MODEL_CLASS = "prunevid.integrations.vllm_qwen:PruneVidQwen2_5_VLForConditionalGeneration"
# LLaVA-OneVision (1-D RoPE: no position channels, vLLM's pruning path stays off; `vllm_llava.py`).
LLAVA_ARCHITECTURE = "PruneVidLlavaOnevisionForConditionalGeneration"
LLAVA_MODEL_CLASS = "prunevid.integrations.vllm_llava:PruneVidLlavaOnevisionForConditionalGeneration"
# Qwen3-VL (one placeholder run per time step, each of a fixed share of the budget; `vllm_qwen3.py`).
QWEN3_ARCHITECTURE = "PruneVidQwen3VLForConditionalGeneration"
QWEN3_MODEL_CLASS = "prunevid.integrations.vllm_qwen3:PruneVidQwen3VLForConditionalGeneration"
MODELS = {
    ARCHITECTURE: MODEL_CLASS,
    LLAVA_ARCHITECTURE: LLAVA_MODEL_CLASS,
    QWEN3_ARCHITECTURE: QWEN3_MODEL_CLASS,
}
# hf_overrides {"prunevid": {...}}: the stage-1 knobs (the others are stage 2's or frame sampling,
# which vLLM's media loader does: --media-io-kwargs '{"video": {"num_frames": 16}}').
SETTINGS = ("retention", "stage1", "tau", "temporal_segment_ratio", "k", "dpc_noise", "seed", "centre")
BASE = 256  # each position goes as two digits of this base: exact in bf16 (8 significant bits)
POSITION_VALUES = 4  # t, h, w and the extent (where the text after the media continues)
CHANNELS = 2 * POSITION_VALUES
# The vLLM releases the plugin is tested on (pyproject's `vllm` extra says the same).
SUPPORTED_VLLM = (Version("0.32"), Version("0.33"))  # [low, high)
# Every vLLM name the plugin touches beyond `vllm.ModelRegistry` and `MULTIMODAL_REGISTRY`
# ("module:attribute.attribute"), private or moved between releases: tests/test_vllm.py imports each.
VLLM_NAMES = (
    "vllm.platforms:current_platform.is_cpu",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration._postprocess_video_embeds_evs",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration._postprocess_image_embeds_evs",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration.iter_mm_grid_thw",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLMultiModalProcessor._get_prompt_updates",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLMultiModalProcessor._call_hf_processor",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLMultiModalProcessor._postprocess_hf_mm_data",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLMultiModalProcessor._get_mm_fields_config",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration.embed_multimodal",
    "vllm.multimodal.inputs:MultiModalFieldConfig.batched",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLProcessingInfo",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLDummyInputsBuilder",
    "vllm.multimodal.processing:PromptReplacement",
    "vllm.multimodal.video_prune.evs:recompute_mrope_positions",
    "vllm.model_executor.models.interfaces:supports_multimodal_pruning",
    "vllm.v1.worker.cpu_model_runner:CPUModelRunner.load_model",
    "vllm.model_executor.models.config:MODELS_CONFIG_MAP",
    "vllm.config:VllmConfig.try_verify_and_update_config",
    "vllm.config.multimodal:MultiModalConfig.video_pruning_rate",
    "vllm.model_executor.models.llava_onevision:LlavaOnevisionForConditionalGeneration._process_video_pixels",
    "vllm.model_executor.models.llava_onevision:LlavaOnevisionForConditionalGeneration.embed_multimodal",
    "vllm.model_executor.models.llava_onevision:LlavaOnevisionMultiModalProcessor._apply_hf_processor_main",
    "vllm.model_executor.models.llava_onevision:LlavaOnevisionMultiModalProcessor._get_prompt_updates",
    "vllm.model_executor.models.llava_onevision:LlavaOnevisionMultiModalProcessor._get_mm_fields_config",
    "vllm.model_executor.models.llava_onevision:LlavaOnevisionProcessingInfo._get_num_frame_tokens",
    "vllm.model_executor.models.llava_onevision:LlavaOnevisionDummyInputsBuilder",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration._postprocess_video_embeds_evs",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration._postprocess_image_embeds_evs",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration.get_mrope_input_positions",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration.recompute_mrope_positions",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration.embed_multimodal",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLMultiModalProcessor._apply_hf_processor_main",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLMultiModalProcessor._get_prompt_updates",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLMultiModalProcessor._get_mm_fields_config",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLMultiModalProcessor.get_video_repl",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLProcessingInfo",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLDummyInputsBuilder",
)
# vLLM's loggers write to vLLM's handlers; a child of "vllm" shows where vLLM's own lines do.
logger = logging.getLogger("vllm.prunevid")


def register() -> None:
    """The `vllm.general_plugins` entry point: runs in every vLLM process. vLLM does not catch a
    plugin's exception, so on a vLLM the plugin was not tested on, or one whose names moved, it
    registers nothing and logs why: every vLLM command keeps working with prunevid installed."""
    import vllm

    refusal = unsupported(getattr(vllm, "__version__", "unknown"))
    if refusal:
        logger.warning(refusal)
        return
    try:
        from vllm import ModelRegistry
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            from vllm.model_executor.models.interfaces import supports_multimodal_pruning
            from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except (ImportError, AttributeError) as error:
        logger.warning("PruneVid's vLLM plugin is off: vLLM %s lacks %s", vllm.__version__, error)
        return
    for architecture, model_class in MODELS.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, model_class)
    # vLLM runs an architecture's config hook in the front-end, on the config every process gets.
    MODELS_CONFIG_MAP[ARCHITECTURE] = ConfigHook
    MODELS_CONFIG_MAP[LLAVA_ARCHITECTURE] = LlavaConfigHook
    MODELS_CONFIG_MAP[QWEN3_ARCHITECTURE] = ConfigHook
    for architecture in STOCK_ARCHITECTURES:
        MODELS_CONFIG_MAP.setdefault(architecture, UnpluggedHook)
    if on_cpu:
        _enable_pruning_on_cpu(CPUModelRunner, supports_multimodal_pruning)
        CPUModelRunner.load_model.every_model = os.environ.get(EVS_ON_CPU) == "1"


# Checkpoints someone may give "prunevid" settings to without the plugin's architecture, and the
# plugin's architecture to name instead (Qwen2.5-VL's for Qwen2-VL; none for Qwen3-VL's MoE, whose
# language model no plugin class builds).
STOCK_ARCHITECTURES = {
    "Qwen2_5_VLForConditionalGeneration": ARCHITECTURE,
    "Qwen2VLForConditionalGeneration": ARCHITECTURE,
    "Qwen3VLForConditionalGeneration": QWEN3_ARCHITECTURE,
    "Qwen3VLMoeForConditionalGeneration": None,
    "LlavaOnevisionForConditionalGeneration": LLAVA_ARCHITECTURE,
}


def configure(vllm_config, positions: bool = True) -> None:
    """The plugin's architecture in vLLM's front-end, before any other process starts: validates
    the settings (a bad one stops start-up with one sentence), turns on vLLM's video pruning path
    in the config every process receives (`video_pruning_rate` = 1 - retention; vLLM's runners
    strip the position channels and rewrite positions only while it is above 0, its schedulers
    and compile cache read it too), and logs what runs. With `positions` False (a 1-D RoPE
    model, LLaVA-OneVision: nothing to rewrite) the pruning path stays off."""
    model_config = vllm_config.model_config
    config = settings(getattr(model_config.hf_config, "prunevid", None))
    multimodal = model_config.multimodal_config
    rate = 1 - config.retention if prunes(config) and positions else None
    if multimodal.video_pruning_rate and multimodal.video_pruning_rate != rate:
        raise ValueError(
            "PruneVid replaces vLLM's own video pruning: leave out --video-pruning-rate "
            'and set hf_overrides {"prunevid": {"retention": ...}}'
        )
    multimodal.video_pruning_rate = rate
    state = "" if prunes(config) else " (keeps every token: stock vLLM)"
    logger.info("PruneVid stage 1 on %s, retention %s%s", model_config.architecture, config.retention, state)


def refuse_unplugged(vllm_config) -> None:
    """A stock architecture given "prunevid" settings would prune nothing and say nothing: refuse."""
    model_config = vllm_config.model_config
    if getattr(model_config.hf_config, "prunevid", None) is not None:
        ours = STOCK_ARCHITECTURES.get(model_config.architecture, ARCHITECTURE)
        fix = (
            f'add "architectures": ["{ours}"] to hf_overrides'
            if ours
            else "the plugin has no class for it yet"
        )
        raise ValueError(
            f'hf_overrides "prunevid" does nothing on {model_config.architecture}: {fix} (PruneVid runs in '
            "vLLM on Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision checkpoints)"
        )


class ConfigHook:
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`'s interface) for the plugin's one."""

    verify_and_update_config = staticmethod(configure)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return


class LlavaConfigHook(ConfigHook):
    """The hook for LLaVA-OneVision: settings validated and the start-up line, vLLM's pruning
    path off (its positions are 1-D: the prompt's own numbering is already the pruned one)."""

    verify_and_update_config = staticmethod(functools.partial(configure, positions=False))


class UnpluggedHook(ConfigHook):
    """The hook for `STOCK_ARCHITECTURES` (only where vLLM has none of its own)."""

    verify_and_update_config = staticmethod(refuse_unplugged)


def unsupported(version: str) -> str | None:
    """Why the plugin stays off on vLLM `version` (one line), or None on a tested release."""
    low, high = SUPPORTED_VLLM
    try:
        tested = low <= Version(Version(version).base_version) < high
    except ValueError:
        tested = False
    if tested:
        return None
    return (
        f"PruneVid's vLLM plugin is off: it is tested on vLLM >={low},<{high} and this is vLLM {version} "
        "(install a tested vLLM, or a prunevid release that supports this one)"
    )


def settings(values: Mapping | None) -> PruneVidConfig:
    """The PruneVid settings of `hf_overrides["prunevid"]`, validated (one sentence on error)."""
    if values is not None and not isinstance(values, Mapping):
        raise ValueError(f'hf_overrides "prunevid" must be a mapping of settings, got {values!r}')
    values = dict(values or {})
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise ValueError(
            f"PruneVid's vLLM plugin has no setting {', '.join(map(repr, unknown))} (it runs stage 1 only; "
            f"settings: {', '.join(SETTINGS)})"
        )
    if values.get("retention") is None:
        raise ValueError(
            'PruneVid in vLLM needs a retention in (0, 1], e.g. hf_overrides {"prunevid": {"retention": 0.25}}, '
            "because vLLM fixes each video's token count before encoding it"
        )
    return PruneVidConfig(**values, stage2=False)


# A request's own retention, in its `mm_processor_kwargs` (OpenAI API: `extra_body`).
REQUEST_RETENTION = "prunevid_retention"


class RetentionField:
    """Mixin for the plugin's multimodal processors: a video's request retention, when its
    processing set one, travels to the model as a per-video field kept on the host."""

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if REQUEST_RETENTION in hf_inputs:
            fields[REQUEST_RETENTION] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        return fields


def with_request_retention(processed, videos: str, engine: PruneVidConfig, retention: float | None):
    """A processor's output with its request's retention (validated: a bad one fails this request
    in the front-end) for each of its videos, counted by the field `videos`, where the engine
    prunes (else the stock fields). In float64: float32 would turn 0.01 into 0.0099999998 (in
    messages) and could move round(r * N) where r * N ends in .5."""
    config = request_settings(engine, retention)
    if videos in processed and prunes(engine):
        processed[REQUEST_RETENTION] = torch.full(
            (len(processed[videos]),), config.retention, dtype=torch.float64
        )
    return processed


class RequestRetentions:
    """Mixin for the plugin's models: `video_retentions`, each video's request retention (a host
    field, or None), taken from `embed_multimodal`'s inputs before vLLM's input schema drops it."""

    video_retentions: list[float] | None = None

    def embed_multimodal(self, **kwargs):
        retentions = kwargs.pop(REQUEST_RETENTION, None)
        self.video_retentions = None if retentions is None else [float(r) for r in retentions]
        return super().embed_multimodal(**kwargs)


def check_config_hook(vllm_config, config: PruneVidConfig) -> None:
    """Fail where `ConfigHook` did not set vLLM's pruning rate in the front-end (a vLLM that no
    longer calls MODELS_CONFIG_MAP's hooks): the other processes would not see the settings."""
    rate = vllm_config.model_config.multimodal_config.video_pruning_rate
    if (rate or None) != (1 - config.retention if prunes(config) else None):
        raise RuntimeError(
            f"PruneVid's config hook did not run (video pruning rate {rate}): this vLLM no longer "
            "calls MODELS_CONFIG_MAP's hooks; use a vLLM the plugin supports"
        )


def request_settings(config: PruneVidConfig, retention: float | None) -> PruneVidConfig:
    """The engine's settings with a request's own retention, if it gives one (validated: one
    sentence on error, which fails that request in the front-end)."""
    if retention is None:
        return config
    if not prunes(config):
        raise ValueError(
            f"{REQUEST_RETENTION} needs an engine started with PruneVid pruning "
            '(hf_overrides {"prunevid": {"retention": r}} with r < 1)'
        )
    return dataclasses.replace(config, retention=float(retention))


def prunes(config: PruneVidConfig) -> bool:
    """Whether these settings change anything (retention 1 or stage 1 off keep every token)."""
    return config.stage1 and config.retention < 1


def video_token_count(grid_thw: tuple[int, int, int], merge_size: int, config: PruneVidConfig) -> int:
    """Placeholders of a video whose patch grid is (t, h, w): the stage-1 budget of its
    t * (h / merge) * (w / merge) tokens, which stage 1 meets for any content."""
    steps, per_step = grid_thw[0], grid_thw[1] // merge_size * (grid_thw[2] // merge_size)
    return visual_token_count(steps * per_step, config)


def visual_token_count(num_visual: int, config: PruneVidConfig) -> int:
    """A video's visual tokens after stage 1: max(1, round(retention * num_visual)) when the
    settings prune, else all of them."""
    return stage1_count(num_visual, config) if prunes(config) else num_visual


def grid_positions(
    grid_thw: tuple[int, int, int],
    merge_size: int,
    steps_per_position: float = 1.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, int]:
    """Stock M-RoPE positions of a media item's tokens relative to its start, (3, t * h' * w')
    row-major on `device`, and its extent: how far the next text token is from the start. As
    vLLM's stock Qwen2.5-VL: t = floor(step * seconds per step * tokens per second)
    (`steps_per_position` is the product), and the extent is the largest position + 1. Built on
    the device from the grid alone: no upload, and the extent needs no read back."""
    steps, height, width = grid_thw[0], grid_thw[1] // merge_size, grid_thw[2] // merge_size
    t = (torch.arange(steps, dtype=torch.float64, device=device) * steps_per_position).long()
    h, w = torch.arange(height, device=device), torch.arange(width, device=device)
    grid = torch.stack(torch.meshgrid(t, h, w, indexing="ij")).reshape(3, -1)
    # The largest of t (the last step's, the same float64 product), h and w, on the host.
    extent = max(int((steps - 1) * steps_per_position), height - 1, width - 1) + 1
    return grid, extent


def check_extent(grid_thw: tuple[int, int, int], merge_size: int, steps_per_position: float) -> None:
    """Refuse (one sentence) a video whose positions from its start reach 65,536, past what the
    position channels carry exactly (`encode_positions`). Called in the front-end, where it fails
    that request only."""
    _, extent = grid_positions(grid_thw, merge_size, steps_per_position, device="meta")
    if extent > BASE * BASE:
        raise ValueError(
            f"this video is too long for PruneVid's vLLM plugin: its {grid_thw[0]} time steps reach "
            f"position {extent - 1} from its start, and the plugin carries positions below {BASE * BASE:,} "
            "(sample fewer frames, or send a shorter clip)"
        )


def encode_positions(positions: torch.Tensor, extent: int, dtype: torch.dtype) -> torch.Tensor:
    """(3, M) positions relative to the media start, each in [0, extent), and the extent ->
    (M, CHANNELS) channels in `dtype`: t, h, w, extent as (high, low) base-256 digit pairs, each
    exact in bf16. The range is checked on the extent, a host integer: nothing is read back."""
    if extent > BASE * BASE:
        raise ValueError(
            f"media positions must be below {BASE * BASE} to travel exactly in {dtype}, got {extent - 1}"
        )
    values = torch.cat([positions, torch.full_like(positions[:1], extent)])  # (4, M)
    digits = torch.stack([values // BASE, values % BASE], dim=1)  # (4, 2, M)
    return digits.reshape(CHANNELS, -1).T.to(dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """(M, CHANNELS) channels -> (4, M) long: t, h, w, extent (the inverse of `encode_positions`)."""
    digits = channels.float().round().long().T.reshape(POSITION_VALUES, 2, -1)
    return digits[:, 0] * BASE + digits[:, 1]


def first_member_channels(
    first: torch.Tensor,
    grid_thw: tuple[int, int, int],
    merge_size: int,
    steps_per_position: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(M,) first members' row-major indices into the video's tokens -> (M, CHANNELS): their
    stock positions and the video's extent, on `first`'s device (the part of `merged_video` that
    is the plugin's own: no host read, no upload)."""
    positions, extent = grid_positions(grid_thw, merge_size, steps_per_position, device=first.device)
    return encode_positions(positions[:, first], extent, dtype)


def merged_video(
    features: torch.Tensor,
    grid_thw: tuple[int, int, int],
    merge_size: int,
    steps_per_position: float,
    config: PruneVidConfig,
) -> torch.Tensor:
    """Stage 1 on one video's vision-tower output. features: (t * h' * w', C), row-major per time
    step -> (M, C + CHANNELS): the merged tokens, M = `video_token_count`, each followed by the
    encoded stock position of its first member and the video's extent."""
    steps, height, width = grid_thw[0], grid_thw[1] // merge_size, grid_thw[2] // merge_size
    if not prunes(config):  # a request that keeps every token, in an engine that prunes
        first = torch.arange(len(features), device=features.device)
        return torch.cat(
            [
                features,
                first_member_channels(first, grid_thw, merge_size, steps_per_position, features.dtype),
            ],
            1,
        )
    merge = merge_tokens(features.view(steps, height * width, -1), config, (height, width))
    first = merge.first_members().to(features.device)
    channels = first_member_channels(first, grid_thw, merge_size, steps_per_position, features.dtype)
    return torch.cat([merge.tokens.to(features.dtype), channels], dim=1)


def llava_pooled_grid(vision_config) -> tuple[int, int]:
    """A frame's token grid after LLaVA-OneVision's 2 x 2 bilinear pooling (ceil of half the
    patch grid's side: 14 x 14 for 384 px frames of 14 px patches)."""
    side = math.ceil(vision_config.image_size // vision_config.patch_size / 2)
    return side, side


def merged_llava_video(features: torch.Tensor, grid: tuple[int, int], config: PruneVidConfig) -> torch.Tensor:
    """Stage 1 on one LLaVA-OneVision video as vLLM's tower gives it: (T * h * w + 1, C), the
    pooled grids row-major frame after frame, then the newline -> (visual_token_count(T * h * w)
    + 1, C), the merged tokens in their own order, then the newline (as the transformers adapter
    writes them). Every count follows from the shapes: nothing is read back from the device."""
    if not prunes(config):
        return features
    per_frame = grid[0] * grid[1]
    frames = features[:-1].view(-1, per_frame, features.shape[-1])
    merge = merge_tokens(frames, config, grid)
    return torch.cat([merge.tokens.to(features.dtype), features[-1:]])


def media_with_positions(
    features: torch.Tensor, grid_thw: tuple[int, int, int], merge_size: int
) -> torch.Tensor:
    """An unpruned media item (an image) with its stock positions as channels:
    (h' * w', C) -> (h' * w', C + CHANNELS)."""
    positions, extent = grid_positions(grid_thw, merge_size, device=features.device)
    return torch.cat([features, encode_positions(positions, extent, features.dtype)], 1)


def prompt_positions(num_tokens: int, media: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
    """A prompt's M-RoPE positions before its media are encoded: text counts on one by one, each
    media item of `length` tokens starting at `offset` advances the count by its `extent`.
    media: (offset, length, extent) in prompt order. Returns ((3, num_tokens) long, the
    rope delta of what follows). The media tokens' own positions are placeholders here (their
    start): pruned ones depend on the content and are rewritten once it is encoded
    (`recompute_mrope_positions`), and a prefix-cache hit never needs them."""
    positions = torch.empty(num_tokens, dtype=torch.long)
    cursor, position = 0, 0
    for offset, length, extent in media:
        positions[cursor:offset] = torch.arange(offset - cursor) + position
        position += offset - cursor
        positions[offset : offset + length] = position
        position += extent
        cursor = offset + length
    positions[cursor:] = torch.arange(num_tokens - cursor) + position
    last = position + num_tokens - cursor - 1 if cursor < num_tokens else position - 1
    return positions.expand(3, -1).clone(), last + 1 - num_tokens


# ---- Qwen3-VL: one placeholder run per time step, each of a fixed quota ---------------------


def qwen3_settings(values: Mapping | None) -> PruneVidConfig:
    """The settings of `hf_overrides["prunevid"]` for Qwen3-VL: every time step gets a fixed
    share of the budget (`per_step_budget`), so that each step's run of placeholders, written
    in the front-end after its timestamp, has a length known before the video is encoded."""
    return settings(values).replace(per_step_budget=True)


def step_quotas(grid_thw: tuple[int, int, int], merge_size: int, config: PruneVidConfig) -> list[int]:
    """Placeholders in each time step's run of a Qwen3-VL video of patch grid (t, h, w): stage 1's
    budget of its t * h' * w' tokens shared equally among the steps, the earlier ones one more
    (`budget.step_counts`; a budget below a token per step is refused with one sentence), or
    every step's h' * w' when the settings keep every token."""
    steps, per_step = grid_thw[0], grid_thw[1] // merge_size * (grid_thw[2] // merge_size)
    return step_counts(steps, per_step, config) if prunes(config) else [per_step] * steps


def merged_qwen3_video(
    features: torch.Tensor,
    grid_thw: tuple[int, int, int],
    merge_size: int,
    visual_dim: int,
    config: PruneVidConfig,
) -> torch.Tensor:
    """Stage 1 on one Qwen3-VL video as vLLM's tower gives it: (t * h' * w', C + D * C), each
    token's features (C = `visual_dim`) then its D deepstack levels, row-major per time step ->
    (sum(step_quotas), C + D * C + CHANNELS). The merged tokens come in stage 1's order, the time
    order of their first members, which fills the runs step by step, each with its quota. Main
    features: `merge_tokens`'s (per_step_budget); deepstack: the plain mean of each merged
    token's members (what stage 1 does to a token); then the channels: the first member's stock
    position relative to its run's start, (0, row, column) (Qwen3-VL numbers each run afresh), and
    the run's extent max(h', w'). Every count follows from the grid: nothing is read back."""
    steps, height, width = grid_thw[0], grid_thw[1] // merge_size, grid_thw[2] // merge_size
    if prunes(config):
        merge = merge_tokens(
            features[:, :visual_dim].view(steps, height * width, -1), config, (height, width)
        )
        first = merge.first_members().to(features.device)
        labels = merge.assignment.flatten().to(features.device)  # (T * N,) stage 1 drops none
        deepstack = cluster_means(features[None, :, visual_dim:], labels[None], merge.num_tokens)[0]
        features = torch.cat([merge.tokens.to(features.dtype), deepstack], 1)
    else:  # a request that keeps every token, in an engine that prunes
        first = torch.arange(len(features), device=features.device)
    channels = first_member_channels(first, grid_thw, merge_size, 0.0, features.dtype)
    return torch.cat([features, channels], 1)


def token_runs(tokens: Sequence[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of every maximal run of `token` in `tokens` (a video's per-step runs)."""
    runs: list[tuple[int, int]] = []
    for i, value in enumerate(tokens):
        if value != token:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def place_media_positions(
    input_ids: Sequence[int] | torch.Tensor,
    media_tokens: tuple[int, ...],
    channels: torch.Tensor,
    positions: torch.Tensor,
    num_computed_tokens: int,
) -> torch.Tensor:
    """Qwen3-VL's positions once media are encoded: the first M media placeholders from
    `num_computed_tokens` on (a prefill chunk's media, in prompt order) take their run's start
    plus the (t, h, w) their channels carry. channels: (M, CHANNELS); positions: (3, L) long, the
    first numbering (`prompt_positions`: each media token at its run's start, which t keeps,
    since every Qwen3-VL image and time step has t offset 0, so placing twice changes nothing).
    Runs where `positions` lives (vLLM's runner keeps them on the host, its second runner on the
    device), without a read back: the channels are matched to the placeholders by a running count."""
    if len(channels) == 0:
        return positions
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=positions.device)  # a list: vLLM 0.32's runner
    is_media = torch.zeros_like(ids, dtype=torch.bool)
    for token in media_tokens:  # host ints: nothing to upload
        is_media |= ids == token
    is_media[:num_computed_tokens].fill_(False)  # computed in earlier chunks
    order = is_media.cumsum(0) - 1  # (L,) each placeholder's index among the chunk's media
    placed = is_media & (order < len(channels))
    values = decode_positions(channels.to(positions.device))[:3]  # (3, M) relative (t, h, w)
    moved = positions[0] + values[:, order.clamp(0, len(channels) - 1)]  # (3, L)
    return torch.where(placed, moved, positions)


def _enable_pruning_on_cpu(runner: type, supports_pruning: Callable[[torch.nn.Module], bool]) -> None:
    """Upstream bug (vLLM 0.32): `CPUModelRunner.load_model` replaces `GPUModelRunner.load_model`
    without its last step, which turns on `is_multimodal_pruning_enabled` for a model that prunes
    (`SupportsMultiModalPruning`, `video_pruning_rate` > 0). Left off, the runner never strips the
    position channels, and this plugin (and vLLM's own EVS) crash on a size mismatch in the CPU
    build (vllm-ascend fixed the same gap in its NPU runner: vllm-project/vllm-ascend#11067). Set
    it as the GPU runner does, after loading the plugin's architecture only (`cpu_runner_prunes`);
    `enable_evs_on_cpu` extends it to every model. Once per process."""
    stock = runner.load_model
    if getattr(stock, "prunevid_fix", False):
        return

    @functools.wraps(stock)
    def load_model(self, *args, **kwargs):
        stock(self, *args, **kwargs)
        model = self.get_model()
        self.is_multimodal_pruning_enabled = cpu_runner_prunes(
            model, supports_pruning(model), self.model_config.multimodal_config, load_model.every_model
        )

    load_model.prunevid_fix = True
    load_model.every_model = False
    runner.load_model = load_model


def cpu_runner_prunes(model: torch.nn.Module, supports_pruning: bool, multimodal, every_model: bool) -> bool:
    """Whether the CPU runner must turn on vLLM's pruning path (what its GPU runner decides)
    after loading `model`: for the plugin's architecture (a model with `prunevid` settings), or
    for every model once `enable_evs_on_cpu` was called."""
    ours = getattr(model, "prunevid", None) is not None
    return (
        (ours or every_model)
        and supports_pruning
        and multimodal is not None
        and multimodal.is_multimodal_pruning_enabled()
    )


# Set to "1", vLLM processes started from here (an engine core) opt in as `enable_evs_on_cpu` does.
EVS_ON_CPU = "PRUNEVID_VLLM_EVS_ON_CPU"


def enable_evs_on_cpu() -> None:
    """Let vLLM's own video pruning (EVS, `--video-pruning-rate`) run on vLLM 0.32's CPU build,
    which the upstream bug above stops: the plugin's runner fix for every model, in this process
    and (through `EVS_ON_CPU` in the environment, read by `register`) in the vLLM processes it
    starts. Opt-in, for runs that compare with EVS (tests/test_vllm.py, scripts/vllm_bench.py);
    the plugin never changes how vLLM runs another model by itself."""
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    os.environ[EVS_ON_CPU] = "1"
    _enable_pruning_on_cpu(CPUModelRunner, supports_multimodal_pruning)
    CPUModelRunner.load_model.every_model = True
