"""Stage-2 selection rules and config validation."""

from pathlib import Path

import numpy as np
import pytest
import torch

from prunevid import PruneVidConfig, merge_tokens
from prunevid.select import keep_by_budget, keep_counts, question_attention, visual_scores

EXAMPLE = Path(__file__).parent / "data" / "stage1_stage2_example.npz"


def test_budget_matches_worked_example():
    data = np.load(EXAMPLE)
    merged = merge_tokens(torch.from_numpy(data["input"]), PruneVidConfig(dpc_noise=0.0))
    scores = visual_scores(torch.from_numpy(data["stage2_attn"])[0])
    counts = keep_counts(merged.groups, PruneVidConfig(alpha=0.4), 16 * 196)
    keep = keep_by_budget(scores, merged.groups, counts)
    assert keep.tolist() == data["stage2_keep_idx_sorted"].tolist()


def test_budget_per_set_with_floor_of_one():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7])
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 2])
    # set 0: int(0.4 * 5) = 2 -> indices 1 (0.9) and 4 (0.8); sets 1 and 2 keep their one token
    counts = keep_counts(groups, PruneVidConfig(alpha=0.4), 7)
    assert counts.tolist() == [2, 1, 1]
    assert keep_by_budget(scores, groups, counts).tolist() == [1, 4, 5, 6]


def test_budget_ties_keep_the_lower_index():
    assert keep_by_budget(torch.ones(5), torch.zeros(5, dtype=torch.long), torch.tensor([2])).tolist() == [
        0,
        1,
    ]


def test_question_attention_grouped_query_matches_explicit_loop():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 3, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    got = question_attention(q, k)
    for h in range(6):
        logits = q[h] @ k[h // 3].T / 8**0.5
        torch.testing.assert_close(got[h], logits.softmax(-1))
    assert torch.allclose(got.sum(-1), torch.ones(6, 3))
    with pytest.raises(ValueError, match="not a multiple"):
        question_attention(torch.randn(5, 3, 8), k)


def test_defaults_are_the_papers():
    c = PruneVidConfig()
    assert (
        c.tau,
        c.temporal_segment_ratio,
        c.cluster_ratio,
        c.k,
        c.selected_layer,
        c.alpha,
        c.num_frames,
    ) == (
        0.8,
        0.25,
        0.5,
        7,
        10,
        0.4,
        16,
    )
    assert c.stage1 and c.stage2 and c.dpc_noise == 1e-6 and c.spatial_merge_threshold == 14


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("alpha", 0.0, r"alpha must be in \(0, 1\], got 0.0"),
        ("alpha", 1.5, r"alpha must be in \(0, 1\], got 1.5"),
        ("tau", 2.0, r"tau must be in \[-1, 1\], got 2.0"),
        ("cluster_ratio", -0.1, r"cluster_ratio must be in \(0, 1\]"),
        ("temporal_segment_ratio", 0.0, r"temporal_segment_ratio must be in \(0, 1\]"),
        ("k", 0, r"k must be in \[1, inf\)"),
        ("k", 2.5, r"k must be an integer in \[1, inf\)"),
        ("num_frames", 0, r"num_frames must be in \[1, 1024\]"),
        ("selected_layer", -1, r"selected_layer must be in \[0, inf\)"),
        ("dpc_noise", float("nan"), r"dpc_noise must be a number"),
        ("stage1", "yes", r"stage1 must be True or False"),
        ("centre", 1, r"centre must be True or False"),
        ("alpha", "0.4", r"alpha must be a number"),
    ],
)
def test_bad_config_names_field_and_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        PruneVidConfig(**{field: value})


def test_from_dict_rejects_unknown_fields():
    assert PruneVidConfig.from_dict({"alpha": 0.3}).alpha == 0.3
    with pytest.raises(ValueError, match="unknown PruneVidConfig field"):
        PruneVidConfig.from_dict({"alpah": 0.3})


def test_cli_flags_cover_every_knob():
    import argparse

    from prunevid.cli import add_config_arguments, config_from_arguments

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    base = PruneVidConfig()
    assert config_from_arguments(parser.parse_args([]), base) == base
    args = parser.parse_args(["--tau", "0.9", "--centre", "--no-stage2", "--num-frames", "8"])
    assert config_from_arguments(args, base) == base.replace(tau=0.9, centre=True, stage2=False, num_frames=8)
    on = base.replace(centre=True)
    assert config_from_arguments(parser.parse_args(["--no-centre"]), on).centre is False
