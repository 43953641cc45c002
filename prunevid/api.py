"""`patch` / `unpatch` / `last_trace`: the public API, dispatching on the model's class."""

from __future__ import annotations

from types import ModuleType

import torch

from .baselines import Method, get_method
from .config import PruneVidConfig
from .models.base import guard_generate, patch_inner, restore_class
from .trace import PruningTrace

TRANSFORMERS_SUPPORTED = ("5.24", "6")  # [low, high): the 5.x API the adapters are written for


def family_of(model: torch.nn.Module) -> ModuleType:
    """The family module that patches `model` (dispatch on the model's class)."""
    import transformers

    from .models import llava_onevision, qwen2_vl

    families = {
        "LlavaOnevisionForConditionalGeneration": llava_onevision,
        "Qwen2VLForConditionalGeneration": qwen2_vl,
        "Qwen2_5_VLForConditionalGeneration": qwen2_vl,
        "Qwen3VLForConditionalGeneration": qwen2_vl,
    }
    for name, family in families.items():
        if isinstance(model, getattr(transformers, name)):
            return family
    raise TypeError(f"PruneVid has no adapter for {type(model).__name__}; supported: {', '.join(families)}")


def patch(
    model: torch.nn.Module,
    config: PruneVidConfig | None = None,
    method: str | Method = "prunevid",
    retention: float | None = None,
) -> torch.nn.Module:
    """Make `model` run PruneVid in every forward/generate with a video (in place; returns it).

    `method` runs another rule instead (`prunevid.baselines.METHODS`: prunevid, stage1, stage2,
    fastv, random, uniform, evs, dycoke); `retention` is short for
    `config.replace(retention=...)`: exactly max(1, round(retention * N)) of a video's N visual
    tokens go on past `selected_layer`. Patching a patched model replaces its settings.
    `unpatch` restores the stock model.
    """
    check_transformers()
    pruned = family_of(model).PrunedModel
    layers = model.config.text_config.num_hidden_layers
    config = config or PruneVidConfig()
    if retention is not None:
        config = config.replace(retention=retention)
    method = get_method(method)
    patch_inner(model.model, pruned, method.configure(config), method, layers)
    guard_generate(model)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    family_of(model)  # the same error as patch for a model of another kind
    restore_class(model.model)
    restore_class(model)
    return model


def last_traces(model: torch.nn.Module) -> list[PruningTrace | None]:
    """The traces of the last prefill with a video, one per batch row (None for rows without video)."""
    family_of(model)
    runtime = getattr(model.model, "_prunevid", None)
    if runtime is None:
        raise RuntimeError("this model is not patched: call prunevid.patch(model) first")
    traces = runtime.read_traces()  # numpy from here: one device-to-host copy on the first read
    if traces is None:
        raise RuntimeError("no video has gone through this model since it was patched")
    return traces


def last_trace(model: torch.nn.Module, row: int = 0) -> PruningTrace:
    """The PruningTrace of batch row `row` in the last prefill with a video."""
    trace = last_traces(model)[row]
    if trace is None:
        raise RuntimeError(f"batch row {row} of the last call had no video")
    return trace


class TransformersVersionError(RuntimeError):
    """The installed transformers is outside the range the adapters are written for."""


def check_transformers() -> None:
    """The adapters use transformers 5.24's forward API (`cache`, `mm_encoder_outputs`). The
    package itself allows older 5.x releases, for the vLLM plugin, which needs only vLLM's pin."""
    import transformers
    from packaging.version import Version

    low, high = TRANSFORMERS_SUPPORTED
    if not Version(low) <= Version(transformers.__version__) < Version(high):
        raise TransformersVersionError(
            f"prunevid.patch needs transformers>={low},<{high}, found {transformers.__version__} "
            "(the vLLM plugin works with the transformers vLLM pins)"
        )
