"""Stage 1 (DPC-KNN, temporal segments, static/dynamic merging) on constructed inputs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from prunevid import PruneVidConfig, merge_tokens
from prunevid.cluster import cluster_means, dpc_knn
from prunevid.merge import make_contiguous, static_positions

EXAMPLE = Path(__file__).parent / "data" / "stage1_stage2_example.npz"
NO_NOISE = PruneVidConfig(dpc_noise=0.0)


def moving_square_video(frames=16, side=14, channels=32, seed=0):
    """Still random background tokens; a flickering 3x3 square moves one cell per frame, so
    each cell on its path holds it for three frames."""
    g = torch.Generator().manual_seed(seed)
    background = torch.randn(side, side, channels, generator=g)
    video = background.expand(frames, -1, -1, -1).clone()
    for t in range(frames):
        col = t % (side - 3)
        video[t, 5:8, col : col + 3] = 3 * torch.randn(3, 3, channels, generator=g)
    return video.reshape(frames, side * side, channels)


def test_worked_example_matches_reference_output():
    data = np.load(EXAMPLE)
    result = merge_tokens(torch.from_numpy(data["input"]), NO_NOISE)
    sizes = torch.bincount(result.segments).numpy()
    assert sizes.tolist() == data["window_sizes"].tolist()
    # Same tokens in the same order (segment, static then per-frame dynamic, cluster-label order).
    torch.testing.assert_close(result.tokens, torch.from_numpy(data["output"]), atol=1e-5, rtol=1e-5)
    first = np.cumsum([0, *sizes[:-1]])
    static = result.static[torch.from_numpy(first)].numpy()
    assert (static == data["static_masks"]).all()


def test_identical_frames_are_one_segment_and_all_static():
    frame = torch.randn(196, 16)
    result = merge_tokens(frame.expand(8, -1, -1), NO_NOISE)
    assert result.segments.unique().tolist() == [0]
    assert result.static.all()
    assert result.num_tokens == int(196 * NO_NOISE.cluster_ratio)


def test_moving_square_is_dynamic_and_background_static():
    video = moving_square_video()
    result = merge_tokens(video, NO_NOISE)
    static = result.static.view(16, 14, 14)
    for t in range(2, 9):  # cells 2..10 hold the square for three frames of any segment
        assert not static[t, 5:8, t : t + 3].any(), "the moving square must be dynamic"
    assert static[:, :4].all() and static[:, 9:].all(), "rows the square never visits are static"


def test_assignment_covers_every_token_once_and_merged_tokens_are_member_means():
    video = moving_square_video()
    result = merge_tokens(video, NO_NOISE)
    index = result.assignment
    assert index.shape == (16, 196)
    assert index.min() == 0 and index.max() == result.num_tokens - 1
    assert torch.bincount(index.flatten()).min() >= 1, "every merged token has members"
    # Each merged token is the plain mean of its members over time and space.
    members = torch.zeros(result.num_tokens, 32).index_add_(0, index.flatten(), video.reshape(-1, 32))
    counts = torch.bincount(index.flatten()).float()[:, None]
    torch.testing.assert_close(result.tokens, members / counts, atol=1e-5, rtol=1e-5)


def test_centred_similarity_ignores_a_shared_component():
    """A large component common to every token (as random or briefly trained towers give) makes
    every raw cosine high, so at tau 0.8 the moving square turns static; centring on the
    video's mean token makes the static mask blind to the shift and finds the square again;
    merged tokens stay means of the raw members."""
    video = moving_square_video()
    shift = 20 * torch.randn(32, generator=torch.Generator().manual_seed(1))
    centre = NO_NOISE.replace(centre=True)
    assert merge_tokens(video + shift, NO_NOISE).static.all(), "raw cosines: everything looks static"
    shifted, unshifted = merge_tokens(video + shift, centre), merge_tokens(video, centre)
    assert torch.equal(shifted.static, unshifted.static)
    index = shifted.assignment.flatten()
    members = torch.zeros(shifted.num_tokens, 32).index_add_(0, index, (video + shift).reshape(-1, 32))
    torch.testing.assert_close(shifted.tokens, members / torch.bincount(index)[:, None], atol=1e-4, rtol=1e-5)
    static = shifted.static.view(16, 14, 14)
    for t in range(2, 9):
        assert not static[t, 5:8, t : t + 3].any(), "the moving square is dynamic again"
    assert static[:, :4].all() and static[:, 9:].all()


def test_merged_count_falls_with_cluster_ratio():
    video = moving_square_video()
    counts = [
        merge_tokens(video, NO_NOISE.replace(cluster_ratio=r)).num_tokens for r in (1.0, 0.7, 0.5, 0.3, 0.1)
    ]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


def test_deterministic_and_seeded():
    video = torch.randn(16, 196, 24)
    config = PruneVidConfig(dpc_noise=0.5)  # large noise so the seed matters
    a, b = merge_tokens(video, config), merge_tokens(video, config)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.assignment, b.assignment)
    others = [merge_tokens(video, config.replace(seed=s)).assignment for s in range(1, 6)]
    assert any(not torch.equal(a.assignment, o) for o in others)


def test_groups_follow_output_order():
    result = merge_tokens(moving_square_video(), NO_NOISE)
    groups = result.groups
    assert (groups.diff() >= 0).all() and groups[0] == 0
    # Static tokens of a segment share a group; each frame's dynamic tokens have their own.
    frame_of = torch.full((result.num_tokens,), -1)
    static_token = torch.zeros(result.num_tokens, dtype=torch.bool)
    for t in range(16):
        frame_of[result.assignment[t][~result.static[t]]] = t
        static_token[result.assignment[t][result.static[t]]] = True
    for g in groups.unique():
        members = groups == g
        assert static_token[members].all() or (frame_of[members] == frame_of[members][0]).all()


def test_stage1_off_is_identity():
    video = torch.randn(4, 49, 8)
    result = merge_tokens(video, PruneVidConfig(stage1=False))
    assert torch.equal(result.tokens, video.reshape(-1, 8))
    assert result.segments.tolist() == [0, 1, 2, 3] and not result.static.any()
    assert result.groups.tolist() == [t for t in range(4) for _ in range(49)]


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([0, 0, 5, 1, 1, 1, 6, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2]),  # ALGORITHM.md's example
        ([3, 1, 1, 2, 2, 2], [1, 1, 1, 2, 2, 2]),  # a stretch at the start joins its only neighbour
        ([0, 0, 1, 0, 0], [0, 0, 0, 0, 0]),  # label 1 is a single frame: dropped
        ([0, 1, 2, 3], [0, 0, 0, 0]),  # everything dropped: one segment
        ([0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]),  # label 0's short run leaves, joins the run before it
        ([0, 0, 1, 1, 2, 3, 3], [0, 0, 1, 1, 1, 3, 3]),  # tie between equal neighbours: left wins
    ],
)
def test_make_contiguous(labels, expected):
    assert make_contiguous(labels) == expected


def test_segments_have_at_least_two_frames():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        video = torch.randn(16, 16, 8, generator=g) + torch.randn(16, 1, 8, generator=g) * 3
        sizes = torch.bincount(merge_tokens(video, NO_NOISE).segments)
        assert sizes.min() >= 2


def test_static_positions_match_explicit_pairwise_mean():
    frames = torch.randn(5, 30, 8)
    frames[:, :10] = frames[:1, :10] + 0.05 * torch.randn(5, 10, 8)
    got = static_positions(frames, 0.8)
    cos = torch.nn.functional.cosine_similarity
    for p in range(30):
        pairs = [cos(frames[a, p], frames[b, p], dim=0) for a in range(5) for b in range(5) if a != b]
        assert got[p] == (sum(pairs) / len(pairs) > 0.8)
    assert got[:10].all() and not got[10:].any()


def test_dpc_knn_separates_far_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    points = (centres.repeat_interleave(10, 0) + torch.randn(30, 2, generator=g)).expand(2, -1, -1)
    labels = dpc_knn(points, 3, k=5)
    for blob in labels[0].view(3, 10):
        assert (blob == blob[0]).all()
    assert labels[0].view(3, 10)[:, 0].unique().numel() == 3
    assert torch.equal(labels[0], labels[1]), "batched sets are clustered independently and alike"


def test_dpc_knn_edge_cases():
    x = torch.randn(1, 12, 4)
    assert dpc_knn(x, 1).unique().tolist() == [0]
    assert sorted(dpc_knn(x, 12)[0].tolist()) == list(range(12))
    # bf16 tokens are clustered in float32. 1-D points, exact in bf16, k=3: rho = exp(-mean d^2)
    # a .9153, b .9493, c .9345, d .9189, e .8014, f .2906; the second centre is e with
    # .8014 * .4375 = .35062 over c with .9345 * .375 = .35045, a 5e-4 margin that bf16
    # arithmetic (8-bit mantissa) rounds to a tie, which would make c the centre.
    points = torch.tensor([0.0, 0.125, 0.5, 0.75, 1.1875, 2.3125])[None, :, None]
    assert dpc_knn(points.bfloat16(), 2, k=3)[0].tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="num_clusters must be in"):
        dpc_knn(x, 13)


def test_dpc_knn_centre_ranks_on_a_hand_computed_case():
    # 1-D points a..f = 0, .1, .3, 1, 1.05, 2 with k=3 (self + 2 nearest); C=1 so D = |xi - xj|.
    # rho = exp(-mean d^2): a .9672, b .9835, c .9576, d .8486, e .8283, f .5304 (b densest).
    # delta: b -> max D = 2; a -> .1 (b); c -> .2 (b); d -> .7 (c); e -> .05 (d); f -> .95 (e).
    # rho * delta: b 1.967, d .594, f .504, c .192, a .097, e .041 -> centres b, d, f in that order.
    x = torch.tensor([[0.0], [0.1], [0.3], [1.0], [1.05], [2.0]])[None]
    assert dpc_knn(x, 2, k=3)[0].tolist() == [0, 0, 0, 1, 1, 1]  # f is nearer d (1.0) than b (1.9)
    assert dpc_knn(x, 3, k=3)[0].tolist() == [0, 0, 0, 1, 1, 2]


def test_cluster_means():
    x = torch.tensor([[[1.0], [3.0], [10.0]]])
    means = cluster_means(x, torch.tensor([[1, 1, 0]]), 2)
    assert means.flatten().tolist() == [10.0, 2.0]
