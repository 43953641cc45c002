"""scripts/train_tiny.py's training layouts: a video shortened by stage 1 and token dropout still
has one placeholder per visual token, keeps its supervised answers, and its merged tokens are
the ones the patched model would give the language model."""

import importlib.util
from pathlib import Path

import pytest
import torch

from prunevid.accuracy import WEIGHTS
from prunevid.merge import merge_tokens
from prunevid.synthetic import TRAIN_SEED_START

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny.py"


@pytest.fixture(scope="module")
def train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trainer(train_tiny, out: Path, merge: float, drop: float):
    args = train_tiny.parse(
        ["--out", str(out), "--init", str(WEIGHTS), "--merge-prob", str(merge), "--drop-prob", str(drop)]
    )
    return train_tiny.Trainer(args)


@torch.no_grad()
@pytest.mark.parametrize("drop", [0.0, 1.0])
def test_shortened_videos_keep_their_layout(train_tiny, tmp_path, drop):
    run = trainer(train_tiny, tmp_path, merge=1.0, drop=drop)
    seeds = [TRAIN_SEED_START + i for i in range(3)]
    batch = run.batch(seeds)
    video = run.features(batch["pixels"])
    ids, labels, mask, tokens = run.merged(
        batch["ids"], batch["labels"], video, batch["merge"], batch["drop"]
    )
    placeholder = run.ids["<video>"]
    assert int((ids == placeholder).sum()) == len(tokens) < int((batch["ids"] == placeholder).sum())
    assert mask.sum(1).tolist() == [int(r.ne(run.tokenizer.pad_token_id).sum()) for r in ids]
    for b in range(len(seeds)):  # the same answers are supervised, in the same order
        assert (
            labels[b][labels[b] != -100].tolist() == batch["labels"][b][batch["labels"][b] != -100].tolist()
        )
    counts = (ids == placeholder).sum(1).tolist()
    first = tokens[: counts[0]]  # video 0's tokens, its trailing newline last
    assert torch.equal(first[-1], video[0, -1])
    frames = video[0, :-1].view(run.args.frames, -1, video.shape[-1])
    merged = merge_tokens(frames, batch["merge"][0], run.grid).tokens
    if drop == 0.0:  # exactly what stage 1 hands the language model
        torch.testing.assert_close(first[:-1], merged, atol=1e-5, rtol=1e-5)
    else:  # an ordered subset of it
        assert len(first) - 1 < len(merged)
        matches = torch.cdist(first[:-1], merged).argmin(1)
        assert torch.equal(matches, matches.sort().values) and matches.unique().numel() == len(matches)


@torch.no_grad()
def test_late_dropout_forward(train_tiny, tmp_path):
    """The layer-by-layer forward equals the stock one when it hides nothing; hiding tokens from
    the late layers changes only what comes after them."""
    run = trainer(train_tiny, tmp_path, merge=0.0, drop=0.0)
    run.model.eval()
    batch = run.batch([TRAIN_SEED_START + i for i in range(2)])
    video = run.features(batch["pixels"])
    ids, mask = batch["ids"], batch["mask"]
    stock = run.hidden(ids, mask, video)
    nothing = torch.zeros_like(ids, dtype=torch.bool)
    torch.testing.assert_close(run.hidden(ids, mask, video, nothing), stock, atol=1e-5, rtol=1e-5)
    hidden = nothing.clone()
    visual = (ids[0] == run.ids["<video>"]).nonzero().squeeze(1)
    hidden[0, visual[:100]] = True
    late = run.hidden(ids, mask, video, hidden)
    first_hidden = int(visual[0])
    torch.testing.assert_close(late[:, :first_hidden], stock[:, :first_hidden])  # causal: before them
    torch.testing.assert_close(late[1], stock[1])  # the other video
    assert not torch.allclose(late[0, -10:], stock[0, -10:], atol=1e-4)  # the answers see fewer tokens


@torch.no_grad()
def test_videos_without_merge_or_dropout_pass_unchanged(train_tiny, tmp_path):
    run = trainer(train_tiny, tmp_path, merge=0.0, drop=0.0)
    batch = run.batch([TRAIN_SEED_START + i for i in range(2)])
    video = run.features(batch["pixels"])
    ids, labels, mask, tokens = run.merged(
        batch["ids"], batch["labels"], video, batch["merge"], batch["drop"]
    )
    assert torch.equal(ids, batch["ids"]) and torch.equal(labels, batch["labels"])
    assert torch.equal(mask, batch["mask"]) and torch.equal(tokens, video.flatten(0, 1))
