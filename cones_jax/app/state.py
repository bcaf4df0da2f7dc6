"""What the page edits, as plain values: boxes drawn on the canvas, the subject of each, the prompt
and the settings; and the two ways to and from a layout file (`sample.py --layout`).

No Gradio and no JAX here, so the round trip is unit-tested without a browser (tests/test_app.py).

The canvas keeps its boxes as JSON (`canvas_json`): ``{"boxes": [{"box": [x0, y0, x1, y1],
"word": ..., "residual": ..., "strength": ...}], "background": <data URL or "">}``, box corners as
fractions of the image. A layout file written by `layout_dict` is our schema as is, plus one
comment key, ``"_app"`` (keys starting with "_" are comments to the layout parser), that keeps the
page's sampling settings (preset, seeds, steps, CFG scale) so that uploading the file restores them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from cones_jax import bundled
from cones_jax.errors import LayoutError

DEMO = "demo:"  # a residual shipped with the demo model, by name: demo:sunny
APP_KEY = "_app"  # the page's settings inside a layout file (a comment to the parser)
MAX_SUBJECTS = 6  # rows of subject fields on the page
DEFAULT_STRENGTH = 2.5  # γ⁺ of a new box (that of both Cones 2 presets)
DECIMALS = 4  # box corners are kept to 1e-4 of the image: exact in JSON, finer than any pixel
# layout keys the page does not edit but keeps, so that a file uploaded and downloaded again is unchanged
KEPT_KEYS = ("size", "weight_negative", "guidance_steps")


@dataclasses.dataclass
class Box:
    """One subject: its box (fractions of the image), word, residual ("", "demo:NAME" or a path) and γ⁺."""

    box: tuple[float, float, float, float]
    word: str = ""
    residual: str = ""
    strength: float | None = DEFAULT_STRENGTH  # None: the preset's weight_positive


@dataclasses.dataclass
class Settings:
    """Everything on the page but the boxes."""

    prompt: str = ""
    negative_prompt: str = ""
    guidance_weight: float | None = None  # λ; None: the preset's
    preset: str = "official"
    seeds: tuple[int, ...] = (0,)
    steps: int = 50
    cfg_scale: float = 7.5
    kept: dict = dataclasses.field(default_factory=dict)  # KEPT_KEYS found in an uploaded file


# ----------------------------------------------------------------------------------------------
# Residuals: demo names <-> files


def demo_residuals() -> dict[str, str]:
    """demo:NAME -> the bundled residual file, for each residual of the demo world."""
    folder = os.path.join(bundled.demo_world(), "residuals")
    if not os.path.isdir(folder):
        return {}
    return {DEMO + f[:-len(".safetensors")]: os.path.join(folder, f)
            for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")}


def residual_path(value: str) -> str | None:
    """What a layout file holds for a residual field of the page: a demo name becomes its file."""
    value = (value or "").strip()
    if not value:
        return None
    if value.startswith(DEMO):
        known = demo_residuals()
        if value not in known:
            raise LayoutError(f"residual {value!r}: no such demo subject; use one of {', '.join(known)}")
        return known[value]
    return value


def residual_name(path: str | None, base_dir: str = "") -> str:
    """A layout file's residual as the page shows it: a bundled file by its demo name, another as
    an absolute path (relative ones resolve against the layout's folder, as the parser does)."""
    if not path:
        return ""
    full = os.path.abspath(os.path.join(base_dir, os.path.expanduser(path)))
    for name, file in demo_residuals().items():
        if os.path.normpath(file) == os.path.normpath(full):
            return name
    return path if os.path.isabs(path) else full


# ----------------------------------------------------------------------------------------------
# The canvas


def canvas_json(boxes: Sequence[Box], background: str = "") -> str:
    """The canvas's value for these boxes (and background image URL)."""
    return json.dumps({"boxes": [{"box": list(b.box), "word": b.word, "residual": b.residual,
                                  "strength": b.strength} for b in boxes], "background": background})


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LayoutError(f"{what}: expected a finite number, got {value!r}")
    return value


def boxes_from_canvas(text: str | None) -> list[Box]:
    """The canvas's value -> boxes; a malformed value is a `LayoutError` (the page's JS wrote it,
    but a page is client input all the same)."""
    if not text:
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise LayoutError(f"the canvas sent invalid JSON ({e.msg})") from None
    items = obj.get("boxes", []) if isinstance(obj, dict) else None
    if not isinstance(items, list):
        raise LayoutError("the canvas sent no list of boxes")
    boxes = []
    for k, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("box"), list) or len(item["box"]) != 4:
            raise LayoutError(f"box {k + 1}: expected [x0, y0, x1, y1], got {item!r}")
        corners = tuple(_number(v, f"box {k + 1}") for v in item["box"])
        strength = item.get("strength")
        boxes.append(Box(corners, str(item.get("word") or ""), str(item.get("residual") or ""),
                         None if strength is None else _number(strength, f"box {k + 1} γ⁺")))
    return boxes


def background_of(text: str | None) -> str:
    try:
        obj = json.loads(text or "{}")
    except json.JSONDecodeError:
        return ""
    return obj.get("background", "") if isinstance(obj, dict) else ""


def with_subjects(boxes: Sequence[Box], words: Sequence[str], residuals: Sequence[str],
                  strengths: Sequence[float | None]) -> list[Box]:
    """The boxes with the subject fields of the page's rows (row k is box k)."""
    out = []
    for k, b in enumerate(boxes):
        strength = strengths[k] if k < len(strengths) else b.strength
        out.append(dataclasses.replace(
            b, word=(words[k] if k < len(words) else b.word) or "",
            residual=(residuals[k] if k < len(residuals) else b.residual) or "",
            strength=None if strength is None or strength == "" else strength))
    return out


# ----------------------------------------------------------------------------------------------
# Checks the page shows before anything is sampled


def check_boxes(boxes: Sequence[Box]) -> None:
    """At least one box, each inside the image, of non-zero size, with a word; `LayoutError` otherwise."""
    if not boxes:
        raise LayoutError("no box: drag on the canvas to draw one box per subject")
    if len(boxes) > MAX_SUBJECTS:
        raise LayoutError(f"{len(boxes)} boxes; the page holds at most {MAX_SUBJECTS} subjects")
    for k, b in enumerate(boxes, 1):
        x0, y0, x1, y1 = b.box
        if not all(0.0 <= v <= 1.0 for v in b.box):
            raise LayoutError(f"box {k} {list(b.box)} is outside the image (corners are fractions in [0, 1])")
        if x1 <= x0 or y1 <= y0:
            raise LayoutError(f"box {k} has zero size ({list(b.box)}); drag to draw it, or delete it")
        if not b.word.strip():
            raise LayoutError(f"box {k}: give its subject's word (a word of the prompt)")


def parse_seeds(text: str | Sequence[int]) -> tuple[int, ...]:
    """"0 1, 2" -> (0, 1, 2); `LayoutError` for anything that is not a list of integers."""
    if isinstance(text, str):
        parts = text.replace(",", " ").split()
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise LayoutError(f"seeds: expected integers separated by spaces, got {text!r}") from None
    return tuple(int(s) for s in text)


# ----------------------------------------------------------------------------------------------
# Layout files


def layout_dict(boxes: Sequence[Box], settings: Settings) -> dict:
    """The layout file of the page: what `sample.py --layout` reads, plus the page's settings in "_app"."""
    out: dict[str, Any] = {"prompt": settings.prompt}
    if settings.negative_prompt:
        out["negative_prompt"] = settings.negative_prompt
    for key in KEPT_KEYS:
        if settings.kept.get(key) is not None:
            out[key] = settings.kept[key]
    if settings.guidance_weight is not None:
        out["guidance_weight"] = settings.guidance_weight
    subjects = []
    for b in boxes:
        subject: dict[str, Any] = {"word": b.word.strip()}
        if b.strength is not None:
            subject["strength"] = b.strength
        residual = residual_path(b.residual)
        if residual is not None:
            subject["residual"] = residual
        subject["box"] = list(b.box)
        subjects.append(subject)
    out["subjects"] = subjects
    out[APP_KEY] = {"preset": settings.preset, "seeds": list(settings.seeds), "steps": settings.steps,
                    "cfg_scale": settings.cfg_scale}
    return out


def layout_json(boxes: Sequence[Box], settings: Settings) -> str:
    """`layout_dict` as indented JSON, each list of numbers (a box, the seeds) on one line."""
    text = json.dumps(layout_dict(boxes, settings), indent=2, ensure_ascii=False)
    return re.sub(r"\[\s+([-+.eE\d,\s]+?)\s+\]", lambda m: "[" + ", ".join(v.strip() for v in m[1].split(",")) + "]",
                  text) + "\n"


def from_layout(obj: Any, base_dir: str, defaults: Settings | None = None) -> tuple[list[Box], Settings]:
    """A layout file's content (our schema, with boxes) -> the page's boxes and settings.

    The file should already have passed `cones_jax.layout.parse_layout`; this refuses what the page
    cannot draw (masks, colours, pixel boxes), naming the subject. Settings absent from the file
    keep `defaults`.
    """
    if not isinstance(obj, Mapping) or not isinstance(obj.get("subjects"), list):
        raise LayoutError("the page edits layouts of our format with a \"subjects\" list (not the official "
                          "config list)")
    base = defaults or Settings()
    boxes = []
    for k, sub in enumerate(obj["subjects"]):
        if "box" not in sub:
            kind = next((key for key in ("box_px", "mask", "color") if key in sub), "no region")
            raise LayoutError(f"subjects[{k}] has {kind}; the page draws boxes given as fractions (\"box\") only")
        boxes.append(Box(tuple(sub["box"]), sub["word"], residual_name(sub.get("residual"), base_dir),
                         sub.get("strength")))
    app = obj.get(APP_KEY) if isinstance(obj.get(APP_KEY), Mapping) else {}
    settings = Settings(
        prompt=obj["prompt"], negative_prompt=obj.get("negative_prompt") or "",
        guidance_weight=obj.get("guidance_weight"), preset=app.get("preset", base.preset),
        seeds=parse_seeds(app["seeds"]) if "seeds" in app else base.seeds, steps=app.get("steps", base.steps),
        cfg_scale=app.get("cfg_scale", base.cfg_scale),
        kept={key: obj[key] for key in KEPT_KEYS if obj.get(key) is not None})
    return boxes, settings
