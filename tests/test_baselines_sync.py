"""The baselines ask nothing of the host on a GPU (DESIGN.md "On a GPU: no host stalls"): no value
read back, no upload, and a number of aten ops (kernel launches) that does not grow with the
frames. Checked on the CPU with `HostProbe`, and on the meta device, where tensors have shapes but
no values, so any read fails and any tensor made on another device is refused."""

from __future__ import annotations

import pytest
import torch

from prunevid import PruneVidConfig
from prunevid.baselines import METHODS, _runs, fastv, grid_cells, random_tokens, uniform_pool
from prunevid.bench.probe import HostProbe

GRID = (14, 14)  # 196 tokens a frame, as LLaVA-OneVision's
BASELINES = ["uniform", "evs", "dycoke", "fastv", "random"]


def probe_method(name: str, frames: int, retention: float, device: str = "cpu") -> HostProbe:
    """Run a baseline on `frames` frames of random tokens under `retention`, inside a probe."""
    method = METHODS[name]
    generator = torch.Generator().manual_seed(frames)
    num_visual = frames * GRID[0] * GRID[1]
    if method.reduce is not None:
        features = torch.randn(frames, GRID[0] * GRID[1], 16, generator=generator).to(device)
        config = method.configure(PruneVidConfig(retention=retention))
        with HostProbe() as probe:
            out = method.reduce(features, config, GRID).tokens
    else:
        attention = torch.rand(4, 6, num_visual, generator=generator).to(device)
        groups = (torch.arange(num_visual) // (GRID[0] * GRID[1])).to(device)
        counts = torch.full((frames,), round(retention * GRID[0] * GRID[1])).to(device)
        with HostProbe() as probe:
            out = method.select(attention, groups, counts)[1]
    assert out.device.type == device
    return probe


@pytest.mark.parametrize("retention", [0.25, 0.02])  # above and below one frame's tokens at 8 frames
@pytest.mark.parametrize("name", BASELINES)
def test_a_baseline_reads_nothing_back_and_its_ops_do_not_grow_with_frames(name, retention):
    short, long = probe_method(name, 8, retention), probe_method(name, 32, retention)
    for probe in (short, long):
        assert probe.reads == 0, dict(probe.reads_by_op)
        assert probe.uploads == 0, dict(probe.uploads_by_op)
    assert long.ops <= 1.25 * short.ops, (short.ops, long.ops)


@pytest.mark.parametrize("retention", [0.5, 0.1, 0.001])
@pytest.mark.parametrize("name", BASELINES)
def test_a_baseline_runs_on_shapes_alone(name, retention):
    """On the meta device every count must come from the shapes and the retention."""
    probe_method(name, 8, retention, device="meta")


def test_runs_cut_like_tensor_split():
    for length in range(1, 30):
        for parts in range(1, length + 4):
            runs = torch.tensor_split(torch.arange(length), parts)
            expected = torch.cat([torch.full((len(r),), i) for i, r in enumerate(runs)])
            assert torch.equal(_runs(length, parts), expected), (length, parts)


def test_in_llm_rules_break_ties_towards_the_lower_index():
    attention = torch.full((2, 3, 200), 0.001)
    attention[:, -1, ::7] = 0.004  # the last row's 29 favourites, then 171 equal scores
    groups, counts = torch.zeros(200, dtype=torch.long), torch.tensor([30, 10])
    lowest_others = [i for i in range(200) if i % 7][:11]
    expected = sorted(list(range(0, 200, 7)) + lowest_others)
    assert fastv(attention, groups, counts)[1].nonzero().squeeze(1).tolist() == expected
    assert random_tokens(attention, groups, torch.tensor([250]))[1].all(), (
        "a count above the tokens keeps them all"
    )
    assert not fastv(attention, groups, torch.tensor([0, 0]))[1].any()


def test_uniform_pooling_gives_the_earlier_frames_the_extra_cells():
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(3, 16, 8, generator=generator)
    merge = uniform_pool(features, PruneVidConfig(retention=7 / 48, stage2=False), (4, 4))
    # 7 tokens over 3 frames: 3, 2, 2 cells, numbered on from the frames before.
    three, two = grid_cells((4, 4), 3), grid_cells((4, 4), 2)
    assert torch.equal(merge.assignment, torch.stack([three, two + 3, two + 5]))
    for frame, cells, start in [(0, three, 0), (1, two, 3), (2, two, 5)]:
        for cell in range(int(cells.max()) + 1):
            torch.testing.assert_close(merge.tokens[start + cell], features[frame, cells == cell].mean(0))
    assert merge.groups.tolist() == [0, 0, 0, 1, 1, 2, 2] and not merge.static.any()
