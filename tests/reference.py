"""An independent reference for PruneVid's stage 2, from the stock (unpatched) model.

Nothing here calls `prunevid.merge`, `cluster`, `budget`, `select`, `prunevid.models.decoder` or
a patched forward: stage 1 and the budget arithmetic come from tests/stage1_reference.py (itself
checked against the authors' worked example), and everything after it is written out with the
stock model's own modules and plain torch, following ALGORITHM.md §4.5 and §5:

* `logical_prompt`: the prompt as the language model sees it after stage 1 (text, merged
  tokens in the video's place, their positions: 1-D renumbered for LLaVA-OneVision, the stock
  3-D position of each merged token's first member for Qwen-VL);
* `stage2_reference`: the input of `selected_layer` from the stock model (stage 1 off: the whole
  stock model on the stock inputs; on: the stock language model on the merged embeddings), that
  layer's input norm and q/k projections (+ q_norm/k_norm), grouped-query repeat, softmax of
  the question rows over all prompt keys in float32, max over heads and rows, then the budget
  of §5.4 per stage-1 set (under `config.retention`: the final count shared among the sets by
  the reference's own largest remainder);
* `slow_logits`: a full recomputation without a cache in which the pruned tokens stay in the
  sequence and are only masked out as keys (after `selected_layer`, and for generated tokens in
  every layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from stage1_reference import Stage1, keep_top, stage1_reference, stage2_counts

from prunevid import PruneVidConfig


@dataclass
class Prompt:
    """One prompt after stage 1, without stage 2.

    embeds: (n, C); positions: (1, n) or (3, n); visual: (M,) row of each merged token, in
    merged-token order; groups: (M,) its stage-2 budget set; question_start: first row after the
    video; deepstack: per deepstack layer (n, C), zero outside the visual rows (Qwen3-VL);
    next_position: (1, 1) or (3, 1) position of the first generated token; stage1: the
    reference's stage-1 record; num_visual: the video's T * N tokens before stage 1.
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    visual: torch.Tensor
    groups: torch.Tensor
    question_start: int
    deepstack: list[torch.Tensor]
    next_position: torch.Tensor
    stage1: Stage1
    num_visual: int


def is_qwen(model) -> bool:
    return model.config.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def budget_sets(assignment: torch.Tensor, static: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """ALGORITHM.md §5.4's sets, from stage 1's record: a merged token of static members belongs
    to its segment's static set, one of dynamic members to its frame's set. (T, N) x2, (T,) -> (M,)."""
    num_merged = int(assignment.max()) + 1
    frames = torch.arange(assignment.shape[0])[:, None].expand_as(assignment)
    keys = {}
    groups = torch.empty(num_merged, dtype=torch.long)
    for m in range(num_merged):
        t, n = (assignment == m).nonzero()[0].tolist()
        key = ("static", int(segments[t])) if static[t, n] else ("frame", int(frames[t, n]))
        groups[m] = keys.setdefault(key, len(keys))
    return groups


def stock_positions(model, inputs) -> torch.Tensor:
    """Qwen-VL's get_rope_index on the unpruned prompt (batch row 0): (3, L)."""
    timing = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"], **timing
    )
    return positions[:, 0]


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    edges = torch.diff(F.pad(flags.long(), (1, 1))).nonzero().squeeze(1).tolist()
    return list(zip(edges[::2], edges[1::2]))


@torch.no_grad()
def logical_prompt(model, inputs, config: PruneVidConfig) -> Prompt:
    """The stage-1 prompt of a one-row, unpadded `inputs`."""
    inner = model.model
    embed = inner.language_model.embed_tokens
    ids = inputs["input_ids"][0]
    is_video = ids == model.config.video_token_id
    if is_qwen(model):
        t, h, w = (int(v) for v in inputs["video_grid_thw"][0])
        merge_size = model.config.vision_config.spatial_merge_size
        grid = (h // merge_size, w // merge_size)
        encoded = inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        features, suffix = encoded.pooler_output[0], 0
        deepstack = [layer[0] for layer in getattr(encoded, "deepstack_features", None) or []]
        positions = stock_positions(model, inputs)
        next_position = positions[:, -1:] + 1  # decoding continues from the unpruned rope delta
    else:
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        grid = ((side + 1) // 2, (side + 1) // 2)
        t = int(is_video.sum() - 1) // (grid[0] * grid[1])
        features = inner.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output[0]
        suffix, deepstack, positions = 1, [], None  # the trailing newline token stays

    per_frame = grid[0] * grid[1]
    merge = stage1_reference(features[: t * per_frame].view(t, per_frame, -1), config)
    num_merged = len(merge.tokens)
    assignment = merge.assignment.flatten()
    first_member = torch.stack([(assignment == m).nonzero()[0, 0] for m in range(num_merged)])
    members = F.one_hot(assignment, num_merged).T.to(features.dtype)  # (M, T * N)
    deepstack = [members @ x / members.sum(1, keepdim=True) for x in deepstack]

    # Walk the prompt: text stays; each run of placeholders (one, or one per frame) takes the
    # merged tokens whose first member lies in its frame, then keeps its suffix (LLaVA's newline).
    runs = _runs(is_video)
    run_of = torch.zeros_like(first_member) if len(runs) == 1 else first_member // per_frame
    pieces, rows, visual, order, cursor, length = [], [], [], [], 0, 0
    video_positions = None if positions is None else positions[:, is_video]
    for r, (start, end) in enumerate(runs):
        mine = (run_of == r).nonzero().squeeze(1)
        tail = suffix if r == len(runs) - 1 else 0
        pieces += [embed(ids[cursor:start]), merge.tokens[mine], features[len(features) - tail :]]
        if positions is not None:
            rows += [positions[:, cursor:start], video_positions[:, first_member[mine]]]
        length += start - cursor
        visual.append(torch.arange(length, length + len(mine)))
        order.append(mine)
        length += len(mine) + tail
        cursor = end
    pieces.append(embed(ids[cursor:]))
    embeds = torch.cat(pieces)
    if positions is None:
        positions = torch.arange(len(embeds))[None]
        next_position = torch.tensor([[len(embeds)]])
    else:
        positions = torch.cat([*rows, positions[:, cursor:]], dim=1)
    visual, order = torch.cat(visual), torch.cat(order)
    assert torch.equal(order, torch.arange(num_merged)), "merged tokens enter in their own order"
    full = []
    for x in deepstack:
        row = embeds.new_zeros(embeds.shape)
        row[visual] = x
        full.append(row)
    return Prompt(
        embeds=embeds,
        positions=positions,
        visual=visual,
        groups=merge.groups,
        question_start=length,
        deepstack=full,
        next_position=next_position,
        stage1=merge,
        num_visual=t * per_frame,
    )


@torch.no_grad()
def selected_layer_input(model, inputs, prompt: Prompt, config: PruneVidConfig) -> torch.Tensor:
    """The hidden state entering `selected_layer` in the stock model: (n, C).

    Captured with a forward pre-hook rather than `output_hidden_states`, because Qwen3-VL
    records each layer's output before its deepstack features are added, i.e. not the next
    layer's input.
    """
    assert not hasattr(model.model, "_prunevid"), "the reference needs the stock, unpatched model"
    lm = model.model.language_model
    seen = []
    hook = lm.layers[config.selected_layer].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        if not config.stage1:
            model(**inputs)  # the whole stock model on the stock inputs
        else:
            extra = {}
            if prompt.deepstack:
                is_visual = torch.zeros(len(prompt.embeds), dtype=torch.bool)
                is_visual[prompt.visual] = True
                extra = {
                    "visual_pos_masks": is_visual[None],
                    "deepstack_visual_embeds": [x[is_visual] for x in prompt.deepstack],
                }
            positions = prompt.positions[:, None] if prompt.positions.shape[0] == 3 else prompt.positions
            lm(inputs_embeds=prompt.embeds[None], position_ids=positions, **extra)
    finally:
        hook.remove()
    return seen[0][0]


@torch.no_grad()
def stage2_reference(model, inputs, config: PruneVidConfig) -> tuple[torch.Tensor, torch.Tensor, Prompt]:
    """Scores (M,) and kept mask (M,) of the merged tokens, and the prompt they belong to."""
    prompt = logical_prompt(model, inputs, config)
    hidden = selected_layer_input(model, inputs, prompt, config)
    assert hidden.shape == prompt.embeds.shape
    layer = model.model.language_model.layers[config.selected_layer]
    text = model.config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x[prompt.question_start :]).view(-1, heads, dim)  # (nq, H, d)
    k = attn.k_proj(x).view(-1, kv_heads, dim)  # (n, Hkv, d)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm of queries and keys, before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    k = k.repeat_interleave(heads // kv_heads, dim=1)  # query head h reads key head h // (H / Hkv)
    weights = torch.einsum("qhd,khd->hqk", q.float(), k.float()).div(dim**0.5).softmax(-1)
    scores = weights.amax(dim=(0, 1))[prompt.visual]
    kept = keep_top(scores, prompt.groups, stage2_counts(prompt.groups, config, prompt.num_visual))
    return scores, kept, prompt


def patched_kept(trace) -> tuple[torch.Tensor, torch.Tensor]:
    """The patched model's kept mask and scores per merged token, read off its trace: (M,) x2."""
    index = torch.from_numpy(trace.merged_index.reshape(-1))
    kept = torch.zeros(trace.num_after_stage1, dtype=torch.bool)
    kept[index[torch.from_numpy(trace.kept.reshape(-1))]] = True
    scores = torch.zeros(trace.num_after_stage1)
    scores[index] = torch.from_numpy(trace.score.reshape(-1)).float()
    return kept, scores


@torch.no_grad()
def slow_logits(model, prompt: Prompt, config: PruneVidConfig, kept: torch.Tensor, new_tokens) -> list:
    """Logits (vocab,) of each generated step, recomputed from scratch without a cache: every
    token stays in the sequence, the pruned visual tokens (`kept` False) are masked out as keys in
    the layers after `selected_layer` and, for generated tokens, in every layer."""
    lm = model.model.language_model
    n_prompt = len(prompt.embeds)
    keep = torch.ones(n_prompt, dtype=torch.bool)
    keep[prompt.visual] = kept if config.stage2 else True
    logits = []
    for step in range(len(new_tokens)):
        hidden = torch.cat([prompt.embeds, lm.embed_tokens(new_tokens[:step])])[None]
        n = hidden.shape[1]
        generated = prompt.next_position + torch.arange(step)
        positions = torch.cat([prompt.positions, generated], dim=1)
        positions = positions[:, None] if positions.shape[0] == 3 else positions  # (3, 1, n) or (1, n)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        key_kept = torch.cat([keep, torch.ones(step, dtype=torch.bool)])
        late, early = causal & key_kept, causal.clone()
        early[n_prompt:] &= key_kept
        rotary = lm.rotary_emb(hidden, positions)
        for i, layer in enumerate(lm.layers):
            mask = (early if i <= config.selected_layer else late)[None, None]
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary)
            if i < len(prompt.deepstack):
                hidden = hidden + F.pad(prompt.deepstack[i], (0, 0, 0, step))
        logits.append(model.lm_head(lm.norm(hidden))[0, -1])
    return logits
