"""`load_model` tells its failures apart, one sentence each with what to do, and a failed load
leaves no model in memory. Checkpoints are written here (corrupt, unsupported, from a newer
transformers); the failures that need a machine (out of memory) are simulated."""

from __future__ import annotations

import gc
import json
import shutil
import weakref

import pytest
import torch

from prunevid import pipeline
from prunevid.pipeline import ModelLoadError, load_model
from prunevid.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A loadable tiny checkpoint (config, safetensors, tokenizer) to damage in copies."""
    folder = tmp_path_factory.mktemp("good")
    tiny_model(seed=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def copy_of(good, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(good, folder)
    return folder


def failure(name: str) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(name), device="cpu")
    message = str(caught.value)
    assert "\n" not in message and message.count(". ") == 0 and message.endswith("."), message
    return caught.value


def test_the_good_checkpoint_loads(good):
    assert load_model(str(good), device="cpu").num_layers == 4


def test_truncated_weights_are_a_corrupt_checkpoint(good, tmp_path):
    folder = copy_of(good, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    error = failure(folder)
    assert error.kind == "corrupt"
    assert str(error).startswith(f"The checkpoint of `{folder}` is corrupt or incomplete (SafetensorError")
    assert str(error).endswith("replace the folder with a complete copy.")


def test_missing_weights_and_broken_json_are_a_corrupt_checkpoint(good, tmp_path):
    folder = copy_of(good, tmp_path)
    (folder / "model.safetensors").unlink()
    assert failure(folder).kind == "corrupt"
    (folder / "config.json").write_text("{not json")
    assert failure(folder).kind == "corrupt"


def test_a_model_transformers_has_but_pruneVid_does_not_patch(good, tmp_path):
    from transformers import LlavaConfig

    folder = tmp_path / "llava"
    folder.mkdir()
    config = LlavaConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 37, "image_size": 28, "patch_size": 14},
        text_config={"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "intermediate_size": 37, "vocab_size": 128},
    )  # fmt: skip
    config.save_pretrained(folder)  # no weights: the architecture is refused before any is read
    error = failure(folder)
    assert error.kind == "architecture"
    assert str(error) == (
        f"The model `{folder}` is a `llava` model which PruneVid does not patch: use a LLaVA-OneVision "
        "or Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint."
    )


def test_a_model_that_is_not_image_text_to_text_at_all(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
        )
    )
    error = failure(tmp_path)
    assert error.kind == "architecture" and "is a `bert` model" in str(error)


def test_a_checkpoint_from_a_newer_transformers_is_a_version_problem(good, tmp_path):
    folder = copy_of(good, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="qwen9_vl", transformers_version="6.2.0")
    (folder / "config.json").write_text(json.dumps(config))
    error = failure(folder)
    assert error.kind == "version"
    assert "(the checkpoint was saved with 6.2.0): install transformers>=5.24,<6" in str(error)


def test_an_installed_transformers_outside_the_supported_range(good, monkeypatch):
    import transformers

    # The checkpoint records the transformers that wrote it (whichever 5.x this environment has).
    saved_with = json.loads((good / "config.json").read_text())["transformers_version"]
    assert saved_with == transformers.__version__
    monkeypatch.setattr(transformers, "__version__", "6.0.0")
    error = failure(good)
    assert error.kind == "version"
    assert str(error).startswith(
        f"The installed transformers 6.0.0 cannot load `{good}` (the checkpoint was saved with {saved_with}): "
        "install transformers>=5.24,<6"
    )


def test_an_api_mismatch_inside_transformers_is_a_version_problem(good, monkeypatch):
    from transformers import AutoModelForImageTextToText

    def broken(*args, **kwargs):
        raise TypeError("__init__() got an unexpected keyword argument 'cache'")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", broken)
    error = failure(good)
    assert error.kind == "version" and "failed while building" in str(error)


def test_weights_larger_than_the_free_memory_are_refused_before_loading(good, monkeypatch):
    from transformers import AutoModelForImageTextToText

    def never(*args, **kwargs):
        raise AssertionError("no weight may be read once the model is known not to fit")

    monkeypatch.setattr(pipeline, "available_memory", lambda device: 1000)
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", never)
    error = failure(good)
    assert error.kind == "memory"
    assert str(error).startswith(f"The model `{good}` needs about 0.0 GiB for its weights in float32")
    assert "but only 0.0 GiB of memory is free here" in str(error)


@pytest.mark.parametrize("where", ["moving the weights to the device", "loading the tokenizer"])
def test_out_of_memory_while_loading_leaves_no_half_loaded_model(good, monkeypatch, where):
    """The weights are read, then an allocation fails: the model must not survive the error."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    built = []
    load = AutoModelForImageTextToText.from_pretrained

    def recording(*args, **kwargs):
        model = load(*args, **kwargs)
        built.append(weakref.ref(model))
        if where == "moving the weights to the device":
            model.to = out_of_memory
        return model

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", recording)
    if where == "loading the tokenizer":
        monkeypatch.setattr(AutoTokenizer, "from_pretrained", out_of_memory)
    error = failure(good)
    assert error.kind == "memory"
    assert str(error) == (
        f"Loading `{good}` ran out of memory: pick a smaller model, free memory (other models or programs), "
        "or run on a machine with more memory."
    )
    gc.collect()
    assert len(built) == 1 and built[0]() is None, "the model built before the failure is still referenced"


def test_not_cached_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    error = failure("prunevid-tests/no-such-model")
    assert error.kind == "missing"
    assert str(error) == (
        "The model `prunevid-tests/no-such-model` is neither cached nor downloadable here (the Hugging Face "
        "Hub is unreachable): download it once with network access or give a local checkpoint folder "
        "instead (PRUNEVID_MODEL for the app, --model on the command line)."
    )
