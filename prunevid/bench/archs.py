"""The models `prunevid bench speed` measures: real layer sizes, random weights.

An `Arch` names a family (LLaVA-OneVision or Qwen2.5-VL), its Qwen2 text sizes and its vision
tower; `build_model` makes a random-weight model of it (fp32, eval) with the offline tokenizer of
`prunevid.testing`. Speed does not depend on the weight values, so `randomize` fills them with
a seeded uniform draw instead of transformers' (slower) initialisation. The vocabulary is cut to
`BENCH_VOCAB` rows: only the LM head on the last position depends on it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

BENCH_VOCAB = 32768  # real Qwen2 has 151,936: only the LM head on one position depends on it

# LLaVA-OneVision's SigLIP-so400m: its last layer and pooling head are dropped (26 of 27 layers).
SIGLIP_SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=26,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    vision_use_head=False,
)
# Qwen2-7B's layer sizes (LLaVA-OneVision-7B and, with M-RoPE, Qwen2.5-VL-7B); 28 layers in full.
QWEN2_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
# M-RoPE of the Qwen2.5-VL family (copied into each config: configs may add to it).
MROPE = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}
# Qwen2.5-VL-3B-Instruct's vision tower (window attention, full attention every 8th block).
QWEN25_VIT = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=2048,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
    hidden_act="silu",
)


@dataclass(frozen=True)
class Arch:
    """A model to benchmark: its family, Qwen2 text sizes and vision tower (empty for the tiny
    test models)."""

    name: str
    text: dict[str, Any]
    selected_layer: int
    note: str
    family: str = "llava_onevision"
    vision: dict[str, Any] = field(default_factory=lambda: SIGLIP_SO400M)


ARCHS: dict[str, Arch] = {
    "tiny": Arch("tiny", {}, 1, "prunevid.testing tiny model (2-layer SigLIP 112 px, 4-layer Qwen2)"),
    "tiny-qwen": Arch(
        "tiny-qwen",
        {},
        1,
        "prunevid.testing tiny Qwen2.5-VL (2-block vision tower, 4-layer Qwen2 with M-RoPE)",
        "qwen2_5_vl",
        {},
    ),
    "qwen2-0.5b": Arch(
        "qwen2-0.5b",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        10,
        "LLaVA-OneVision-0.5B sizes: SigLIP-so400m + Qwen2-0.5B (24 layers), vocab cut to 32,768",
    ),
    "qwen2-7b-4layers": Arch(
        "qwen2-7b-4layers",
        {**QWEN2_7B, "num_hidden_layers": 4},
        1,
        "LLaVA-OneVision-7B layer sizes (Qwen2-7B) with 4 of its 28 decoder layers, vocab cut to "
        "32,768; selected_layer 1 = 10 * 4 // 28 (layers 0-1 at full length, 2-3 pruned)",
    ),
    "qwen2-7b": Arch(
        "qwen2-7b",
        {**QWEN2_7B, "num_hidden_layers": 28},
        10,
        "LLaVA-OneVision-7B sizes: SigLIP-so400m + Qwen2-7B (all 28 layers), vocab cut to 32,768 "
        "(GPU runs: scripts/gpu_check.sh)",
    ),
    "qwen2.5-vl-7b": Arch(
        "qwen2.5-vl-7b",
        {**QWEN2_7B, "num_hidden_layers": 28, "rope_parameters": dict(MROPE)},
        10,
        "Qwen2.5-VL-7B-Instruct sizes: its 32-block window-attention ViT + Qwen2.5-7B (28 layers, "
        "M-RoPE), vocab cut to 32,768 (GPU runs: scripts/gpu_check.sh)",
        "qwen2_5_vl",
        {**QWEN25_VIT, "out_hidden_size": 3584},
    ),
    "qwen2.5-vl-3b": Arch(
        "qwen2.5-vl-3b",
        dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters=dict(MROPE),
        ),
        10,
        "Qwen2.5-VL-3B-Instruct sizes: its 32-block window-attention ViT + Qwen2.5-3B (36 layers, "
        "M-RoPE), vocab cut to 32,768; frames sized by the video processor's defaults "
        "(128-768 x 28 x 28 pixels, as qwen-vl-utils)",
        "qwen2_5_vl",
        QWEN25_VIT,
    ),
}


def build_model(
    arch: Arch, seed: int = 0, device: str | torch.device | None = None
) -> tuple[torch.nn.Module, Any]:
    """A random-weight model of `arch` (fp32, eval) on `device` (default: torch's default device),
    and a tokenizer. A real-size model is made and filled where it will run: on a GPU in seconds,
    where the CPU takes a minute and 28 GB of host memory for a 7B one (a CUDA generator draws
    other values than the CPU's: speed does not depend on them)."""
    from ..testing import tiny_model, tiny_qwen_vl, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    if not arch.text:
        tiny = (
            tiny_model(seed, tokenizer)
            if arch.family == "llava_onevision"
            else tiny_qwen_vl(arch.family, seed, tokenizer)
        )
        return (tiny if device is None else tiny.to(device)), tokenizer
    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    if arch.family == "llava_onevision":
        model_class, config = LlavaOnevisionForConditionalGeneration, _llava_config(arch, tokenizer)
    else:
        model_class, config = Qwen2_5_VLForConditionalGeneration, _qwen25_config(arch, tokenizer)
    with _skip_init(), contextlib.nullcontext() if device is None else torch.device(device):
        model = model_class(config).eval()
    model.tie_weights()  # skipped along with the initialisation; both 0.5B and 3B tie the LM head
    randomize(model, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def _text_config(arch: Arch, tokenizer: Any) -> dict[str, Any]:
    """The language model's settings: `arch`'s sizes, the cut vocabulary, the tokenizer's ids."""
    return dict(
        vocab_size=BENCH_VOCAB,
        max_position_embeddings=32768,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **arch.text,
    )


def _llava_config(arch: Arch, tokenizer: Any):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    text = Qwen2Config(**_text_config(arch, tokenizer))
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**arch.vision).to_dict(),
        text_config=text.to_dict(),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=arch.text["tie_word_embeddings"],
    )


def _qwen25_config(arch: Arch, tokenizer: Any):
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        vision_config=arch.vision,
        text_config={**_text_config(arch, tokenizer), "bos_token_id": tokenizer.pad_token_id},
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=arch.text["tie_word_embeddings"],
    )


def _skip_init():
    """transformers' context that skips weight initialisation (we fill the weights ourselves)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older layouts: initialise normally (slower, same result for speed)
        return contextlib.nullcontext()
    return no_init_weights()


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Deterministic random weights: norms 1/0, other biases 0, the rest uniform with std `std`
    (uniform is faster to draw than normal; speed does not depend on the values)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device if device.type == "cuda" else "cpu").manual_seed(seed)
    bound = std * 3**0.5
    for module in model.modules():
        is_norm = "Norm" in type(module).__name__
        for name, param in module.named_parameters(recurse=False):
            if is_norm:
                param.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                param.zero_()
            else:
                param.uniform_(-bound, bound, generator=generator)
