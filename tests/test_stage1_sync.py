"""Stage 1 and stage 2's selection on a GPU budget: counted on the CPU with `HostProbe`.

DESIGN.md "On a GPU: no host stalls": stage 1 reads back the temporal labels and, in the
paper's mode, one transfer of the sets' sizes; under a retention nothing else. Its work does not
grow with the frame count (no loop over frames, segments or clusters). Stage 2's selection reads
nothing when the host already knows the sets' sizes.
"""

from __future__ import annotations

import pytest
import torch

from prunevid import PruneVidConfig, merge_tokens
from prunevid.bench.probe import HostProbe
from prunevid.cluster import dpc_knn, dpc_knn_sets
from prunevid.select import keep_by_budget, keep_counts, kept_total, question_guided


def scenes(frames: int, tokens: int = 196, channels: int = 16, seed: int = 0) -> torch.Tensor:
    """Four scenes cut apart; in each, half the positions hold a still background and the other
    half move (new content every frame): every part of stage 1 has work to do."""
    g = torch.Generator().manual_seed(seed)
    video = torch.empty(frames, tokens, channels)
    for scene in torch.arange(frames).tensor_split(4):
        background = 3 * torch.randn(tokens, channels, generator=g)
        video[scene] = background + 0.05 * torch.randn(len(scene), tokens, channels, generator=g)
        moving = torch.randperm(tokens, generator=g)[: tokens // 2]
        video[scene[:, None], moving] = 3 * torch.randn(len(scene), len(moving), channels, generator=g)
    return video


def probe_merge(frames: int, config: PruneVidConfig):
    video = scenes(frames)
    with HostProbe() as probe:
        merge = merge_tokens(video, config)
    return probe, merge


@pytest.mark.parametrize(
    ("config", "allowed"),
    [(PruneVidConfig(), 2), (PruneVidConfig(retention=0.1), 1)],
    ids=["paper", "budget"],
)
def test_stage1_reads_back_at_most_what_the_shapes_need_and_does_not_grow_with_frames(config, allowed):
    short, _ = probe_merge(8, config)
    long, merge = probe_merge(32, config)
    # The content exercises every step: four segments, static and dynamic sets, clustering.
    assert merge.segments.max() == 3
    assert merge.static.any() and not merge.static.all()
    assert merge.num_tokens < 32 * 196 * 0.6
    for probe in (short, long):
        assert probe.reads <= allowed, dict(probe.reads_by_op)
    assert long.ops <= 1.25 * short.ops, (short.ops, long.ops)


def test_the_paper_mode_carries_the_set_sizes_and_budget_mode_keeps_them_on_the_device():
    _, paper = probe_merge(32, PruneVidConfig())
    assert paper.set_sizes == torch.bincount(paper.groups).tolist()
    _, budget = probe_merge(32, PruneVidConfig(retention=0.1))
    assert budget.set_sizes is None


@pytest.mark.parametrize("retention", [None, 0.1, 0.01, 0.0005])
def test_stage2_counts_and_selection_read_nothing_when_the_sizes_are_known(retention):
    config = PruneVidConfig(retention=retention)
    merge = merge_tokens(scenes(16), config)
    num_visual = 16 * 196
    expected = keep_counts(merge.groups, config, num_visual)  # counted on the host: one read
    scores = torch.rand(merge.num_tokens, generator=torch.Generator().manual_seed(1))
    attention = scores[None, None]  # (1, 1, M): visual_scores gives `scores` back
    with HostProbe() as probe:
        counts = keep_counts(merge.groups, config, num_visual, num_sets=len(merge.groups))
        total = kept_total(config, num_visual, merge.num_tokens, merge.set_sizes)
        kept = keep_by_budget(scores, merge.groups, counts, total)
        _, mask = question_guided(attention, merge.groups, counts)
    assert probe.reads == 0, dict(probe.reads_by_op)
    # Device counts are padded with empty sets past the last one.
    assert counts[: len(expected)].tolist() == expected.tolist() and counts[len(expected) :].sum() == 0
    assert total == int(expected.sum())
    assert torch.equal(kept, keep_by_budget(scores, merge.groups, expected))
    assert torch.equal(mask.nonzero().squeeze(1), kept)


def test_kept_total_is_unknown_in_the_paper_mode_without_the_sizes():
    assert kept_total(PruneVidConfig(), 400, 100) is None
    assert kept_total(PruneVidConfig(alpha=0.4), 400, 100, [50, 30, 2, 1]) == 20 + 12 + 1 + 1
    assert kept_total(PruneVidConfig(retention=0.5), 400, 100) == 100  # no more than there are


def test_sets_of_different_sizes_cluster_in_one_call_as_each_would_alone():
    g = torch.Generator().manual_seed(0)
    sizes = [1, 3, 7, 20, 25, 26, 40, 60]  # both sides of cdist's direct / matrix-product switch
    clusters = [1, 2, 3, 5, 25, 9, 1, 60]
    sets = [torch.randn(n, 8, generator=g).round(decimals=1) for n in sizes]  # ties in distance
    noise = [1e-6 * torch.rand(n, generator=g) for n in sizes]
    padded = torch.zeros(len(sizes), 60, 8)
    padded_noise = torch.zeros(len(sizes), 60)
    for i, (x, u) in enumerate(zip(sets, noise)):
        padded[i, : len(x)], padded_noise[i, : len(u)] = x, u
    padded[0, 1:] = 100.0  # padding must be ignored, whatever it holds
    with HostProbe() as probe:
        labels = dpc_knn_sets(padded, torch.tensor(sizes), torch.tensor(clusters), 7, padded_noise).labels
    assert probe.reads == 0
    for i, (x, u, k) in enumerate(zip(sets, noise, clusters)):
        alone = dpc_knn(x[None], k, 7, u[None])[0]
        assert torch.equal(labels[i, : len(x)], alone), i
        assert sorted(set(alone.tolist())) == list(range(k))


def test_padded_distances_are_bit_equal_to_each_set_alone():
    # torch.cdist switches from direct differences to a matrix product above 25 tokens; the two
    # differ in the last bits, and those bits decide DPC ties: a padded set must get its own.
    from prunevid.cluster import _distances

    g = torch.Generator().manual_seed(2)
    sizes = [2, 24, 25, 26, 50]
    padded = torch.randn(len(sizes), 50, 16, generator=g)
    dist = _distances(padded, torch.tensor(sizes))
    for i, n in enumerate(sizes):
        alone = torch.cdist(padded[i : i + 1, :n], padded[i : i + 1, :n])[0]
        assert torch.equal(dist[i, :n, :n], alone), n
