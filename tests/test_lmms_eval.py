"""The lmms-eval model plugin (`--model prunevid`) on the shipped offline tasks, tiny model.

Needs the `eval` extra (lmms-eval); skipped without it. CI runs this file on its own in
`.ci/eval`. The tiny model is random, so its scores are meaningless: what is checked is that
every way of computing them agrees, answer by answer.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import string
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "lmms_eval.evaluator", reason="lmms-eval is not installed (pip install -e .[eval]; CI: .ci/eval)"
)

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.models import get_model
from lmms_eval.tasks import TaskManager

import prunevid
from prunevid.api import family_of
from prunevid.eval_tasks import tasks_path
from prunevid.integrations import lmms_eval as plugin
from prunevid.pipeline import PRESETS, answer, encode_video, load_model, preset
from prunevid.video import load_video

QA, MC = "prunevid_synth_qa", "prunevid_synth_mc"
LIMIT = 13  # odd on purpose: two ranks get 7 and 6 documents (lmms-eval pads the shorter one)
MAX_NEW_TOKENS = 8  # prunevid_synth_qa's generation_kwargs
VIDEOS = tasks_path() / "prunevid_synth" / "videos"
# The offline models of every family the plugin is checked on (stock equality, scoring).
FAMILIES = [name for name in ("tiny", "tiny-qwen") if name in PRESETS]


@pytest.fixture(scope="module", autouse=True)
def offline_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
        yield


@pytest.fixture(scope="module")
def task_manager() -> TaskManager:
    return TaskManager(include_path=str(tasks_path()), model_name="prunevid")


@pytest.fixture(scope="module")
def one_process(task_manager) -> dict:
    """Both offline tasks in this process (simple class: multiple choice needs it)."""
    return simple_evaluate(
        model="prunevid",
        model_args="pretrained=tiny",
        tasks=[QA, MC],
        limit=LIMIT,
        log_samples=True,
        force_simple=True,
        task_manager=task_manager,
    )


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    lines = (tasks_path() / "prunevid_synth" / "test.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:LIMIT]]


def _by_doc(samples: list[dict]) -> dict[int, dict]:
    return {s["doc_id"]: s for s in samples}


def _normalise(text: str) -> str:
    return text.lower().translate(str.maketrans("", "", string.punctuation)).strip()


# ---- registration and arguments ------------------------------------------------------------


def test_entry_point_registers_both_classes():
    assert get_model("prunevid") is plugin.PruneVidChat
    assert get_model("prunevid", force_simple=True) is plugin.PruneVid


def test_model_args_are_checked():
    with pytest.raises(ValueError, match="unknown prunevid model_args: alhpa"):
        plugin.PruneVid(pretrained="tiny", alhpa=0.4)
    with pytest.raises(ValueError, match="batch_size must be 1"):
        plugin.PruneVid(pretrained="tiny", batch_size=4)
    with pytest.raises(ValueError, match="alpha"):
        plugin.PruneVid(pretrained="tiny", alpha=1.5)


def test_model_args_reach_the_config():
    lm = plugin.PruneVid.create_from_arg_string("pretrained=tiny,alpha=0.25,stage1=false,num_frames=8,tau=1")
    assert lm.config == preset("tiny", lm.loaded.num_layers).replace(
        alpha=0.25, stage1=False, num_frames=8, tau=1
    )
    assert lm.prune and lm.world_size == 1
    assert lm.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_a_baseline_at_a_budget_from_model_args(docs):
    """`method=evs,retention=0.1`: EVS-style pruning to exactly 10% of the tokens, logged per request."""
    lm = plugin.PruneVid.create_from_arg_string("pretrained=tiny,method=evs,retention=0.1")
    assert lm.config.retention == 0.1 and lm.method == "evs"
    result = lm.respond(docs[0]["question"], str(VIDEOS / docs[0]["video"]), {"max_new_tokens": 2})
    log = result.token_counts.prunevid
    assert log["method"] == "evs" and log["retention_target"] == 0.1
    assert log["after_stage2"] == round(0.1 * log["visual_tokens"])
    with pytest.raises(ValueError, match="unknown method 'tome'"):
        plugin.PruneVid(pretrained="tiny", method="tome")


def test_task_text_and_chat_messages_become_one_question_and_video():
    assert plugin.question_text(" <video>\nwhat ? ") == "what ?"
    turn = {
        "role": "user",
        "content": [{"type": "video", "url": "a.mp4"}, {"type": "text", "text": "what ?"}],
    }
    assert plugin.chat_question([turn]) == ("what ?", "a.mp4")
    text_only = {"role": "user", "content": [{"type": "text", "text": "and now ?"}]}
    assert plugin.chat_question([text_only], fallback_video="a.mp4") == ("and now ?", "a.mp4")
    two = {"role": "user", "content": [{"type": "video", "url": "a.mp4"}, {"type": "video", "url": "b.mp4"}]}
    with pytest.raises(ValueError, match="exactly one video"):
        plugin.chat_question([two])
    system = {"role": "system", "content": [{"type": "text", "text": "be brief"}]}
    with pytest.raises(ValueError, match="single user turn"):
        plugin.chat_question([system, turn])
    with pytest.raises(ValueError, match="exactly one video"):
        plugin.one_video(["a.mp4", "b.mp4"])


def test_generation_settings_and_stop_strings():
    assert plugin.generation_settings({"temperature": 0, "max_new_tokens": 5}, 64) == {
        "max_new_tokens": 5,
        "do_sample": False,
    }
    assert plugin.generation_settings({"temperature": 0.7, "top_p": 0.9}, 64) == {
        "max_new_tokens": 64,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    with pytest.raises(ValueError, match="num_beams"):
        plugin.generation_settings({"num_beams": 4}, 64)
    assert plugin.cut_at("red\nblue", ["\n"]) == "red"
    assert plugin.cut_at("red. blue", [".", " "]) == "red"
    assert plugin.cut_at("red", None) == "red"


# ---- lmms-eval in this process == our pipeline -----------------------------------------------


def test_generation_task_equals_the_pipeline(one_process, tiny, docs):
    """simple_evaluate's answers and exact-match score == `pipeline.answer` on the same items."""
    samples = _by_doc(one_process["samples"][QA])
    assert sorted(samples) == list(range(LIMIT))
    config = preset("tiny", tiny.num_layers)
    correct = []
    for i, doc in enumerate(docs):
        frames = load_video(VIDEOS / doc["video"], config.num_frames).frames
        features = encode_video(tiny, frames)
        text = answer(tiny, frames, doc["question"], config, MAX_NEW_TOKENS, features=features).text
        assert samples[i]["filtered_resps"][0] == text
        correct.append(_normalise(text) == _normalise(doc["answer"]))
    assert one_process["results"][QA]["exact_match,none"] == pytest.approx(sum(correct) / len(correct))


def test_generation_samples_log_the_trace(one_process):
    for sample in one_process["samples"][QA]:
        log = sample["token_counts"][0]["prunevid"]
        assert log["prune"] and log["rank"] == 0
        assert log["visual_tokens"] >= log["after_stage1"] >= log["after_stage2"] > 0
        assert log["retention"] == pytest.approx(log["after_stage2"] / log["visual_tokens"])
        assert {"stage1_s", "stage2_s", "llm_prefill_s", "vision_s", "generate_s"} <= set(log)
        assert sample["token_counts"][0]["output_tokens"] <= MAX_NEW_TOKENS


@torch.no_grad()
def test_multiple_choice_task_equals_direct_scoring(one_process, tiny, docs):
    """Log-likelihoods from lmms-eval == the patched model's next-token log-probabilities on
    the processor-built inputs (every choice is one token of the tiny vocabulary)."""
    samples = _by_doc(one_process["samples"][MC])
    assert sorted(samples) == list(range(LIMIT))
    config = preset("tiny", tiny.num_layers)
    prunevid.patch(tiny.model, config)
    try:
        correct = []
        for i, doc in enumerate(docs):
            frames = load_video(VIDEOS / doc["video"], config.num_frames).frames
            inputs = _stock_inputs(tiny, frames, doc["question"])
            logprobs = torch.log_softmax(tiny.model(**inputs).logits[0, -1].float(), -1)
            choice_ids = tiny.tokenizer.convert_tokens_to_ids(doc["choices"])
            expected = logprobs[choice_ids]
            pairs = samples[i]["filtered_resps"]  # (negative log-likelihood, is_greedy) per choice
            got = torch.tensor([-nll for nll, _ in pairs])
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            assert [greedy for _, greedy in pairs] == [int(logprobs.argmax()) == c for c in choice_ids]
            correct.append(int(expected.argmax()) == doc["answer_index"])
    finally:
        prunevid.unpatch(tiny.model)
    assert one_process["results"][MC]["acc,none"] == pytest.approx(sum(correct) / len(correct))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("prune", [True, False])
@torch.no_grad()
def test_multi_token_continuation_scores_what_generate_would_emit(name, prune):
    """score() on a continuation == generate()'s own step log-probabilities; is_greedy holds
    for the greedy continuation only. Pruned, the continuation does not steer stage 2."""
    lm = plugin.PruneVid(pretrained=name, prune=prune)
    video = str(VIDEOS / "synth_7000000.mp4")
    question = "what shape is the moving object ?"
    inputs, features, _ = lm.inputs(question, video)
    out = lm.model.generate(
        **inputs,
        mm_encoder_outputs={"video": features},
        max_new_tokens=3,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    steps = torch.stack([torch.log_softmax(s[0].float(), -1) for s in out.scores])
    expected = float(steps.gather(1, new[:, None]).sum())
    nll, greedy = lm.score(question, lm.tokenizer.decode(new), video).text
    assert nll == pytest.approx(-expected, abs=1e-4) and greedy
    word = "red" if lm.tokenizer.convert_ids_to_tokens(int(new[-1])) != "red" else "blue"
    other = torch.cat([new[:-1], torch.tensor([lm.tokenizer.convert_tokens_to_ids(word)])])
    assert not lm.score(question, lm.tokenizer.decode(other), video).text[1]


# ---- the baselines: no pruning == the stock model ----------------------------------------------


def _stock_inputs(loaded, frames, question: str) -> dict[str, torch.Tensor]:
    """The family's processor-equivalent inputs, pixels included (no cached vision output)."""
    return family_of(loaded.model).build_inputs(
        loaded.tokenizer, loaded.model.config, frames, question, loaded.processing
    )


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_prune_off_and_stages_off_answer_like_the_stock_model(name, docs):
    stock = load_model(name)  # never patched
    full = plugin.PruneVid(pretrained=name, prune=False)
    stages_off = plugin.PruneVid.create_from_arg_string(f"pretrained={name},stage1=false,stage2=false")
    config = preset(name, stock.num_layers)
    for doc in docs[:1] + docs[7:8]:  # two videos
        video = str(VIDEOS / doc["video"])
        frames = load_video(video, config.num_frames).frames
        inputs = _stock_inputs(stock, frames, doc["question"])
        out = stock.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        expected = stock.tokenizer.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        ).strip()
        settings = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0}
        logs = []
        for lm in (full, stages_off):
            result = lm.respond(doc["question"], video, settings)
            assert result.text == expected
            logs.append(result.token_counts.prunevid)
        assert not logs[0]["prune"] and logs[1]["prune"]
        assert all(log["visual_tokens"] == log["after_stage2"] and log["retention"] == 1 for log in logs)
        for choice in doc["choices"][:2]:
            a = full.score(doc["question"], choice, video).text
            b = stages_off.score(doc["question"], choice, video).text
            assert a[1] == b[1] and a[0] == pytest.approx(b[0], abs=1e-5)


# ---- the chat class and multi-round generation -------------------------------------------------


def test_chat_class_answers_like_the_simple_class(one_process, task_manager):
    chat = simple_evaluate(
        model="prunevid",
        model_args="pretrained=tiny",
        tasks=[QA],
        limit=7,
        log_samples=True,
        task_manager=task_manager,
    )
    simple = _by_doc(one_process["samples"][QA])
    for sample in chat["samples"][QA]:
        assert sample["filtered_resps"] == simple[sample["doc_id"]]["filtered_resps"]


QUESTIONS = [
    "what colour is the moving object ?",
    "what shape is the moving object ?",
    "did the scene change ?",
]


def _multi_round_doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
    """A three-round task: each round asks the next question; round 1 swaps the video."""
    if round_idx >= len(QUESTIONS):
        return None, None, True, previous_output, previous_round_info
    visuals = [str(VIDEOS / "synth_7000001.mp4")] if round_idx == 1 else []
    return visuals, QUESTIONS[round_idx], False, previous_output, {"asked": round_idx}


def _multi_round_doc_to_messages(doc, round_idx=None, previous_output=None, previous_round_info=None):
    """The same task for the chat class (round 0: the document's video and first question)."""
    if round_idx is None:
        return _user_turn([doc["video"]], QUESTIONS[0])
    visuals, text, terminal, previous_output, info = _multi_round_doc_to_text(
        doc, previous_output, round_idx, previous_round_info
    )
    return (None if terminal else _user_turn(visuals, text)), terminal, previous_output, info


def _user_turn(visuals: list[str], text: str) -> list[dict]:
    content = [{"type": "video", "url": v} for v in visuals] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def _instance(arguments: tuple) -> Instance:
    metadata = {"task": "rounds", "doc_id": 0, "repeats": 1}
    return Instance(request_type="generate_until_multi_round", arguments=arguments, idx=0, metadata=metadata)


def test_multi_round_generation():
    first_video = str(VIDEOS / "synth_7000000.mp4")
    settings = {"max_new_tokens": 4, "temperature": 0}
    doc = {"video": first_video}
    simple, chat = plugin.PruneVid(pretrained="tiny"), plugin.PruneVidChat(pretrained="tiny")
    for lm in (simple, chat):
        lm.task_dict = {"rounds": {"test": [doc]}}
    requests = [
        (
            simple,
            (QUESTIONS[0], settings, lambda d: [d["video"]], _multi_round_doc_to_text, 0, "rounds", "test"),
        ),
        (chat, ("", _multi_round_doc_to_messages, settings, 0, "rounds", "test")),
    ]
    videos = [first_video, str(VIDEOS / "synth_7000001.mp4"), str(VIDEOS / "synth_7000001.mp4")]
    expected = [simple.respond(q, v, settings).text for q, v in zip(QUESTIONS, videos)]
    for lm, arguments in requests:
        (result,) = lm.generate_until_multi_round([_instance(arguments)])
        assert result.text == expected
        assert len(result.token_counts.to_dict()["prunevid"]["rounds"]) == len(QUESTIONS)


# ---- two processes, data parallel -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_run(out: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "lmms_eval",
        "--model=prunevid",
        "--model_args=pretrained=tiny",
        f"--tasks={QA},{MC}",
        "--force_simple",
        f"--include_path={tasks_path()}",
        f"--limit={LIMIT}",
        "--log_samples",
        f"--output_path={out}",
        "--verbosity=DEBUG",  # without it the CLI exits 0 even when the evaluation failed
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)


def test_two_processes_split_the_documents_and_agree(one_process, tmp_path):
    run = _two_process_run(tmp_path)
    log = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, log
    (results_file,) = glob.glob(str(tmp_path / "*" / "*_results.json"))
    results = json.loads(Path(results_file).read_text())["results"]
    for task, metric in ((QA, "exact_match,none"), (MC, "acc,none")):
        assert results[task][metric] == pytest.approx(one_process["results"][task][metric]), log
        (samples_file,) = glob.glob(str(tmp_path / "*" / f"*_samples_{task}.jsonl"))
        samples = [json.loads(line) for line in Path(samples_file).read_text().splitlines()]
        doc_ids = [s["doc_id"] for s in samples]
        assert sorted(doc_ids) == list(range(LIMIT))  # every item once, no padding copies
        ranks = {s["doc_id"]: {c["prunevid"]["rank"] for c in s["token_counts"]} for s in samples}
        assert all(len(r) == 1 for r in ranks.values())
        halves = [{d for d, r in ranks.items() if r == {rank}} for rank in (0, 1)]
        assert halves[0].isdisjoint(halves[1]) and len(halves[0]) == (LIMIT + 1) // 2
        assert len(halves[1]) == LIMIT // 2
        single = _by_doc(one_process["samples"][task])
        for sample in samples:
            assert _file_answers(sample) == pytest.approx(_answers(single[sample["doc_id"]]), abs=1e-4)


def _answers(sample: dict) -> list:
    """The answer text, or each choice's negative log-likelihood, of an in-process sample."""
    return [r if isinstance(r, str) else r[0] for r in sample["filtered_resps"]]


def _file_answers(sample: dict) -> list:
    """The same from the samples file (lmms-eval writes values as strings, one answer unwrapped)."""
    answers = sample["filtered_resps"]
    if isinstance(answers, str):
        return [answers]
    return [float(nll) for nll, _ in answers]
