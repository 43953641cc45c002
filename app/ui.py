"""The Gradio page: components and event wiring only (the work is in the modules beside it and `visualizations`)."""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from prunevid.config import PruneVidConfig
from prunevid.pipeline import ModelLoadError, check_question, preset
from prunevid.video import VideoError
from prunevid.visualizations import (
    Layers,
    budget_figure,
    contact_sheet,
    figure_to_image,
    overlay_frame,
    overlay_frames,
    save_animation,
    timeline_figure,
)

from . import catalog, estimates, hardware, inspector, limits, models, runs

log = logging.getLogger(__name__)

# The example videos sit beside the page's folder in both layouts: assets/ next to app/ in a checkout
# (and a Space), prunevid/assets/ next to prunevid/app/ in an installed wheel (pyproject.toml maps both).
ASSETS = Path(__file__).resolve().parent.parent / "assets"
# The budget (retention, stage1_share) has its own controls; the rest are the paper's knobs, but
# per_step_budget, a server's layout option (vLLM's Qwen3-VL), which the page leaves off.
KNOBS = [
    f.name
    for f in dataclasses.fields(PruneVidConfig)
    if f.name not in ("stage1", "stage2", "retention", "stage1_share", "per_step_budget")
]
KNOB_HELP = {
    "tau": "static threshold: cosine similarity above which a position is static in a segment [-1, 1]",
    "temporal_segment_ratio": "temporal segments = frames x ratio (0, 1]",
    "cluster_ratio": "spatial clusters = tokens x ratio (0, 1]",
    "k": "DPC-KNN neighbours (>= 1)",
    "spatial_merge_threshold": "sets of at most this many tokens are not clustered (>= 0)",
    "dpc_noise": "seeded tie-break noise on DPC densities [0, 1]",
    "seed": "seed of that noise (>= 0)",
    "selected_layer": "decoder layer M that scores visual tokens (< the model's layers)",
    "alpha": "fraction of visual tokens stage 2 keeps (0, 1]",
    "num_frames": f"frames sampled from the video (1 to {limits.MAX_FRAMES})",
    "centre": "static similarity on tokens minus the video's mean token (beyond the paper)",
}
INTEGER_KNOBS = {"k", "spatial_merge_threshold", "seed", "selected_layer", "num_frames"}
LAYER_CHOICES = [
    ("Merged clusters (mean colour)", "clusters"),
    ("Stage-2 attention heatmap", "heatmap"),
    ("Static tokens (cyan hatching)", "static"),
    ("Pruned by stage 2 (darkened)", "pruned"),
    ("Cluster outlines", "outlines"),
]
DEFAULT_LAYERS = ["clusters", "static", "pruned", "outlines"]
COMPARE_CHOICES = [
    ("nothing", ""),
    ("the unpruned model (measures the speedup)", runs.UNPRUNED),
    *((f"{runs.METHOD_LABELS[name]}, same budget", name) for name in runs.COMPARISONS[2:]),
]
BUDGET_HELP = "share of the visual tokens kept, exactly (0: PruneVid's settings decide)"
LEGEND = (
    "Each sampled frame as the model saw it: every stage-1 merged token is filled with its mean colour "
    "and outlined in white, static tokens (merged over time) are hatched in cyan, tokens dropped by "
    "stage 2 are darkened; the heatmap shows the stage-2 attention from the question. A compared "
    "method is drawn the same way: the tokens it drops, before or inside the language model, are darkened."
)
INTRO = (
    "# PruneVid: fewer visual tokens, same answer\n"
    "Ask a question about a video. Stage 1 merges tokens that repeat over time and space before "
    "the language model; stage 2 keeps only the tokens the question attends to. "
    "Below: the answer, the speedup, and what happened to every token."
)
CSS = """
#prunevid-banner .warning {padding: 8px 12px; border-radius: 6px; background: #fff4d6; color: #5b4200;}
#prunevid-banner .note {padding: 8px 12px; border-radius: 6px; background: #e8f1fb; color: #123b63;}
#token-card {padding: 4px 12px;}
"""


def inline_html(text: str) -> str:
    """Escape text for an HTML block, turning `code` spans into <code> (Markdown is off inside HTML)."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text, quote=False))


def banner_markdown(model: str, failure: str | None = None, hardware: str | None = None) -> str:
    """The status banner: why a fallback happened (one sentence), what an offline model can do,
    and what this server's hardware means for the settings."""
    parts = []
    if failure:
        parts.append(f'<div class="warning">⚠️ {inline_html(failure)}</div>')
    for note in (catalog.MODEL_NOTES.get(model), hardware):
        if note:
            parts.append(f'<div class="note">ℹ️ {inline_html(note)}</div>')
    return "\n\n".join(parts)


def examples() -> list[list[str]]:
    """[video path, question] pairs from assets/examples.json (empty when the assets are absent)."""
    listing = ASSETS / "examples.json"
    if not listing.is_file():
        return []
    rows = json.loads(listing.read_text())
    return [
        [str(ASSETS / row["video"]), row["question"]] for row in rows if (ASSETS / row["video"]).is_file()
    ]


def knob_values(config: PruneVidConfig) -> list[Any]:
    """[stage1, stage2, *knobs] of a config, in the order of the UI's inputs."""
    return [config.stage1, config.stage2, *(getattr(config, name) for name in KNOBS)]


def readable(error: BaseException) -> str:
    """One line for the page: the message, with temporary upload folders cut down to the file name."""
    text = str(error).strip().replace("`", "") or type(error).__name__
    for word in text.split():
        path = word.strip("'\".,:;()")
        if os.sep in path and (path.startswith(tempfile.gettempdir()) or "/gradio/" in path):
            text = text.replace(path, os.path.basename(path))
    if isinstance(error, VideoError):
        text = f"This file cannot be used as a video: {text}."
    return text.rstrip(".") + "."


def fail(error: BaseException) -> gr.Error:
    return gr.Error(html.escape(readable(error), quote=False), duration=None, print_exception=False)


class Report:
    """The runs' progress callback, (fraction, text), in front of a gr.Progress; picklable,
    since on ZeroGPU the model work runs in another process."""

    def __init__(self, progress: Any = None):
        self.progress = progress

    def __call__(self, fraction: float, text: str) -> None:
        if self.progress is not None:
            self.progress(fraction, desc=text)


@dataclasses.dataclass
class Shown:
    """What the pictures are drawn from (kept per browser session so layer toggles redraw fast)."""

    frames: np.ndarray  # (T, h, w, 3) display-size frames
    trace: Any
    captions: list[str]
    times: np.ndarray | None = None  # (T,) seconds of each frame
    images: np.ndarray | None = None  # (T, h, w, 3) the overlays drawn with the current layers
    record: dict[str, Any] | None = None  # the trace's JSON download (and the compared method's)
    other: Any = None  # the compared method's trace
    compare: str = ""
    thumbs: np.ndarray | None = None  # `images` at thumbnail size (the inspector's sheet)
    token: tuple[int, int, int] | None = None  # the inspected token (frame, row, col)


def layers_from(names: list[str]) -> Layers:
    return Layers(**{field.name: field.name in names for field in dataclasses.fields(Layers)})


def draw_gallery(shown: Shown, layer_names: list[str]) -> list[tuple[np.ndarray, str]]:
    images = overlay_frames(shown.frames, shown.trace, layers_from(layer_names))
    return list(zip(images, shown.captions))


def captions(trace: Any, timestamps: np.ndarray) -> list[str]:
    return [f"#{t} · {timestamps[t]:.1f}s · seg {int(trace.segment[t])}" for t in range(trace.num_frames)]


def other_gallery(shown: Shown | None, layer_names: list[str]) -> list[tuple[np.ndarray, str]]:
    """The compared method's pictures: the same frames in the same colours (none without one)."""
    return [] if shown is None else draw_gallery(shown, layer_names)


def comparison_components(compare: str | None) -> tuple[Any, Any]:
    """The compared answer's box and pictures, labelled for the method picked (the pictures only
    for a method: the unpruned model keeps every token)."""
    label = runs.comparison_label(compare) if compare else "compared run"
    method = bool(compare) and compare != runs.UNPRUNED
    return (
        gr.Textbox(label=f"Answer ({label})"),
        gr.Gallery(label=f"Tokens per sampled frame: {label}, same budget", visible=method),
    )


def token_gallery(label: str, elem_id: str, visible: bool = True) -> gr.Gallery:
    """A gallery of overlays, four frames a row (PruneVid's and a compared method's alike)."""
    return gr.Gallery(
        label=label,
        columns=4,
        object_fit="contain",
        height="auto",
        format="png",
        visible=visible,
        elem_id=elem_id,
    )


def no_selection() -> tuple[str, None]:
    return inspector.NO_SELECTION, None


def side_by_side(frame: np.ndarray, overlay: np.ndarray, gap: int = inspector.FRAME_GAP) -> np.ndarray:
    height = frame.shape[0]
    spacer = np.full((height, gap, 3), 255, dtype=np.uint8)
    return np.concatenate([frame, spacer, overlay], axis=1)


class App:
    """The page's long-lived state: loaded models (and their caches), limits, the startup model."""

    def __init__(self, model: str | None = None, registry: models.ModelRegistry | None = None):
        self.limits = limits.Limits.from_env()
        self.registry = registry or models.ModelRegistry(
            max_real=self.limits.max_models, warm=not hardware.zero_gpu(), gpu_max_s=self.limits.gpu_max_s
        )
        # One answer's model work; on ZeroGPU it runs on a GPU reserved for its estimated duration.
        self.work = hardware.on_gpu(self.registry.work, self.registry.gpu_seconds)
        self.scratch = limits.ScratchFolders()
        wanted = model or models.startup_model()
        self.failure: str | None = None
        try:
            self.registry.get(wanted)
            self.model = wanted
        except ModelLoadError as error:
            log.warning("%s", error)
            self.failure = models.fallback_message(error, "the offline tiny demo model")
            self.model = catalog.OFFLINE_MODEL
            self.registry.get(catalog.OFFLINE_MODEL)
        self.choices = list(catalog.MODEL_CHOICES)
        if self.model not in self.choices:
            self.choices.insert(0, self.model)
        if wanted not in self.choices:
            self.choices.insert(0, wanted)

    def preset(self, model: str) -> PruneVidConfig:
        """The settings the page shows for a model: its preset (selected_layer scaled to its
        depth), with fewer frames where a real model runs on CPUs."""
        config = preset(model, self.registry.get(model).num_layers)
        return estimates.page_config(model, config)

    def banner(self, model: str, failure: str | None = None) -> str:
        hardware = estimates.hardware_note(
            model, preset(model, self.registry.get(model).num_layers), self.registry
        )
        return banner_markdown(model, failure, hardware)

    # ---- events -------------------------------------------------------------------------

    def on_answer(
        self,
        video: str | None,
        question: str,
        compare: str | None,
        model: str,
        stage1: bool,
        stage2: bool,
        knobs: dict[str, Any],
        max_new_tokens: float | None,
        layer_names: list[str],
        progress: Any = None,
    ) -> tuple:
        """The answer event: validate, announce a long wait, run (PruneVid, maybe the run it is
        compared with), draw. Every failure becomes one message. `knobs` holds every
        PruneVidConfig knob but the stage switches."""
        report = Report(progress)
        compare = compare or ""
        try:
            if not video:
                raise ValueError("No video: upload one or pick an example.")
            check_question(question)
            config = limits.make_config(stage1, stage2, **knobs)
            new_tokens = limits.check_new_tokens(max_new_tokens)
            self.registry.get(model)
            wait = estimates.estimate_wait(self.registry, model, video, config, compare, new_tokens)
            if wait is not None and wait > estimates.LONG_WAIT_S:
                gr.Info(estimates.wait_message(wait, config.num_frames), duration=min(wait, 30))
            outcome = runs.run_question(
                self.registry, model, video, question, config, compare, new_tokens, report,
                self.limits, self.work,
            )  # fmt: skip
        except (ValueError, ModelLoadError) as error:  # VideoError is a ValueError
            raise fail(error) from None
        except gr.Error:  # already a message for the page (e.g. ZeroGPU's quota notices)
            raise
        except Exception as error:  # keep serving; say what broke in one line
            log.exception("answer failed")
            raise fail(RuntimeError(estimates.describe_failure(error, "answering"))) from None

        report(0.9, "Drawing the pruning pictures")
        try:
            return self.render(outcome, layer_names)
        except Exception as error:
            log.exception("drawing failed")
            raise fail(RuntimeError(estimates.describe_failure(error, "drawing the pictures"))) from None
        finally:
            hardware.release_memory()  # the full-size frames of this answer are gone: return their pages

    def render(self, outcome: runs.Outcome, layer_names: list[str]) -> tuple:
        trace, video = outcome.trace, outcome.video
        frames = video.frames  # already at display size
        shown = Shown(frames, trace, captions(trace, video.timestamps), times=np.asarray(video.timestamps))
        gallery = draw_gallery(shown, layer_names)
        other = outcome.other_trace
        shown_other = None if other is None else Shown(frames, other, captions(other, video.timestamps))
        folder = self.scratch.new()
        trace_path = folder / "prunevid_trace.json"
        record = trace.to_dict()
        if other is not None:  # the method PruneVid was compared with, token by token too
            record["comparison"] = other.to_dict()
        trace_path.write_text(json.dumps(record))
        sheet_path = folder / "prunevid_contact_sheet.png"
        images = np.stack([image for image, _ in gallery])
        shown.images, shown.record, shown.other, shown.compare = images, record, other, outcome.compare
        shown.thumbs = inspector.thumbnails(images)
        from PIL import Image

        Image.fromarray(contact_sheet(images, captions=shown.captions)).save(sheet_path)
        movie_path = save_animation(folder / "prunevid_overlay.mp4", images, fps=2.0)
        stats = outcome.stats()
        return (
            outcome.result.text,
            outcome.other.text if outcome.other is not None else "",
            estimates.speed_markdown(outcome),
            stats,
            gallery,
            gr.Slider(minimum=0, maximum=max(trace.num_frames - 1, 1), value=0, step=1, interactive=True),
            side_by_side(frames[0], images[0]),
            figure_to_image(timeline_figure(trace, video.timestamps)),
            figure_to_image(budget_figure(trace)),
            str(trace_path),
            [str(sheet_path), movie_path],
            other_gallery(shown_other, layer_names),
            shown,
            shown_other,
        )

    def on_layers(self, shown: Shown | None, shown_other: Shown | None, layer_names: list[str], index: float):
        if shown is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        gallery = draw_gallery(shown, layer_names)
        shown.images = np.stack([image for image, _ in gallery])
        shown.thumbs = inspector.thumbnails(shown.images)
        t = int(min(max(index or 0, 0), len(gallery) - 1))
        sheet = gr.skip()
        if shown.token is not None:  # keep the inspected token lit on the new layers
            sheet = inspector.inspect(shown.trace, shown.thumbs, shown.token, shown.times).sheet
        return gallery, self.frame_view(shown, t), other_gallery(shown_other, layer_names), sheet

    def on_frame(self, shown: Shown | None, layer_names: list[str], index: float):
        if shown is None:
            return gr.skip()
        t = int(min(max(index or 0, 0), shown.trace.num_frames - 1))
        if shown.images is None:
            image = overlay_frame(shown.frames[t], shown.trace, t, layers_from(layer_names))
            return side_by_side(shown.frames[t], image)
        return self.frame_view(shown, t)

    def frame_view(self, shown: Shown, t: int) -> np.ndarray:
        """Frame t beside its overlay, with the inspected token's stage-1 token lit if there is one."""
        image = shown.images[t]
        if shown.token is not None:
            image = inspector.lit_frame(shown.trace, image, shown.token, t)
        return side_by_side(shown.frames[t], image)

    def on_click(self, shown: Shown | None, index: float, event: gr.SelectData):
        """A click on the frame view: inspect the token under it (frame from the slider)."""
        if shown is None or not isinstance(event.index, (list, tuple)):
            return [gr.skip()] * 8
        t = int(min(max(index or 0, 0), shown.trace.num_frames - 1))
        x, y = event.index
        token = inspector.clicked_token(x, y, t, shown.frames.shape[1:3], shown.trace.grid)
        return [*token, *self.show_token(shown, token)]

    def on_inspect(self, shown: Shown | None, frame: float | None, row: float | None, col: float | None):
        """The keyboard path: frame, row and column typed in, then "Inspect token"."""
        if shown is None:
            raise gr.Error("Ask a question first: the inspector explains the tokens of the last answer.")
        try:
            token = inspector.check_token(shown.trace, frame, row, col)
        except ValueError as error:
            raise fail(error) from None
        return [*token, *self.show_token(shown, token)]

    def show_token(self, shown: Shown, token: tuple[int, int, int]) -> list:
        """[frame slider, card, lit video sheet, frame view, JSON download] for an inspected token."""
        if shown.images is None:  # an answer drawn before the inspector kept its overlays
            shown.images = overlay_frames(shown.frames, shown.trace)
            shown.thumbs = inspector.thumbnails(shown.images)
        found = inspector.inspect(shown.trace, shown.thumbs, token, shown.times, shown.other, shown.compare)
        shown.token = token
        t = token[0]
        folder = self.scratch.new()
        path = inspector.save_record(folder / "prunevid_trace.json", shown.record or {}, found.facts)
        return [t, found.card, found.sheet, self.frame_view(shown, t), path]

    def on_gallery(self, event: gr.SelectData):
        """A gallery frame picked: show it in the frame view, where its tokens can be clicked."""
        return event.index if isinstance(event.index, int) else gr.skip()

    def on_model(self, model: str, active: str):
        """A model picked in the dropdown: load it and show its preset, or say why not (one sentence)."""
        try:
            self.registry.get(model)
        except ModelLoadError as error:
            instead = "the offline tiny demo model" if active == catalog.OFFLINE_MODEL else f"`{active}`"
            message = models.fallback_message(error, instead)
            return [active, self.banner(active, message), active, *[gr.skip()] * (2 + len(KNOBS))]
        return [model, self.banner(model), model, *knob_values(self.preset(model))]

    # ---- layout -------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        config = self.preset(self.model)
        ttl = self.limits.file_ttl_s
        # Uploads and returned files older than the TTL are deleted, checked every ttl / 4 (<= 5 min).
        with gr.Blocks(title="PruneVid", delete_cache=(max(1, min(ttl // 4, 300)), ttl)) as demo:
            gr.Markdown(INTRO)
            banner = gr.Markdown(self.banner(self.model, self.failure), elem_id="prunevid-banner")
            active = gr.State(self.model)
            shown = gr.State(None, time_to_live=ttl)  # display-size frames of a session's last answer
            with gr.Row(equal_height=False):
                with gr.Column(scale=4, min_width=320):
                    video = gr.Video(label="Video", sources=["upload"], height=300)
                    question = gr.Textbox(
                        label="Question",
                        lines=2,
                        placeholder="What happens in the video?",
                        elem_id="prunevid-question",
                    )
                    with gr.Row():
                        retention = gr.Slider(
                            0,
                            1,
                            value=0,
                            step=0.01,
                            label="Token budget (retention)",
                            info=BUDGET_HELP,
                            elem_id="token-budget",
                        )
                        compare = gr.Dropdown(
                            COMPARE_CHOICES,
                            value="",
                            label="Compare with",
                            info="runs it too: the full model, or another method at PruneVid's budget",
                            elem_id="compare-with",
                        )
                    button = gr.Button("Answer", variant="primary", elem_id="answer-button")
                    rows = examples()
                    if rows:
                        gr.Examples(rows, inputs=[video, question], label="Examples", cache_examples=False)
                    with gr.Accordion("Advanced settings", open=False):
                        model = gr.Dropdown(
                            [(catalog.MODEL_LABELS.get(name, name), name) for name in self.choices],
                            value=self.model,
                            label="Model (each brings its own preset below)",
                        )
                        with gr.Row():
                            stage1 = gr.Checkbox(label="Stage 1: merge tokens", value=config.stage1)
                            stage2 = gr.Checkbox(label="Stage 2: prune by question", value=config.stage2)
                        knobs = []
                        for name in KNOBS:
                            value = getattr(config, name)
                            knobs.append(
                                gr.Checkbox(value=value, label=name, info=KNOB_HELP[name])
                                if isinstance(value, bool)
                                else gr.Number(
                                    value=value,
                                    label=name,
                                    info=KNOB_HELP[name],
                                    precision=0 if name in INTEGER_KNOBS else None,
                                )
                            )
                        stage1_share = gr.Number(
                            value=config.stage1_share,
                            label="stage1_share",
                            info="with a token budget: stage 1 keeps budget ** share of the tokens [0, 1]",
                        )
                        max_new_tokens = gr.Number(
                            value=64, label="max_new_tokens", info="answer length limit", precision=0
                        )
                with gr.Column(scale=6, min_width=420):
                    with gr.Row():
                        answer_box = gr.Textbox(
                            label="Answer (PruneVid)", lines=3, interactive=False, elem_id="answer-pruned"
                        )
                        baseline_box = gr.Textbox(
                            label="Answer (compared run)",
                            lines=3,
                            interactive=False,
                            elem_id="answer-unpruned",
                        )
                    speed = gr.Markdown(
                        "The speed panel appears here after an answer.", label="speed", elem_id="speed-panel"
                    )
                    layers = gr.CheckboxGroup(
                        LAYER_CHOICES, value=DEFAULT_LAYERS, label="Layers drawn on the frames"
                    )
                    gallery = token_gallery("Tokens per sampled frame", "overlay-gallery")
                    compared_gallery = token_gallery(
                        "Tokens per sampled frame: compared method", "compared-gallery", visible=False
                    )
                    gr.Markdown(LEGEND)
                    frame = gr.Slider(
                        0, 1, value=0, step=1, label="Frame", interactive=False, elem_id="frame-slider"
                    )
                    frame_view = gr.Image(
                        label="Frame: original | pruning (click a token to inspect it)",
                        interactive=False,
                        format="png",
                        elem_id="frame-view",
                    )
                    with gr.Group(elem_id="token-inspector"):
                        with gr.Row():
                            inspect_frame = gr.Number(
                                label="Inspect frame", precision=0, elem_id="inspect-frame"
                            )
                            inspect_row = gr.Number(label="row", precision=0, elem_id="inspect-row")
                            inspect_col = gr.Number(label="column", precision=0, elem_id="inspect-col")
                            inspect_button = gr.Button("Inspect token", elem_id="inspect-button")
                        card = gr.Markdown(inspector.NO_SELECTION, elem_id="token-card")
                        token_video = gr.Image(
                            label="The inspected token across the video: its stage-1 token lit, the rest dimmed",
                            interactive=False,
                            format="jpeg",  # 32 thumbnails: ~6 ms as JPEG, ~100-400 ms as PNG
                            elem_id="token-video",
                        )
                    timeline = gr.Image(label="Temporal segments", interactive=False, format="png")
                    budget = gr.Image(label="Token budget", interactive=False, format="png")
                    with gr.Accordion("Downloads and raw numbers", open=False):
                        trace_file = gr.File(label="Pruning trace (JSON)")
                        extra_files = gr.File(label="Contact sheet and overlay video", file_count="multiple")
                        stats = gr.JSON(label="Numbers")

            shown_other = gr.State(None, time_to_live=ttl)
            settings = [model, stage1, stage2, *knobs, stage1_share, max_new_tokens, layers]

            def answer_event(
                video,
                question,
                compare,
                retention,
                model,
                stage1,
                stage2,
                tau,
                temporal_segment_ratio,
                cluster_ratio,
                k,
                spatial_merge_threshold,
                dpc_noise,
                seed,
                selected_layer,
                alpha,
                num_frames,
                centre,
                stage1_share,
                max_new_tokens,
                layers,
                progress=gr.Progress(),  # noqa: B008 (how Gradio asks for a progress tracker)
            ):
                knobs = dict(locals())
                config = {name: knobs[name] for name in [*KNOBS, "retention", "stage1_share"]}
                return self.on_answer(
                    video, question, compare, model, stage1, stage2, config, max_new_tokens, layers, progress
                )

            outputs = [
                answer_box,
                baseline_box,
                speed,
                stats,
                gallery,
                frame,
                frame_view,
                timeline,
                budget,
                trace_file,
                extra_files,
                compared_gallery,
                shown,
                shown_other,
            ]
            inputs = [video, question, compare, retention, *settings]
            # One model run at a time, whichever way it was asked for (patch() settings are per model).
            # A new answer clears the inspector's card (kept off /answer's outputs, which clients index).
            button.click(answer_event, inputs, outputs, api_name="answer", concurrency_id="model").success(
                no_selection, None, [card, token_video], api_name=False
            )
            question.submit(answer_event, inputs, outputs, api_name=False, concurrency_id="model").success(
                no_selection, None, [card, token_video], api_name=False
            )
            compare.change(comparison_components, [compare], [baseline_box, compared_gallery], api_name=False)
            layers.change(
                self.on_layers,
                [shown, shown_other, layers, frame],
                [gallery, frame_view, compared_gallery, token_video],
                api_name=False,
            )
            frame.change(self.on_frame, [shown, layers, frame], [frame_view], api_name=False)
            inspected = [
                inspect_frame,
                inspect_row,
                inspect_col,
                frame,
                card,
                token_video,
                frame_view,
                trace_file,
            ]
            frame_view.select(self.on_click, [shown, frame], inspected, api_name=False)
            inspect_button.click(
                self.on_inspect, [shown, inspect_frame, inspect_row, inspect_col], inspected, api_name=False
            )
            gallery.select(self.on_gallery, None, [frame], api_name=False)
            model.input(
                self.on_model,
                [model, active],
                [active, banner, model, stage1, stage2, *knobs],
                api_name=False,
                concurrency_id="model",
            )
        demo.queue(default_concurrency_limit=1)
        return demo


def build_demo(model: str | None = None) -> gr.Blocks:
    """The whole page. `model` overrides $PRUNEVID_MODEL / the library default."""
    return App(model).build()


def launch(
    server_name: str | None = None, server_port: int | None = None, share: bool = False, **kwargs: Any
) -> gr.Blocks:
    """Build the page and serve it (blocks unless prevent_thread_lock=True); uploads larger than
    PRUNEVID_MAX_UPLOAD_MB are refused by Gradio before they reach the server's disk."""
    max_bytes = int(limits.Limits.from_env().max_upload_mb * 2**20)
    hardware.bound_heap()
    demo = build_demo()
    demo.launch(
        server_name=server_name,
        server_port=server_port,
        share=share,
        css=CSS,
        max_file_size=kwargs.pop("max_file_size", max_bytes),
        **kwargs,
    )
    return demo
