"""Analytic language-model FLOPs from a model config and token counts (ALGORITHM.md §6).

Per decoder layer and n tokens: 4nd^2 (attention projections) + 2n^2 d (scores and values)
+ 2ndm for a plain MLP or 3ndm for a gated one (d hidden, m MLP width). Qwen2 and Llama MLPs
are gated. Counts multiply-accumulates as one FLOP each, like the paper; only ratios matter.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that FLOPs depend on."""

    hidden: int
    mlp: int
    layers: int
    gated: bool = True

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        """From a text config (Qwen2Config, ...) or a multimodal config holding one."""
        text = getattr(config, "text_config", None) or config
        return cls(text.hidden_size, text.intermediate_size, text.num_hidden_layers, gated=True)


def layer_flops(shape: DecoderShape, n: int) -> float:
    """FLOPs of one decoder layer over n tokens."""
    d, m = shape.hidden, shape.mlp
    return 4 * n * d**2 + 2 * n**2 * d + (3 if shape.gated else 2) * n * d * m


def prefill_flops(
    shape: DecoderShape, n_before: int, n_after: int | None = None, selected_layer: int = 0
) -> float:
    """Prefill FLOPs when layers 0..selected_layer see n_before tokens and the rest n_after.

    Without stage 2 pass n_after=None (every layer sees n_before).
    """
    if n_after is None:
        return shape.layers * layer_flops(shape, n_before)
    early = min(selected_layer + 1, shape.layers)
    return early * layer_flops(shape, n_before) + (shape.layers - early) * layer_flops(shape, n_after)


def decode_flops(shape: DecoderShape, context: int) -> float:
    """FLOPs of one decoding step with `context` cached tokens (one new query token)."""
    d, m = shape.hidden, shape.mlp
    return shape.layers * (4 * d**2 + 2 * (context + 1) * d + (3 if shape.gated else 2) * d * m)
