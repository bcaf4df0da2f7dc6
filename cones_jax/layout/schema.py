"""What a layout is: the `Layout` and `Subject` values, the layout error, and the checks of single fields.

Both file formats (`parse` for ours, `official` for the official Cones 2 list) build these values
through the same checks, so that every problem is a `LayoutError` with a one-line message that
names the field, e.g. ``subjects[1].box: x1 must be > x0 (got 0.6, 0.2)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from cones_jax.errors import LayoutError

DEFAULT_STRENGTH = 2.5  # γ⁺ of both Cones 2 presets


class LayoutWarning(UserWarning):
    """A layout is usable but probably not what was meant (overlaps, anti-aliased colour maps...)."""


@dataclasses.dataclass(frozen=True)
class Subject:
    word: str
    strength: float | None = None  # γ⁺; None: the preset's weight_positive (DEFAULT_STRENGTH without one)
    residual: str | None = None  # absolute path
    box: tuple[float, float, float, float] | None = None  # (x0, y0, x1, y1), fractions of the image
    mask_path: str | None = None  # absolute path
    color: tuple[int, int, int] | None = None  # exact RGB in the layout's colour map
    token_indices: tuple[int, ...] = ()  # hand-typed indices from an official config (checked, not used)


@dataclasses.dataclass(frozen=True)
class Layout:
    prompt: str
    negative_prompt: str = ""
    subjects: tuple[Subject, ...] = ()
    size: tuple[int, int] | None = None  # image (height, width) in pixels
    weight_negative: float | None = None  # γ⁻; None: the preset's
    guidance_steps: int | None = None
    guidance_weight: float | None = None
    color_map_path: str | None = None  # absolute path
    source: str = "<dict>"  # file the layout came from, for messages
    format: str = "cones_jax"  # "cones_jax" or "official"
    subject_fields: tuple[str, ...] = ()  # where each subject was defined, for messages

    def field(self, s: int) -> str:
        """Name of subject s's definition in the source file ("subjects[1]", "color_context['255,0,0']")."""
        return self.subject_fields[s] if s < len(self.subject_fields) else f"subjects[{s}]"


def where(source: str | None, field: str) -> str:
    """A field name, prefixed with the file it is in."""
    return f"{source}: {field}" if source and source != "<dict>" else field


def field_error(source: str | None, field: str, msg: str) -> LayoutError:
    return LayoutError(f"{where(source, field)}: {msg}".replace("\n", " "))


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Field checks


class FieldContext:
    """The file being parsed and a prefix for field names (for official list entries, "[i].")."""

    def __init__(self, source: str, base_dir: str, prefix: str = "") -> None:
        self.source, self.base_dir, self.prefix = source, base_dir, prefix

    def err(self, field: str, msg: str) -> LayoutError:
        return field_error(self.source, self.prefix + field, msg)

    def path(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.err(field, f"expected a file path (a non-empty string), got {short(value)}")
        return os.path.abspath(os.path.join(self.base_dir, os.path.expanduser(value.strip())))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def read_number(ctx: FieldContext, value: Any, field: str, *, minimum: float | None = None) -> float:
    if not is_number(value) or not math.isfinite(float(value)):
        raise ctx.err(field, f"expected a finite number, got {short(value)}")
    if minimum is not None and float(value) < minimum:
        raise ctx.err(field, f"must be >= {minimum:g}, got {float(value):g}")
    return float(value)


def read_integer(ctx: FieldContext, value: Any, field: str, *, minimum: int) -> int:
    if is_number(value) and float(value).is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ctx.err(field, f"expected an integer, got {short(value)}")
    if value < minimum:
        raise ctx.err(field, f"must be >= {minimum}, got {value}")
    return value


def read_string(ctx: FieldContext, value: Any, field: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ctx.err(field, f"expected a string, got {short(value)}")
    if not allow_empty and not value.strip():
        raise ctx.err(field, "must not be empty")
    return value


def check_keys(ctx: FieldContext, obj: dict, allowed: Sequence[str], field: str) -> None:
    for key in obj:
        if not isinstance(key, str):
            raise ctx.err(field, f"keys must be strings, got {short(key)}")
        if key.startswith("_") or key in allowed:
            continue
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ctx.err(f"{field}.{key}" if field else key, f"unknown key ({hint}allowed: {', '.join(allowed)})")


def parse_color(value: Any, field: str = "color", source: str | None = None) -> tuple[int, int, int]:
    """"#rrggbb", "R,G,B" or [R, G, B] -> (R, G, B) with each in 0..255."""
    parts = None
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"#[0-9a-fA-F]{6}", text):
            parts = [int(text[i:i + 2], 16) for i in (1, 3, 5)]
        elif re.fullmatch(r"\s*\d{1,3}\s*,\s*\d{1,3}\s*,\s*\d{1,3}\s*", text):
            parts = [int(p) for p in text.split(",")]
    elif isinstance(value, (list, tuple)) and len(value) == 3 and all(
            is_number(v) and float(v).is_integer() for v in value):
        parts = [int(v) for v in value]
    if parts is None or not all(0 <= p <= 255 for p in parts):
        raise field_error(source, field, f"expected a colour as \"#rrggbb\", \"R,G,B\" or [R, G, B] with values "
                                         f"0-255, got {short(value)}")
    return (parts[0], parts[1], parts[2])


def color_text(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x} {}".format(*color, tuple(color))


def read_size(ctx: FieldContext, value: Any) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ctx.err("size", f"expected [height, width] in pixels, got {short(value)}")
    h, w = (read_integer(ctx, v, "size", minimum=8) for v in value)
    if h % 8 or w % 8:
        raise ctx.err("size", f"height and width must be multiples of 8 (the VAE's factor), got [{h}, {w}]")
    return h, w


def read_box(ctx: FieldContext, value: Any, field: str, size: tuple[int, int] | None,
             pixels: bool) -> tuple[float, ...]:
    unit = "pixels" if pixels else "fractions of the image in [0, 1]"
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ctx.err(field, f"expected [x0, y0, x1, y1] ({unit}), got {short(value)}")
    x0, y0, x1, y1 = (read_number(ctx, v, field) for v in value)
    if pixels:
        if size is None:
            raise ctx.err(field, "pixel boxes need the top-level \"size\": [height, width] they refer to "
                                 "(or give \"box\" as fractions)")
        h, w = size
        for name, v, hi in (("x0", x0, w), ("y0", y0, h), ("x1", x1, w), ("y1", y1, h)):
            if not 0 <= v <= hi:
                raise ctx.err(field, f"{name} = {v:g} is outside the image (0..{hi} pixels; size is "
                                     f"[{h}, {w}] = [height, width])")
    else:
        for name, v in (("x0", x0), ("y0", y0), ("x1", x1), ("y1", y1)):
            if not 0.0 <= v <= 1.0:
                hint = " (pixel boxes go in \"box_px\")" if v > 1 else ""
                raise ctx.err(field, f"{name} = {v:g} is outside [0, 1]; boxes are fractions of the image{hint}")
    if x1 <= x0:
        raise ctx.err(field, f"x1 must be > x0 (got {x0:g}, {x1:g})")
    if y1 <= y0:
        raise ctx.err(field, f"y1 must be > y0 (got {y0:g}, {y1:g})")
    if pixels:
        h, w = size
        return (x0 / w, y0 / h, x1 / w, y1 / h)
    return (x0, y0, x1, y1)


def common_values(ctx: FieldContext, obj: dict) -> dict:
    """Top-level values shared by both formats."""
    if "prompt" not in obj:
        raise ctx.err("prompt", "missing; the layout needs the prompt that names its subjects")
    out = {"prompt": read_string(ctx, obj["prompt"], "prompt", allow_empty=False),
           "negative_prompt": read_string(ctx, obj.get("negative_prompt") or "", "negative_prompt")}
    out["size"] = read_size(ctx, obj["size"]) if obj.get("size") is not None else None
    for key in ("weight_negative", "guidance_weight"):
        if obj.get(key) is not None:
            out[key] = read_number(ctx, obj[key], key, minimum=0.0 if key == "guidance_weight" else None)
    if obj.get("guidance_steps") is not None:
        out["guidance_steps"] = read_integer(ctx, obj["guidance_steps"], "guidance_steps", minimum=0)
    return out
