"""Model-independent plumbing shared by the family adapters.

`prefill` runs a stock transformers decoder stack (calling its layers, never re-implementing
them) with stage 2 at one layer; `DecodeState` remembers how the physical (pruned) cache maps
back to the logical sequence, so that `generate()`'s later steps get the right mask and
positions.

Vocabulary: the *logical* sequence is the prompt as the language model would see it without
stage 2 (after stage 1); the *physical* sequence is what is actually stored: kept tokens
only, each sample left-padded to the batch's longest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..config import PruneVidConfig
from ..select import Rule, question_attention, question_guided


@dataclass
class VisualSpan:
    """Where one sample's visual tokens sit in the logical prompt.

    index: (n,) their positions in the row, increasing (one run, or one run per time step when
    the model puts text between frames); groups: (n,) stage-2 budget set of each; counts: (S,)
    tokens stage 2 keeps per set; question_start: first token after the video, i.e. the first
    query row.
    """

    index: torch.Tensor
    groups: torch.Tensor
    counts: torch.Tensor
    question_start: int

    def shifted(self, offset: int) -> VisualSpan:
        return VisualSpan(self.index + offset, self.groups, self.counts, self.question_start + offset)


@dataclass
class Selection:
    """Stage 2's decision for a batch. keep: (B, P) logical indices, left-padded by repeating
    the first kept index; mask: (B, P) 1 for real tokens; per sample, the kept mask and the
    scores of its visual tokens (None for samples without video)."""

    keep: torch.Tensor
    mask: torch.Tensor
    visual_kept: list[torch.Tensor | None]
    visual_scores: list[torch.Tensor | None]
    seconds: float
    visual_attention: list[torch.Tensor | None] | None = None  # (nq, n) per sample: max over heads


@dataclass
class DecodeState:
    """Ties generate()'s logical bookkeeping to the physical cache after a pruned prefill.

    prompt_mask: (B, P) physical mask of the prompt; next_position: (B,), or (R, B) for
    M-RoPE rows, the position of the first generated token: decoding continues from the
    unpruned prompt's positions.
    """

    cache: Cache
    prompt_mask: torch.Tensor
    next_position: torch.Tensor

    def decode_inputs(
        self, attention_mask: torch.Tensor | None, num_new: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical attention mask (B, P + g + q) and positions (..., B, q) for a step of q new tokens."""
        prompt_len = self.prompt_mask.shape[1]
        generated = self.cache.get_seq_length() - prompt_len
        batch = self.prompt_mask.shape[0]
        if attention_mask is None:
            tail = self.prompt_mask.new_ones(batch, generated + num_new)
        elif attention_mask.ndim != 2:
            raise NotImplementedError(
                "PruneVid decoding needs a 2-D attention mask (a DynamicCache, not a static cache)"
            )
        else:
            tail = attention_mask[:, attention_mask.shape[1] - generated - num_new :].to(self.prompt_mask)
        steps = torch.arange(generated, generated + num_new, device=self.next_position.device)
        return torch.cat([self.prompt_mask, tail], dim=1), self.next_position[..., None] + steps


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """generate()'s convention: real tokens count from 0, padding gets 0. (B, L) -> (B, L)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prefill(
    lm: torch.nn.Module,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Cache | None,
    spans: list[VisualSpan | None],
    config: PruneVidConfig,
    rule: Rule = question_guided,
    residuals: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Selection]:
    """Prefill a stock decoder `lm` (e.g. Qwen2Model) on the logical prompt, with stage 2.

    embeds: (B, L, C); mask: (B, L); position_ids: (B, L), or (3, B, L) for M-RoPE, or
    (4, B, L) with the text positions first (Qwen-VL's generate()).
    Layers 0..selected_layer run on all L tokens; stage 2 then keeps the selected tokens,
    crops those layers' cache to them and runs the remaining layers on the P kept tokens.
    `rule` picks the kept visual tokens from the question rows' attention (baselines swap it).
    `residuals[i]` (B, L, C) is added to the output of layer i (Qwen3-VL's deepstack features,
    zero outside the visual tokens).
    Returns the final-normed hidden states (B, P, C) and the selection.
    """
    prune_at = config.selected_layer if config.stage2 and any(spans) else None
    # Configs without layer_types (Qwen2-VL's text model) use full attention in every layer.
    layer_types = getattr(lm.config, "layer_types", None) or ["full_attention"] * len(lm.layers)
    hidden = embeds
    rope_positions, text_positions = _split_positions(position_ids)
    masks = _layer_masks(lm, layer_types, hidden, mask, text_positions, cache)
    rotary = lm.rotary_emb(hidden, rope_positions)
    selection = _keep_all(mask, spans)
    for i, layer in enumerate(lm.layers):
        layer_input = hidden
        hidden = layer(
            hidden,
            attention_mask=masks[layer_types[i]],
            position_embeddings=rotary,
            position_ids=text_positions,
            cache=cache,
            use_cache=cache is not None,
        )
        if residuals is not None and i < len(residuals):
            hidden = hidden + residuals[i]
        if i == prune_at:
            selection = select_tokens(layer, layer_input, mask, spans, rule)
            index = selection.keep[:, :, None].expand(-1, -1, hidden.shape[2])
            hidden = hidden.gather(1, index)
            residuals = None if residuals is None else [r.gather(1, index) for r in residuals]
            position_ids = position_ids.gather(-1, selection.keep.expand(*position_ids.shape[:-2], -1, -1))
            rope_positions, text_positions = _split_positions(position_ids)
            if cache is not None:
                crop_cache(cache, selection.keep, upto_layer=i)
            # Layers after the cut see only the kept tokens: their cache is still empty.
            masks = _layer_masks(lm, layer_types, hidden, selection.mask, text_positions, None)
            rotary = lm.rotary_emb(hidden, rope_positions)
    return lm.norm(hidden), selection


@torch.no_grad()
def select_tokens(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    spans: list[VisualSpan | None],
    rule: Rule = question_guided,
) -> Selection:
    """Stage 2 (ALGORITHM.md §5.2-5.4) from `layer`'s own query/key projections of its input.

    hidden: (B, L, C) the input of the selected layer. Only the question rows of q k^T are
    formed, so the model's real attention (SDPA / FlashAttention) is untouched.
    """
    start = time.perf_counter()
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    keeps, kept_masks, scores, attentions = [], [], [], []
    for b, span in enumerate(spans):
        real = mask[b].nonzero().squeeze(1)
        if span is None:
            keeps.append(real)
            kept_masks.append(None)
            scores.append(None)
            attentions.append(None)
            continue
        question = real[real >= span.question_start]
        if question.numel() == 0:  # video ends the prompt: the last token asks
            question = real[-1:]
        queries = _heads(attn, "q", normed[b, question])
        keys = _heads(attn, "k", normed[b, real])
        visual = torch.isin(real, span.index.to(real.device))
        attention = question_attention(queries, keys)[:, :, visual]
        score, kept = rule(attention, span.groups.to(keys.device), span.counts)
        keeps.append(torch.cat([real[~visual], real[visual][kept]]).sort().values)
        kept_masks.append(kept)
        scores.append(score)
        attentions.append(attention.amax(0))  # for PruningTrace.explain: which question rows looked
    keep, keep_mask = _left_pad(keeps)
    return Selection(keep, keep_mask, kept_masks, scores, time.perf_counter() - start, attentions)


def crop_cache(cache: Cache, keep: torch.Tensor, upto_layer: int) -> None:
    """Keep only positions `keep` (B, P) in the cache of layers 0..upto_layer (in place)."""
    for layer in cache.layers[: upto_layer + 1]:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"PruneVid can only crop a full-attention DynamicCache, not {type(layer).__name__}"
            )
        index = keep[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)


def _heads(attn: torch.nn.Module, which: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's own q or k projection of x (n, C) as (heads, n, head_dim), with its
    per-head norm if the family has one (Qwen3); no RoPE."""
    states = getattr(attn, f"{which}_proj")(x).view(x.shape[0], -1, attn.head_dim)
    norm = getattr(attn, f"{which}_norm", None)
    if norm is not None:
        states = norm(states)
    return states.transpose(0, 1)


def _keep_all(mask: torch.Tensor, spans: list[VisualSpan | None]) -> Selection:
    keep = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape[0], -1)
    kept = [None if s is None else torch.ones(len(s.groups), dtype=torch.bool) for s in spans]
    return Selection(keep, mask, kept, [None] * len(spans), 0.0)


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack index rows of different lengths, left-padded (by repeating each row's first index)."""
    width = max(len(r) for r in rows)
    keep = torch.stack([torch.cat([r[:1].expand(width - len(r)), r]) for r in rows])
    mask = torch.stack([torch.arange(width, device=keep.device) >= width - len(r) for r in rows]).long()
    return keep, mask


def _split_positions(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (what the rotary embedding takes, the 1-D text positions for masks and layers or None)."""
    if positions.ndim == 2:
        return positions, positions
    if positions.shape[0] == 4:
        return positions[1:], positions[0]
    return positions, None


def _layer_masks(
    lm: torch.nn.Module,
    layer_types: list[str],
    hidden: torch.Tensor,
    mask: torch.Tensor,
    position_ids: torch.Tensor | None,
    cache: Cache | None,
) -> dict[str, torch.Tensor | None]:
    """The stock mask builders, one mask per layer type (always given the 2-D mask)."""
    kwargs = {
        "config": lm.config,
        "inputs_embeds": hidden,
        "attention_mask": mask,
        "cache": cache,
        "position_ids": position_ids,
    }
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks
