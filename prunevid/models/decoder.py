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

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..config import PruneVidConfig
from ..select import Rule, question_attention, question_guided
from .timing import Interval


@dataclass
class VisualSpan:
    """Where one sample's visual tokens sit in the logical prompt.

    index: (n,) their positions in the row, increasing (one run, or one run per time step when
    the model puts text between frames); groups: (n,) stage-2 budget set of each; counts: (S,)
    tokens stage 2 keeps per set; question_start: () the first token after the video, i.e. the
    first query row (a device scalar); num_kept: the visual tokens stage 2 keeps (counts.sum(),
    at most n), known on the host: every shape after stage 2 follows from it.
    """

    index: torch.Tensor
    groups: torch.Tensor
    counts: torch.Tensor
    question_start: torch.Tensor
    num_kept: int


@dataclass
class Selection:
    """Stage 2's decision for a batch. keep: (B, P) logical indices, right-aligned (the left
    padding points at index 0); mask: (B, P) 1 for real tokens, None when every row is full;
    per sample, the kept mask and the scores of its visual tokens (None for samples without
    video), device tensors."""

    keep: torch.Tensor
    mask: torch.Tensor | None
    visual_kept: list[torch.Tensor | None]
    visual_scores: list[torch.Tensor | None]
    seconds: float | Interval  # stage 2 scoring and selection (an Interval: read with the trace)
    visual_attention: list[torch.Tensor | None]  # (Q, n) per sample, max over heads


@dataclass
class DecodeState:
    """Ties generate()'s logical bookkeeping to the physical cache after a pruned prefill.

    prompt_mask: (B, P) physical mask of the prompt, None when it has no padding;
    next_position: (B,), or (R, B) for M-RoPE rows, the position of the first generated token:
    decoding continues from the unpruned prompt's positions; offset: what to subtract from the
    positions the caller numbered on the unpruned prompt ((B, 1) or (R, B, 1)), None where the
    logical positions are the caller's own (M-RoPE models keep their stock positions).

    A step costs what a stock step costs: with generate()'s positions and no padding, nothing;
    else one subtraction, or the prompt mask joined to the caller's mask of the new tokens.
    """

    cache: Cache
    prompt_mask: torch.Tensor | None
    next_position: torch.Tensor
    offset: torch.Tensor | None = None

    def decode_inputs(
        self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, num_new: int
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Physical attention mask (B, P + g + q), or None without padding, and logical positions
        (..., B, q) for a step of q new tokens."""
        if attention_mask is not None and attention_mask.ndim != 2:
            raise NotImplementedError(
                "PruneVid decoding needs a 2-D attention mask (a DynamicCache, not a static cache)"
            )
        if position_ids is None:
            generated = self.cache.get_seq_length() - self._prompt_length
            steps = torch.arange(generated, generated + num_new, device=self.next_position.device)
            position_ids = self.next_position[..., None] + steps
        elif self.offset is not None:
            position_ids = position_ids - self.offset
        if attention_mask is None and self.prompt_mask is None:
            return None, position_ids
        generated = self.cache.get_seq_length() - self._prompt_length
        prompt = self.prompt_mask
        if prompt is None:
            prompt = self.next_position.new_ones(attention_mask.shape[0], self._prompt_length)
        if attention_mask is None:
            tail = prompt.new_ones(prompt.shape[0], generated + num_new)
        else:
            tail = attention_mask[:, attention_mask.shape[1] - generated - num_new :].to(prompt.dtype)
        return torch.cat([prompt, tail], dim=1), position_ids

    def __post_init__(self) -> None:
        self._prompt_length = self.cache.get_seq_length()


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """generate()'s convention: real tokens count from 0, padding gets 0. (B, L) -> (B, L)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prefill(
    lm: torch.nn.Module,
    embeds: torch.Tensor,
    mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    cache: Cache | None,
    spans: list[VisualSpan | None],
    config: PruneVidConfig,
    rule: Rule = question_guided,
    residuals: list[torch.Tensor] | None = None,
    lengths: list[int] | None = None,
) -> tuple[torch.Tensor, Selection]:
    """Prefill a stock decoder `lm` (e.g. Qwen2Model) on the logical prompt, with stage 2.

    embeds: (B, L, C); mask: (B, L), None when no token is padding; position_ids: (B, L), or
    (3, B, L) for M-RoPE, or (4, B, L) with the text positions first (Qwen-VL's generate()).
    Layers 0..selected_layer run on all L tokens; stage 2 then keeps the selected tokens,
    crops those layers' cache to them and runs the remaining layers on the P kept tokens.
    `rule` picks the kept visual tokens from the question rows' attention (baselines swap it).
    `residuals[i]` (B, L, C) is added to the output of layer i (Qwen3-VL's deepstack features,
    zero outside the visual tokens). `lengths`: each row's real tokens, right-aligned (None: L).
    Returns the final-normed hidden states (B, P, C) and the selection.
    """
    prune_at = config.selected_layer if config.stage2 and any(spans) else None
    # Configs without layer_types (Qwen2-VL's text model) use full attention in every layer.
    layer_types = getattr(lm.config, "layer_types", None) or ["full_attention"] * len(lm.layers)
    hidden = embeds
    rope_positions, text_positions = _split_positions(position_ids)
    masks = _layer_masks(lm, layer_types, hidden, mask, cache)
    rotary = lm.rotary_emb(hidden, rope_positions)
    selection = _keep_all(mask, spans, hidden)
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
            selection = select_tokens(layer, layer_input, mask, spans, rule, lengths)
            index = selection.keep[:, :, None]  # (B, P, 1)
            hidden = _kept_rows(hidden, index)
            residuals = None if residuals is None else [_kept_rows(r, index) for r in residuals]
            if text_positions is not None:
                text_positions = text_positions.gather(-1, selection.keep)
            # The kept tokens' rotary rows, as computed for them (each row is its own position's).
            rotary = tuple(_kept_rows(r, index) for r in rotary)
            if cache is not None:
                crop_cache(cache, selection.keep, upto_layer=i)
            # Layers after the cut see only the kept tokens: their cache is still empty.
            masks = _layer_masks(lm, layer_types, hidden, selection.mask, None)
    return lm.norm(hidden), selection


@torch.no_grad()
def select_tokens(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    spans: list[VisualSpan | None],
    rule: Rule = question_guided,
    lengths: list[int] | None = None,
) -> Selection:
    """Stage 2 (ALGORITHM.md §5.2-5.4) from `layer`'s own query/key projections of its input.

    hidden: (B, L, C) the input of the selected layer; mask: (B, L) or None (no padding);
    lengths: each row's real tokens (None: L).
    Only the last Q rows of q k^T are formed (Q bounds every row's question: all tokens but
    its visual ones), so the model's real attention (SDPA / FlashAttention) is untouched; the
    rule sees the question rows and zeros for the rows before them (its max over rows, or its
    last row, does not change). Runs on the device: every shape follows from `num_kept`.
    """
    start = Interval(hidden.device)
    attn = layer.self_attn
    batch, width = hidden.shape[:2]
    normed = layer.input_layernorm(hidden)
    rows = width - min(len(s.index) for s in spans if s is not None)  # Q
    queries = _heads(attn, "q", normed[:, width - rows :])  # (B, H, Q, d)
    keys = _heads(attn, "k", normed)  # (B, Hkv, L, d)
    row_index = torch.arange(width - rows, width, device=hidden.device)  # (Q,)
    keep = torch.ones(batch, width, dtype=torch.bool, device=hidden.device)
    kept_masks, scores, attentions = [], [], []
    for b, span in enumerate(spans):
        if span is None:
            kept_masks.append(None)
            scores.append(None)
            attentions.append(None)
            continue
        attention = question_attention(queries[b], keys[b])  # (H, Q, L)
        if mask is not None:  # over the real keys only (renormalised: padding keys had some weight)
            attention = attention * mask[b]
            attention = attention / attention.sum(-1, keepdim=True)
        # The video may end the prompt: then its last token asks.
        question = row_index >= span.question_start.clamp(max=width - 1)  # (Q,)
        attention = attention.index_select(2, span.index) * question[:, None]  # (H, Q, n)
        score, kept = rule(attention, span.groups.to(keys.device), span.counts)
        keep[b].index_put_((span.index,), kept)  # in place: a view of row b
        kept_masks.append(kept)
        scores.append(score)
        attentions.append(attention.amax(0))  # for PruningTrace.explain: which question rows looked
    if mask is not None:
        keep &= mask.bool()
    lengths = lengths or [width] * batch
    lengths = [n if s is None else n - len(s.index) + s.num_kept for n, s in zip(lengths, spans)]
    keep, keep_mask = _right_aligned(keep, mask, max(lengths), len(set(lengths)) > 1)
    return Selection(keep, keep_mask, kept_masks, scores, start.stop(), attentions)


def _kept_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(..., B, L, d) -> (..., B, P, d): the rows `index` (B, P, 1) of every batch row."""
    return x.gather(-2, index.expand(*x.shape[:-3], -1, -1, x.shape[-1]))


def crop_cache(cache: Cache, keep: torch.Tensor, upto_layer: int) -> None:
    """Keep only positions `keep` (B, P) in the cache of layers 0..upto_layer (in place)."""
    index = None
    for layer in cache.layers[: upto_layer + 1]:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"PruneVid can only crop a full-attention DynamicCache, not {type(layer).__name__}"
            )
        shape = (-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        if index is None or index.shape[1::2] != layer.keys.shape[1::2]:  # built once for equal layers
            index = keep[:, None, :, None].expand(shape)
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)


def _heads(attn: torch.nn.Module, which: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's own q or k projection of x (B, n, C) as (B, heads, n, head_dim), with its
    per-head norm if the family has one (Qwen3); no RoPE."""
    states = getattr(attn, f"{which}_proj")(x).view(*x.shape[:2], -1, attn.head_dim)
    norm = getattr(attn, f"{which}_norm", None)
    if norm is not None:
        states = norm(states)
    return states.transpose(1, 2)


def _keep_all(mask: torch.Tensor | None, spans: list[VisualSpan | None], like: torch.Tensor) -> Selection:
    keep = torch.arange(like.shape[1], device=like.device).expand(like.shape[0], -1)
    kept = [None if s is None else s.index.new_ones(len(s.index), dtype=torch.bool) for s in spans]
    return Selection(keep, mask, kept, [None] * len(spans), 0.0, [None] * len(spans))


def _right_aligned(
    flags: torch.Tensor, mask: torch.Tensor | None, width: int, uneven: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The indices of each row's True flags (B, L), in order and right-aligned in `width`
    columns (the left padding points at index 0), and their mask (None when no row is padded:
    `mask` None and every row as long as `width`)."""
    if mask is None and not uneven:  # every row has `width` flags: nothing to align
        return (~flags).byte().argsort(dim=1, stable=True)[:, :width], None
    batch, length = flags.shape
    # The k-th flag from the right goes to column width - k; the others to a spare column.
    column = width - flags.flip(1).cumsum(1).flip(1)
    column = column.where(flags, width)
    index = torch.arange(length, device=flags.device).expand(batch, -1)
    keep = flags.new_zeros(batch, width + 1, dtype=torch.long).scatter_(1, column, index)[:, :width]
    real = flags.long() if mask is None else flags * mask
    return keep, real.new_zeros(batch, width + 1).scatter_(1, column, real)[:, :width]


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
    mask: torch.Tensor | None,
    cache: Cache | None,
) -> dict[str, torch.Tensor | None]:
    """The stock mask builders, one mask per layer type. `mask` None means no padding: the
    builders then read nothing back (given a mask, SDPA's reads whether it is all ones). No
    position ids: without a mask and a cache they would be read as packed sequences, and the
    kept tokens' positions have gaps."""
    kwargs = {
        "config": lm.config,
        "inputs_embeds": hidden,
        "attention_mask": mask,
        "cache": cache,
        "position_ids": None,
    }
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks
