import argparse

import numpy as np
import pytest

from prunevid import accuracy
from prunevid.bench import accuracy as bench_accuracy
from prunevid.synthetic import (
    ANSWERS,
    FAMILIES,
    QUESTIONS,
    TRAIN_SEED_START,
    cell_labels,
    make_sample,
)
from prunevid.testing import tiny_tokenizer


def test_same_seed_gives_identical_bytes_and_answers():
    a, b = make_sample(123), make_sample(123)
    assert a.frames.tobytes() == b.frames.tobytes()
    assert a.questions == b.questions
    assert make_sample(124).frames.tobytes() != a.frames.tobytes()


def test_frames_shape_and_dtype():
    sample = make_sample(7, num_frames=8, size=96)
    assert sample.frames.shape == (8, 96, 96, 3)
    assert sample.frames.dtype == np.uint8
    assert sample.object_map.shape == (8, 96, 96)


def test_every_family_appears_with_valid_answers():
    for seed in range(20):
        sample = make_sample(seed)
        assert [f for f, _, _ in sample.questions] == list(FAMILIES)
        for family, question, answer in sample.questions:
            assert question == QUESTIONS[family]
            assert answer in ANSWERS[family]


def test_answers_vary_over_seeds():
    samples = [make_sample(seed) for seed in range(200)]
    for family in FAMILIES:
        seen = {s.answer(family) for s in samples}
        assert len(seen) >= 2, family


def test_questions_and_answers_are_in_the_tokenizer_vocabulary():
    vocab = tiny_tokenizer().get_vocab()
    for family in FAMILIES:
        for word in QUESTIONS[family].split() + list(ANSWERS[family]):
            assert word in vocab, word


def test_scene_answer_matches_background_switch():
    for seed in range(30):
        sample = make_sample(seed)
        changed = len(set(sample.background.tolist())) > 1
        assert sample.answer("scene") == ("yes" if changed else "no")


def test_newcomers_appear_after_the_first_frame_and_static_objects_do_not_move():
    for seed in range(30):
        sample = make_sample(seed)
        for obj in sample.objects:
            if obj.role == "newcomer":
                assert not obj.visible[0] and obj.visible[-1]
            if obj.role != "moving":
                assert np.ptp(obj.centres, axis=0).max() == 0


def test_cell_labels_mark_the_objects():
    sample = make_sample(3)
    labels = cell_labels(sample, (6, 6))
    assert labels["colour"].shape == (8, 6, 6)
    assert (labels["colour"] > 0).any(axis=(1, 2)).all()
    assert (labels["colour"] == 0).any()


def test_evaluation_refuses_training_seeds():
    """Held-out accuracy never scores a video the tiny model may have been trained on."""
    parser = argparse.ArgumentParser()
    bench_accuracy.add_arguments(parser)
    args = parser.parse_args(["--seed-start", str(TRAIN_SEED_START - 10), "--num-videos", "11"])
    with pytest.raises(ValueError, match=f"evaluation seeds must stay below {TRAIN_SEED_START}"):
        bench_accuracy.run(args)
    assert accuracy.CALIBRATION_SEED >= TRAIN_SEED_START, "the preset is calibrated on training seeds"


@pytest.mark.parametrize("bad", [dict(num_frames=2), dict(size=16)])
def test_rejects_too_small_videos(bad):
    with pytest.raises(ValueError):
        make_sample(0, **bad)
