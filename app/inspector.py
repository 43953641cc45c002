"""The token inspector, without Gradio: a click (or a frame, row and column typed in) -> the
selected token's stage-1 token lit across its segment, and a card that says why it was merged,
kept or dropped (`PruningTrace.explain`, plus the compared method's decision).

Everything is served from the traces already computed: no model call. A click on the frame
view lands on a side-by-side picture (original | overlay, `FRAME_GAP` white pixels between);
either half maps to the same token cell.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prunevid.trace import PruningTrace
from prunevid.video import downscale
from prunevid.visualizations import contact_sheet
from prunevid.visualizations.selection import highlight_frame, highlight_frames, token_at

from .runs import comparison_label

FRAME_GAP = 6  # pixels between the original and the overlay in the frame view
THUMB_SIDE = 160  # the whole video, lit, as one sheet of thumbnails: one small PNG a click
SHEET_COLUMNS, SHEET_PAD = 8, 4
NO_SELECTION = (
    "Click a token in the frame view (or type its frame, row and column) to see why it was kept or dropped."
)
# What a stage-2 score means, by the rule that made it (`prunevid.baselines.METHODS`).
WHY_DROPPED = {
    "prunevid": "Its score, the most attention any question word paid it, fell below the cut-off "
    "of its set: the question looked at other tokens.",
    "fastv": "FastV-style ranks by the attention of the prompt's last token only, over the whole "
    "video; this token was below the cut-off.",
    "random": "The random rule keeps tokens at random: its score is a random number, not the question's.",
}
WHY_DROPPED["stage2"] = WHY_DROPPED["prunevid"]


@dataclass
class Inspection:
    """One selected token: its facts (JSON-ready), the card's text and the whole video lit."""

    facts: dict[str, Any]
    card: str
    sheet: np.ndarray  # every frame's thumbnail, the token's stage-1 token lit, the rest dimmed


def thumbnails(images: np.ndarray) -> np.ndarray:
    """(T, h, w, 3) overlays -> at most THUMB_SIDE pixels a side (never enlarged), for the sheet."""
    return downscale(images, THUMB_SIDE)


def clicked_token(
    x: float, y: float, frame: int, frame_size: tuple[int, int], grid: tuple[int, int]
) -> tuple[int, int, int]:
    """(frame, row, col) under pixel (x, y) of the frame view of `frame` (h, w: one frame's size)."""
    height, width = frame_size
    if x >= width + FRAME_GAP:  # the overlay half
        x -= width + FRAME_GAP
    return (frame, *token_at(min(x, width - 1), y, height, width, grid))


def check_token(
    trace: PruningTrace, frame: float | None, row: float | None, col: float | None
) -> tuple[int, int, int]:
    """Typed-in (frame, row, col) as whole numbers inside the trace, or one sentence why not."""
    limits = (trace.num_frames, *trace.grid)
    values = []
    for name, value, limit in zip(("frame", "row", "column"), (frame, row, col), limits):
        if value is None or not float(value).is_integer() or not 0 <= value < limit:
            raise ValueError(f"{name} must be a whole number from 0 to {limit - 1}, got {value!r}")
        values.append(int(value))
    return values[0], values[1], values[2]


def inspect(
    trace: PruningTrace,
    thumbs: np.ndarray,
    token: tuple[int, int, int],
    times: np.ndarray | None = None,
    other: PruningTrace | None = None,
    compare: str = "",
) -> Inspection:
    """Explain `token` (frame, row, col) and light its stage-1 token on `thumbs` (T, h, w, 3),
    the overlays already drawn (`thumbnails`). `other`: the compared method's trace, run on the
    same video."""
    facts = trace.explain(*token, times=times)
    if other is not None:
        theirs = other.explain(*token, times=times)
        facts["compared"] = {
            "method": compare or other.method,
            "label": comparison_label(compare or other.method),
            "kept": theirs["fate"] == "kept",
            "fate": theirs["fate"],
            "members": theirs["stage1"]["members"],
        }
    lit = highlight_frames(thumbs, trace.members(*token), trace.segment, token)
    return Inspection(facts, card_markdown(facts), contact_sheet(lit, SHEET_COLUMNS, SHEET_PAD))


def lit_frame(trace: PruningTrace, image: np.ndarray, token: tuple[int, int, int], t: int) -> np.ndarray:
    """Frame t's overlay `image` (h, w, 3) with `token`'s stage-1 token lit (the frame view)."""
    frame, row, col = token
    members = trace.members(*token)[t]
    in_segment = bool(trace.segment[t] == trace.segment[frame])
    return highlight_frame(image, members, (row, col) if t == frame else None, in_segment)


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def card_markdown(facts: dict[str, Any]) -> str:
    """The card: where the token is, what stage 1 did, what stage 2 did and why, the compared method."""
    frame, row, col = facts["frame"], facts["row"], facts["col"]
    when = "" if facts["time_s"] is None else f" at {facts['time_s']:.1f} s"
    first, last = facts["segment_frames"]
    lines = [
        f"### Token: frame {frame}{when}, row {row}, column {col}",
        f"**{facts['fate'].capitalize()}** · segment {facts['segment']} (frames {first}-{last})",
        "",
    ]
    one = facts["stage1"]
    similarity = one["similarity"]
    kind = "static (merged over time)" if one["static"] else "dynamic"
    versus = ""
    if similarity is not None and one["tau"] is not None and "tau" in one["rule"]:
        sign = ">" if similarity > one["tau"] else "≤"
        versus = f": similarity {similarity:.3f} {sign} tau {one['tau']:g}"
    elif similarity is not None:
        versus = f": similarity {similarity:.3f}"
    lines.append(f"- **Stage 1**: {kind}{versus} ({one['rule']}).")
    m_first, m_last = one["member_frames"]
    span = f"frame {m_first}" if m_first == m_last else f"frames {m_first}-{m_last}"
    if facts["merged_index"] < 0:
        lines.append("- It went into no token: the method dropped it before the language model.")
    else:
        lines.append(
            f"- Its stage-1 token #{facts['merged_index']} holds **{one['members']}** original "
            f"token{'s' if one['members'] != 1 else ''} "
            f"({one['members_in_frame']} in this frame) over {span}: lit in the pictures."
        )
    if one["density"] is not None:
        lines.append(
            f"- DPC-KNN in its set: density {_number(one['density'])}, distance to a denser token "
            f"{_number(one['separation'])} (their product ranks the cluster centres)."
        )
    two = facts["stage2"]
    if two is None:
        lines.append("- **Stage 2**: did not run on this token.")
    else:
        scope = "its budget set" if two["scope"] == "budget set" else "the video"
        place = (
            f"kept as **{two['kept_rank']}** of {two['kept_in_set']}"
            if two["kept"]
            else f"**dropped**: rank {two['rank']} of {two['set_size']}, {two['kept_in_set']} kept"
        )
        lines.append(f"- **Stage 2**: score {_number(two['score'])}, {place} in {scope}.")
        lowest = ", ".join(_number(s) for s in two["lowest_kept"]) or "none"
        highest = ", ".join(_number(s) for s in two["highest_dropped"]) or "none"
        lines.append(f"- Cut-off: lowest kept scores {lowest}; highest dropped {highest}.")
        words = two["question_words"]
        if words:
            said = ", ".join(
                f"`{w['token'].strip() or repr(w['token'])}` {_number(w['attention'], 2)}" for w in words
            )
            lines.append(f"- Question words that attended to it most: {said}.")
    if two is not None and not two["kept"]:
        lines.append(f"- **Why dropped?** {WHY_DROPPED.get(facts['method'], WHY_DROPPED['prunevid'])}")
    compared = facts.get("compared")
    if compared is not None:
        verdict = "kept it" if compared["kept"] else f"did not keep it ({compared['fate']})"
        lines.append(f"- **{compared['label']}** {verdict}.")
    return "\n".join(lines)


def save_record(path: str | Path, record: dict[str, Any], facts: dict[str, Any] | None) -> str:
    """The trace's JSON download, with the selected token's card under "selected_token"."""
    data = dict(record)
    if facts is not None:
        data["selected_token"] = facts
    Path(path).write_text(json.dumps(data))
    return str(path)
