"""Layout files -> validated subject regions -> per-resolution attention maps (Cones 2 layout guidance).

A layout says, for each subject word of the prompt, where in the image it should appear. It is read
from one of two formats, validated in full (every problem is a `LayoutError` with a one-line message
that names the field, e.g. ``subjects[1].box: x1 must be > x0 (got 0.6, 0.2)``), and turned into

1. `region_masks`   bool [S, H, W], one region per subject at image resolution;
2. `gamma_maps`     float32 [S, H, W]: γ⁺ (the subject's `strength`) inside its region and γ⁻
                    (`weight_negative`) everywhere else — the other subjects' regions and the
                    background alike, as in the official code;
3. `attention_maps` "{h}x{w}" -> float32 [h*w, L] per cross-attention resolution: each subject's
                    γ map, resized bilinearly with aligned corners (torch's
                    ``F.interpolate(mode="bilinear", align_corners=True)``) and flattened row-major,
                    is added into the columns of all sub-word tokens of every occurrence of its word
                    in the encoded prompt; all other columns are 0. These are M in Cones 2, Eq. 7.

Our layout file (JSON; YAML too when PyYAML is importable)
----------------------------------------------------------
::

    {"prompt": "a dog and a cat on the beach",          # required
     "negative_prompt": "",                             # optional, default ""
     "size": [512, 512],                                # optional image [height, width] in pixels,
                                                        #   multiples of 8; default: the model's
     "weight_negative": -1e8,                           # optional γ⁻; default: the preset's
     "guidance_steps": 50,                              # optional; default: the preset's
     "guidance_weight": 0.08,                           # optional λ; default: the preset's
     "color_map": "map.png",                            # needed when a subject uses "color"
     "subjects": [                                      # required, at least one
       {"word": "dog", "strength": 2.5, "residual": "residuals/dog.safetensors",
        "box": [0.05, 0.3, 0.5, 0.95]},
       {"word": "cat", "box_px": [256, 150, 500, 480]},
       {"word": "sunflower", "mask": "masks/flower.png"},
       {"word": "teddy bear", "color": "#ff0000"}]}

Per subject: ``word`` (required; a word or phrase of the prompt, matched by its tokens, so
"teddy bear" covers both sub-words; every occurrence in the prompt is guided), ``strength`` (γ⁺,
default: the preset's ``weight_positive``, 2.5 in both), ``residual`` (optional path to the
subject's residual embedding), and exactly one region:

- ``box``: ``[x0, y0, x1, y1]`` as FRACTIONS of the image width/height in [0, 1], origin top left,
  x to the right, y down; x1 > x0, y1 > y0. Pixel (row i, column j) is inside when
  ``round(y0*H) <= i < round(y1*H)`` and likewise for columns (at least one pixel each way).
- ``box_px``: the same in pixels of the top-level ``size`` (which is then required).
- ``mask``: a greyscale or RGBA image; a pixel is inside when it is above 50% (alpha when the image
  has any transparency, else luminance). Resized with NEAREST to the image size.
- ``color``: ``"#rrggbb"``, ``"R,G,B"`` or ``[R, G, B]``; the subject's region is every pixel of the
  top-level ``color_map`` whose RGB equals it EXACTLY (as in the official code; alpha is ignored).
  A colour map whose size differs from the image size is resized with NEAREST (no new colours
  appear). Anti-aliased edge pixels match nothing and so are background: a warning counts them.

Keys starting with "_" are comments and ignored anywhere; any other unknown key is an error.
Relative paths resolve against the layout file's folder; the returned `Layout` holds absolute paths.

Overlapping subjects are allowed (a warning names each overlapping pair). Each subject's map is
computed on its own, so a pixel inside two regions is strengthened for both words; with a large
negative γ⁻ (official -1e8) each subject is also suppressed inside the other's region, except where
the two overlap. Two subjects with the SAME word add their maps into the same token columns, so
with a large γ⁻ each region cancels the other; a warning says so (use one mask covering both).

Official Cones 2 config
-----------------------
The official inference JSON is a list of entries (the first is used; ``index=`` picks another)::

    [{"prompt": "a mug and a dog on the beach",
      "residual_dict": {"dog": "residuals/dog.pt", "mug": "residuals/mug.pt"},
      "color_context": {"255,192,0": ["mug", 2.5], "255,0,0": ["dog", 2.5]},
      "guidance_steps": 50, "guidance_weight": 0.08, "weight_negative": -1e8,
      "layout": "layouts/layout_example.png",
      "subject_list": [["mug", 2], ["dog", 5]]}]

Each ``color_context`` entry becomes a colour subject, in order; a word named in ``subject_list``
gets its ``residual_dict`` path (as in the official code, other words get no residual). The
hand-typed ``subject_list`` token indices (start token = 0) are kept in `Subject.token_indices` and
checked against the tokenizer (in `subject_positions`, or at load when a tokenizer is passed): an
index that is not the first sub-word of an occurrence of the word is an error naming both indices.
Every ``subject_list`` word needs a colour (a subject without a region cannot be represented).
Our ``negative_prompt`` and ``size`` keys are accepted in an official entry too. The official code
resizes the layout PNG to 768x768 with PIL's default filter; we use NEAREST, to the image size.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import warnings
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_STRENGTH = 2.5  # γ⁺ of both Cones 2 presets
NEAR_COLOR_DISTANCE = 64  # max |ΔR|,|ΔG|,|ΔB| for a pixel to count as a near miss of a subject colour
NEAR_COLOR_MIN_PIXELS = 10  # warn about near misses from this many pixels on

_TOP_KEYS = ("prompt", "negative_prompt", "size", "weight_negative", "guidance_steps", "guidance_weight",
             "color_map", "subjects")
_SUBJECT_KEYS = ("word", "strength", "residual", "box", "box_px", "mask", "color")
_REGION_KEYS = ("box", "box_px", "mask", "color")
_OFFICIAL_KEYS = ("prompt", "residual_dict", "color_context", "guidance_steps", "guidance_weight",
                  "weight_negative", "layout", "subject_list", "negative_prompt", "size")


class LayoutError(ValueError):
    """A layout file or value is invalid; the one-line message names the field."""


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


def _where(source: str | None, field: str) -> str:
    """A field name, prefixed with the file it is in."""
    return f"{source}: {field}" if source and source != "<dict>" else field


def _error(source: str | None, field: str, msg: str) -> LayoutError:
    return LayoutError(f"{_where(source, field)}: {msg}".replace("\n", " "))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Value checks


class _Ctx:
    """The file being parsed and a prefix for field names (for official list entries, "[i].")."""

    def __init__(self, source: str, base_dir: str, prefix: str = ""):
        self.source, self.base_dir, self.prefix = source, base_dir, prefix

    def err(self, field: str, msg: str) -> LayoutError:
        return _error(self.source, self.prefix + field, msg)

    def path(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.err(field, f"expected a file path (a non-empty string), got {_short(value)}")
        return os.path.abspath(os.path.join(self.base_dir, os.path.expanduser(value.strip())))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _number(ctx: _Ctx, value: Any, field: str, *, minimum: float | None = None) -> float:
    if not _is_number(value) or not math.isfinite(float(value)):
        raise ctx.err(field, f"expected a finite number, got {_short(value)}")
    if minimum is not None and float(value) < minimum:
        raise ctx.err(field, f"must be >= {minimum:g}, got {float(value):g}")
    return float(value)


def _integer(ctx: _Ctx, value: Any, field: str, *, minimum: int) -> int:
    if _is_number(value) and float(value).is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ctx.err(field, f"expected an integer, got {_short(value)}")
    if value < minimum:
        raise ctx.err(field, f"must be >= {minimum}, got {value}")
    return value


def _string(ctx: _Ctx, value: Any, field: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ctx.err(field, f"expected a string, got {_short(value)}")
    if not allow_empty and not value.strip():
        raise ctx.err(field, "must not be empty")
    return value


def _check_keys(ctx: _Ctx, obj: dict, allowed: Sequence[str], field: str) -> None:
    for key in obj:
        if not isinstance(key, str):
            raise ctx.err(field, f"keys must be strings, got {_short(key)}")
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
            _is_number(v) and float(v).is_integer() for v in value):
        parts = [int(v) for v in value]
    if parts is None or not all(0 <= p <= 255 for p in parts):
        raise _error(source, field, f"expected a colour as \"#rrggbb\", \"R,G,B\" or [R, G, B] with values "
                                    f"0-255, got {_short(value)}")
    return (parts[0], parts[1], parts[2])


def _color_text(color: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x %s" % (*color, tuple(color))


def _size(ctx: _Ctx, value: Any) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ctx.err("size", f"expected [height, width] in pixels, got {_short(value)}")
    h, w = (_integer(ctx, v, "size", minimum=8) for v in value)
    if h % 8 or w % 8:
        raise ctx.err("size", f"height and width must be multiples of 8 (the VAE's factor), got [{h}, {w}]")
    return h, w


def _box(ctx: _Ctx, value: Any, field: str, size: tuple[int, int] | None, pixels: bool) -> tuple[float, ...]:
    unit = "pixels" if pixels else "fractions of the image in [0, 1]"
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ctx.err(field, f"expected [x0, y0, x1, y1] ({unit}), got {_short(value)}")
    x0, y0, x1, y1 = (_number(ctx, v, field) for v in value)
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


# ----------------------------------------------------------------------------------------------
# Images


def _open_image(path: str, field: str, source: str | None, what: str) -> Image.Image:
    if not os.path.isfile(path):
        raise _error(source, field, f"{what} file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except Exception as e:  # PIL raises many types for corrupt files
        raise _error(source, field, f"cannot read {what} {path} ({type(e).__name__}: {e})") from None


def _mask_inside(img: Image.Image) -> np.ndarray:
    """bool [h, w]: above 50% — alpha where the image has any transparency, else luminance."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        alpha = np.asarray(img.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return alpha > 127
    if img.mode.startswith("I;16"):
        return np.asarray(img, dtype=np.float64) > 65535 / 2
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        full = 1.0 if arr.max(initial=0) <= 1 else (255.0 if arr.max(initial=0) <= 255 else 65535.0)
        return arr > full / 2
    return np.asarray(img.convert("L")) > 127


def _read_mask(path: str, field: str, source: str | None) -> np.ndarray:
    inside = _mask_inside(_open_image(path, field, source, "mask"))
    if not inside.any():
        raise _error(source, field, f"no pixel of {path} is above 50%; white (or opaque) marks the inside")
    return inside


def _resize_nearest(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    if arr.shape[:2] == (height, width):
        return arr
    if arr.dtype == bool:
        img = Image.fromarray(arr.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
        return np.asarray(img) > 127
    return np.asarray(Image.fromarray(arr).resize((width, height), Image.NEAREST))


def _read_color_map(path: str, field: str, source: str | None) -> np.ndarray:
    return np.asarray(_open_image(path, field, source, "colour map").convert("RGB"))


def _common_colors(rgb: np.ndarray, n: int = 5) -> str:
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    values, counts = np.unique(packed.reshape(-1), return_counts=True)
    top = values[np.argsort(-counts)[:n]]
    return ", ".join("#%06x" % int(v) for v in top)


def _check_color_map(layout: Layout) -> None:
    """Each colour must match a pixel exactly; warns about near misses (anti-aliased edges)."""
    colored = [(s, sub) for s, sub in enumerate(layout.subjects) if sub.color is not None]
    if not colored:
        return
    field = "layout" if layout.format == "official" else "color_map"
    rgb = _read_color_map(layout.color_map_path, field, layout.source)
    rgb16 = rgb.astype(np.int16)
    exact_any = np.zeros(rgb.shape[:2], bool)
    for s, sub in colored:
        hit = np.all(rgb == np.asarray(sub.color, np.uint8), axis=-1)
        if not hit.any():
            raise _error(layout.source, layout.field(s) + (".color" if layout.format != "official" else ""),
                         f"{_color_text(sub.color)} matches no pixel of the colour map {layout.color_map_path} "
                         f"(its most common colours: {_common_colors(rgb)})")
        exact_any |= hit
    near = {}
    for s, sub in colored:
        dist = np.abs(rgb16 - np.asarray(sub.color, np.int16)).max(axis=-1)
        count = int(np.count_nonzero((dist <= NEAR_COLOR_DISTANCE) & ~exact_any))
        if count:
            near[sub.word] = near.get(sub.word, 0) + count
    total = sum(near.values())
    if total >= NEAR_COLOR_MIN_PIXELS:
        detail = ", ".join(f"{n} near {w!r}" for w, n in near.items())
        warnings.warn(f"{layout.source}: {field}: {total} pixels of {layout.color_map_path} are close to but not "
                      f"exactly a subject colour ({detail}) and count as background; anti-aliased edges? "
                      "Save the colour map without anti-aliasing (hard brush, NEAREST resizing, PNG not JPEG)",
                      LayoutWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Parsing


def _parse_subject(ctx: _Ctx, obj: Any, s: int, size: tuple[int, int] | None) -> Subject:
    field = f"subjects[{s}]"
    if not isinstance(obj, dict):
        raise ctx.err(field, f"expected an object with \"word\" and a region, got {_short(obj)}")
    _check_keys(ctx, obj, _SUBJECT_KEYS, field)
    if "word" not in obj:
        raise ctx.err(f"{field}.word", "missing; name the subject's word or phrase as it is written in the prompt")
    word = _string(ctx, obj["word"], f"{field}.word")
    if not word.strip():
        raise ctx.err(f"{field}.word", f"{word!r} tokenises to nothing; give a word of the prompt")
    strength = _number(ctx, obj["strength"], f"{field}.strength") if obj.get("strength") is not None else None
    residual = ctx.path(obj["residual"], f"{field}.residual") if obj.get("residual") is not None else None
    regions = [k for k in _REGION_KEYS if k in obj]
    if len(regions) != 1:
        got = "none" if not regions else " and ".join(regions)
        raise ctx.err(field, f"needs exactly one region of box, box_px, mask, color (got {got})")
    kind = regions[0]
    box = mask_path = color = None
    if kind in ("box", "box_px"):
        box = _box(ctx, obj[kind], f"{field}.{kind}", size, pixels=kind == "box_px")
    elif kind == "mask":
        mask_path = ctx.path(obj["mask"], f"{field}.mask")
        _read_mask(mask_path, ctx.prefix + f"{field}.mask", ctx.source)
    else:
        color = parse_color(obj["color"], ctx.prefix + f"{field}.color", ctx.source)
    return Subject(word=word.strip(), strength=strength, residual=residual, box=box, mask_path=mask_path,
                   color=color)


def _common(ctx: _Ctx, obj: dict) -> dict:
    """Top-level values shared by both formats."""
    if "prompt" not in obj:
        raise ctx.err("prompt", "missing; the layout needs the prompt that names its subjects")
    out = {"prompt": _string(ctx, obj["prompt"], "prompt", allow_empty=False),
           "negative_prompt": _string(ctx, obj.get("negative_prompt") or "", "negative_prompt")}
    out["size"] = _size(ctx, obj["size"]) if obj.get("size") is not None else None
    for key in ("weight_negative", "guidance_weight"):
        if obj.get(key) is not None:
            out[key] = _number(ctx, obj[key], key, minimum=0.0 if key == "guidance_weight" else None)
    if obj.get("guidance_steps") is not None:
        out["guidance_steps"] = _integer(ctx, obj["guidance_steps"], "guidance_steps", minimum=0)
    return out


def _parse_ours(ctx: _Ctx, obj: dict) -> Layout:
    _check_keys(ctx, obj, _TOP_KEYS, "")
    common = _common(ctx, obj)
    if "subjects" not in obj:
        raise ctx.err("subjects", "missing; list the subjects, each with a word and a box, mask or color")
    items = obj["subjects"]
    if not isinstance(items, list) or not items:
        raise ctx.err("subjects", f"expected a non-empty list of subjects, got {_short(items)}")
    subjects = tuple(_parse_subject(ctx, item, s, common["size"]) for s, item in enumerate(items))
    color_map = ctx.path(obj["color_map"], "color_map") if obj.get("color_map") is not None else None
    if color_map is None and any(sub.color is not None for sub in subjects):
        s = next(i for i, sub in enumerate(subjects) if sub.color is not None)
        raise ctx.err(f"subjects[{s}].color", "needs the top-level \"color_map\" (a PNG the colour is looked up in)")
    if color_map is not None and all(sub.color is None for sub in subjects):
        warnings.warn(f"{ctx.source}: color_map is given but no subject uses \"color\"; it is ignored",
                      LayoutWarning, stacklevel=4)
    return Layout(subjects=subjects, color_map_path=color_map, source=ctx.source, format="cones_jax",
                  subject_fields=tuple(f"subjects[{s}]" for s in range(len(subjects))), **common)


def _parse_official(ctx: _Ctx, obj: dict) -> Layout:
    _check_keys(ctx, obj, _OFFICIAL_KEYS, "")
    common = _common(ctx, obj)
    contexts = obj.get("color_context")
    if not isinstance(contexts, dict) or not contexts:
        raise ctx.err("color_context", f"expected {{\"R,G,B\": [word, strength], ...}} with at least one "
                                       f"entry, got {_short(contexts)}")
    residual_dict = obj.get("residual_dict") or {}
    if not isinstance(residual_dict, dict):
        raise ctx.err("residual_dict", f"expected {{word: path}}, got {_short(residual_dict)}")
    listed = obj.get("subject_list") or []
    if not isinstance(listed, list):
        raise ctx.err("subject_list", f"expected [[word, token index], ...], got {_short(listed)}")
    indices: dict[str, list[int]] = {}
    for k, item in enumerate(listed):
        field = f"subject_list[{k}]"
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise ctx.err(field, f"expected [word, token index], got {_short(item)}")
        index = _integer(ctx, item[1], field, minimum=0)
        indices.setdefault(item[0].strip(), []).append(index)
    subjects, fields = [], []
    for key, value in contexts.items():
        field = f"color_context[{key!r}]"
        color = parse_color(key, ctx.prefix + field, ctx.source)
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)):
            raise ctx.err(field, f"expected [word, strength], got {_short(value)}")
        word = value[0].strip()
        if not word:
            raise ctx.err(field, f"word {value[0]!r} tokenises to nothing")
        strength = _number(ctx, value[1], field + " strength")
        residual = None
        if word in indices:
            if word not in residual_dict:
                raise ctx.err("residual_dict", f"has no entry for {word!r}, which subject_list names")
            residual = ctx.path(residual_dict[word], f"residual_dict[{word!r}]")
        subjects.append(Subject(word=word, strength=strength, residual=residual, color=color,
                                token_indices=tuple(indices.get(word, ()))))
        fields.append(ctx.prefix + field)
    words = {sub.word for sub in subjects}
    for k, item in enumerate(listed):
        if item[0].strip() not in words:
            raise ctx.err(f"subject_list[{k}]", f"{item[0]!r} has no colour in color_context; every subject "
                                                "needs a region")
    if obj.get("layout") is None:
        raise ctx.err("layout", "missing; the colour-map image that color_context refers to")
    color_map = ctx.path(obj["layout"], "layout")
    return Layout(subjects=tuple(subjects), color_map_path=color_map, source=ctx.source, format="official",
                  subject_fields=tuple(fields), **common)


def parse_layout(obj: dict | list, base_dir: str, source: str = "<dict>", *, index: int = 0,
                 tokenizer=None, check_residuals: bool = False) -> Layout:
    """A parsed layout file (our schema, an official config list, or one official entry) -> `Layout`.

    Relative paths resolve against `base_dir`. Mask and colour-map files are read and checked here.
    With `tokenizer`, the prompt length, every subject word and any hand-typed token index are checked
    too (see `subject_positions`). With `check_residuals`, residual files must exist.
    """
    base_dir = os.path.abspath(base_dir)
    if isinstance(obj, list):
        if not obj:
            raise _error(source, "[]", "the official config list is empty")
        if not (-len(obj) <= index < len(obj)):
            raise _error(source, f"[{index}]", f"no entry {index}; the config list has {len(obj)}")
        entry = obj[index]
        ctx = _Ctx(source, base_dir, prefix=f"[{index}]." if len(obj) > 1 or index else "")
        if not isinstance(entry, dict):
            raise ctx.err(f"[{index}]", f"expected an object, got {_short(entry)}")
        layout = _parse_official(ctx, entry)
    elif isinstance(obj, dict):
        ctx = _Ctx(source, base_dir)
        if "subjects" not in obj and any(k in obj for k in ("color_context", "subject_list", "residual_dict")):
            layout = _parse_official(ctx, obj)
        else:
            layout = _parse_ours(ctx, obj)
    else:
        raise _error(source, "layout", f"expected an object (or the official list of objects), got {_short(obj)}")
    _check_color_map(layout)
    if check_residuals:
        for s, sub in enumerate(layout.subjects):
            if sub.residual is not None and not os.path.isfile(sub.residual):
                raise _error(source, layout.field(s) + ".residual", f"file not found: {sub.residual}")
    _warn_same_word(layout)
    if tokenizer is not None:
        subject_positions(layout, tokenizer)
    return layout


def load_layout(path: str | os.PathLike, *, index: int = 0, tokenizer=None, check_residuals: bool = False) -> Layout:
    """Reads and validates a layout file (JSON, or YAML when PyYAML is importable).

    Our schema or the official Cones 2 config list (entry `index`); see the module docstring.
    Returned paths are absolute; relative ones resolve against the file's folder.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise LayoutError(f"{path}: layout file not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise LayoutError(f"{path}: cannot read the layout file ({e})") from None
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise LayoutError(f"{path}: reading YAML needs PyYAML, which is not installed; write the layout "
                              "as JSON") from None
        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise LayoutError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise LayoutError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return parse_layout(obj, os.path.dirname(path), source=path, index=index, tokenizer=tokenizer,
                        check_residuals=check_residuals)


def _warn_same_word(layout: Layout) -> None:
    seen: dict[str, int] = {}
    for s, sub in enumerate(layout.subjects):
        if sub.word.lower() in seen:
            t = seen[sub.word.lower()]
            warnings.warn(f"{layout.source}: {layout.field(t)} and {layout.field(s)} both use the word "
                          f"{sub.word!r}: their maps add in the same token columns, so with a large negative "
                          "weight each region cancels the other; use one subject with a mask covering both",
                          LayoutWarning, stacklevel=4)
        else:
            seen[sub.word.lower()] = s


# ----------------------------------------------------------------------------------------------
# Regions and maps


def _box_mask(box: tuple[float, ...], height: int, width: int) -> np.ndarray:
    x0, y0, x1, y1 = box

    def span(a: float, b: float, n: int) -> tuple[int, int]:
        lo = min(max(int(round(a * n)), 0), n - 1)
        hi = min(max(int(round(b * n)), lo + 1), n)
        return lo, hi

    r0, r1 = span(y0, y1, height)
    c0, c1 = span(x0, x1, width)
    out = np.zeros((height, width), bool)
    out[r0:r1, c0:c1] = True
    return out


def region_masks(layout: Layout, height: int, width: int) -> np.ndarray:
    """bool [S, height, width]: each subject's region at image resolution.

    Boxes are rasterised, masks and the colour map resized with NEAREST to (height, width). Warns
    once per pair of overlapping subjects (allowed; see the module docstring).
    """
    if not all(isinstance(v, (int, np.integer)) and v > 0 for v in (height, width)):
        raise LayoutError(f"region_masks: height and width must be positive integers, got {height}, {width}")
    height, width = int(height), int(width)
    out = np.zeros((len(layout.subjects), height, width), bool)
    rgb = None
    for s, sub in enumerate(layout.subjects):
        field = layout.field(s)
        if sub.box is not None:
            out[s] = _box_mask(sub.box, height, width)
        elif sub.mask_path is not None:
            out[s] = _resize_nearest(_read_mask(sub.mask_path, field + ".mask", layout.source), height, width)
        elif sub.color is not None:
            if rgb is None:
                if layout.color_map_path is None:
                    raise _error(layout.source, field + ".color", "needs a colour map (\"color_map\")")
                rgb = _read_color_map(layout.color_map_path, "color_map", layout.source)
                h0, w0 = rgb.shape[:2]
                if abs(h0 / w0 - height / width) > 0.01 * height / width:
                    warnings.warn(f"{layout.source}: color_map is {w0}x{h0} (width x height) but the image is "
                                  f"{width}x{height}; it is stretched to fit", LayoutWarning, stacklevel=2)
                rgb = _resize_nearest(rgb, height, width)
            out[s] = np.all(rgb == np.asarray(sub.color, np.uint8), axis=-1)
        else:
            raise _error(layout.source, field, "has no region (box, mask or color)")
        if not out[s].any():
            raise _error(layout.source, field, f"its region covers no pixel at {height}x{width} "
                                               "(too small to survive resizing?)")
    for s in range(len(out)):
        for t in range(s + 1, len(out)):
            n = int(np.count_nonzero(out[s] & out[t]))
            if n:
                a, b = layout.subjects[s], layout.subjects[t]
                warnings.warn(f"{layout.source}: subjects {a.word!r} ({layout.field(s)}) and {b.word!r} "
                              f"({layout.field(t)}) overlap on {n} of {height * width} pixels; both words are "
                              "strengthened there (and each is suppressed in the rest of the other's region)",
                              LayoutWarning, stacklevel=2)
    return out


def gamma_maps(layout: Layout, masks: np.ndarray, weight_negative: float | None = None) -> np.ndarray:
    """float32 [S, H, W]: γ⁺ (strength) inside each subject's region, γ⁻ (weight_negative) everywhere else.

    As in the official code, γ⁻ covers the background too, not only the other subjects' regions.
    `weight_negative=None` takes the layout's own value.
    """
    if weight_negative is None:
        weight_negative = layout.weight_negative
    if weight_negative is None or not _is_number(weight_negative) or not math.isfinite(float(weight_negative)):
        raise LayoutError(f"weight_negative: expected a finite number (from the layout or the preset), "
                          f"got {_short(weight_negative)}")
    masks = np.asarray(masks, bool)
    if masks.ndim != 3 or masks.shape[0] != len(layout.subjects):
        raise LayoutError(f"gamma_maps: masks must be [S={len(layout.subjects)}, H, W], got {masks.shape}")
    strength = np.asarray([DEFAULT_STRENGTH if sub.strength is None else sub.strength for sub in layout.subjects],
                          np.float32)[:, None, None]
    return np.where(masks, strength, np.float32(weight_negative)).astype(np.float32)


def _aligned_linear(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of linear interpolation with aligned corners, in torch's float32 arithmetic."""
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    src = (np.float32(scale) * np.arange(n_out, dtype=np.float32)).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def resize_bilinear_aligned(map_HxW: np.ndarray, h: int, w: int) -> np.ndarray:
    """float32 [h, w]: bilinear resize with align_corners=True, as torch's
    ``F.interpolate(x[None, None], size=(h, w), mode="bilinear", align_corners=True)`` (the official
    code's `downsampling`), with torch's float32 indices and weights; results agree with torch to
    float32 rounding (1 ulp). Corner pixels map to corner pixels: out[i] samples in[i*(H-1)/(h-1)]."""
    src_HxW = np.asarray(map_HxW, np.float32)
    if src_HxW.ndim != 2 or min(src_HxW.shape) < 1 or h < 1 or w < 1:
        raise ValueError(f"resize_bilinear_aligned: expected a 2-D map and positive sizes, got "
                         f"{src_HxW.shape} -> ({h}, {w})")
    r0, r1, a0, a1 = _aligned_linear(src_HxW.shape[0], h)
    c0, c1, b0, b1 = _aligned_linear(src_HxW.shape[1], w)
    top_hxw = src_HxW[r0][:, c0] * b0 + src_HxW[r0][:, c1] * b1
    bottom_hxw = src_HxW[r1][:, c0] * b0 + src_HxW[r1][:, c1] * b1
    return (top_hxw * a0[:, None] + bottom_hxw * a1[:, None]).astype(np.float32)


def check_prompt_length(tokenizer, prompt: str, field: str = "prompt") -> None:
    """LayoutError when `prompt` has more tokens (start and end included) than the text encoder takes."""
    n = tokenizer.n_tokens(prompt)
    if n > tokenizer.max_length:
        raise LayoutError(f"{field}: {n} tokens with the start and end tokens, over the text encoder's limit of "
                          f"{tokenizer.max_length}; shorten the prompt (words past the limit would be cut off)")


def token_occurrences(tokenizer, ids_row: np.ndarray, word: str, field: str = "word") -> list[list[int]]:
    """Positions of each occurrence of `word`'s sub-word sequence in an encoded prompt (start token = 0)."""
    try:
        occ = tokenizer.find_word(ids_row, word)
    except ValueError:
        raise LayoutError(f"{field}: {word!r} tokenises to nothing; give a word of the prompt") from None
    if not occ:
        prompt = tokenizer.decode(ids_row)
        raise LayoutError(f"{field} {word!r} does not occur in the prompt {prompt!r}; the word must be written "
                          "the same way in both (e.g. 'dogs' does not contain the tokens of 'dog')")
    return occ


def token_positions(tokenizer, ids_row: np.ndarray, word: str, field: str = "word") -> list[int]:
    """All sub-word positions of every occurrence of `word` in an encoded prompt, in order (start token = 0).

    LayoutError naming `field` when the word does not occur.
    """
    return [p for occ in token_occurrences(tokenizer, ids_row, word, field) for p in occ]


def subject_positions(layout: Layout, tokenizer, ids_row: np.ndarray | None = None) -> list[list[int]]:
    """Per subject, all its token positions in the encoded prompt; checks the prompt length, each word,
    and any hand-typed official `subject_list` index (it must be the first sub-word of an occurrence)."""
    check_prompt_length(tokenizer, layout.prompt, _where(layout.source, "prompt"))
    if ids_row is None:
        ids_row = tokenizer.encode([layout.prompt])[0]
    out = []
    for s, sub in enumerate(layout.subjects):
        field = _where(layout.source, layout.field(s) + (".word" if layout.format != "official" else ""))
        occ = token_occurrences(tokenizer, ids_row, sub.word, field)
        starts = [o[0] for o in occ]
        for index in sub.token_indices:
            if index not in starts:
                where = ", ".join(str(i) for i in starts)
                raise _error(layout.source, "subject_list",
                             f"{sub.word!r} is at token index {where} in the prompt (start token = 0), but the "
                             f"config says {index}; fix the index (or drop subject_list: we find positions)")
        out.append([p for o in occ for p in o])
    return out


def attention_maps(gammas_SxHxW: np.ndarray, positions: Sequence[Sequence[int]], seq_len: int,
                   resolutions: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
    """The layout term M of Cones 2, Eq. 7, per cross-attention resolution.

    "{h}x{w}" -> float32 [h*w, seq_len]: subject s's γ map, resized with `resize_bilinear_aligned`
    and flattened row-major, is added (+=, as the official code) into the column of each position in
    `positions[s]` (all sub-words of every occurrence); other columns are 0.
    """
    gammas_SxHxW = np.asarray(gammas_SxHxW, np.float32)
    if gammas_SxHxW.ndim != 3 or gammas_SxHxW.shape[0] != len(positions):
        raise ValueError(f"attention_maps: gammas must be [S, H, W] with S = len(positions) = {len(positions)}, "
                         f"got {gammas_SxHxW.shape}")
    for s, pos in enumerate(positions):
        bad = [int(p) for p in pos if not 0 <= int(p) < seq_len]
        if bad:
            raise ValueError(f"attention_maps: positions[{s}] has {bad} outside 0..{seq_len - 1}")
    out = {}
    for h, w in resolutions:
        m_QxL = np.zeros((h * w, seq_len), np.float32)
        for gamma_HxW, pos in zip(gammas_SxHxW, positions):
            if len(pos):
                col_Q = resize_bilinear_aligned(gamma_HxW, h, w).reshape(-1)
                cols = np.asarray(pos, np.int64)
                np.add.at(m_QxL, (slice(None), cols), np.repeat(col_Q[:, None], len(cols), axis=1))
        out[f"{h}x{w}"] = m_QxL
    return out


def attention_resolutions(height: int, width: int, vae_scale_factor: int = 8, levels: int = 4) -> list[tuple[int, int]]:
    """Cross-attention resolutions of an SD UNet: the latent size, then halved (rounding up) per level."""
    h, w = height // vae_scale_factor, width // vae_scale_factor
    out = []
    for _ in range(levels):
        out.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return out


class LayoutMaps(NamedTuple):
    masks: np.ndarray  # bool [S, H, W]
    gammas: np.ndarray  # float32 [S, H, W]
    positions: list  # per subject, its token positions
    maps: dict  # "{h}x{w}" -> float32 [h*w, L]


def layout_maps(layout: Layout, tokenizer, height: int, width: int, weight_negative: float | None = None,
                resolutions: Sequence[tuple[int, int]] | None = None) -> LayoutMaps:
    """All of the above for one layout: regions, γ maps, token positions and per-resolution maps."""
    positions = subject_positions(layout, tokenizer)
    masks = region_masks(layout, height, width)
    gammas = gamma_maps(layout, masks, weight_negative)
    if resolutions is None:
        resolutions = attention_resolutions(height, width)
    return LayoutMaps(masks, gammas, positions, attention_maps(gammas, positions, tokenizer.max_length, resolutions))


# ----------------------------------------------------------------------------------------------
# Drawing

_PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_layout(image: Image.Image, layout: Layout, masks: np.ndarray, alpha: float = 0.3) -> Image.Image:
    """A copy of `image` with each subject's region tinted and outlined in its own colour and labelled
    with its word (for `sample.py --show-layout`). Masks of another size are resized with NEAREST."""
    base = image.convert("RGB")
    width, height = base.size
    masks = np.asarray(masks, bool)
    out = np.asarray(base, np.float32).copy()
    thick = max(1, min(width, height) // 160)
    labels = []
    for s, mask in enumerate(masks):
        mask = _resize_nearest(mask, height, width)
        color = np.asarray(_PALETTE[s % len(_PALETTE)], np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * color
        inner = mask.copy()
        for _ in range(thick):
            shrunk = inner.copy()
            shrunk[1:] &= inner[:-1]
            shrunk[:-1] &= inner[1:]
            shrunk[:, 1:] &= inner[:, :-1]
            shrunk[:, :-1] &= inner[:, 1:]
            shrunk[[0, -1], :] = False
            shrunk[:, [0, -1]] = False
            inner = shrunk
        out[mask & ~inner] = color
        if mask.any():
            rows, cols = np.nonzero(mask)
            labels.append((int(cols.min()), int(rows.min()), s))
    result = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(result)
    font = _font(max(10, min(width, height) // 32))
    for x, y, s in labels:
        sub = layout.subjects[s] if s < len(layout.subjects) else None
        text = sub.word if sub is not None else f"subject {s}"
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        tw, th = x1 - x0 + 2 * thick + 2, y1 - y0 + 2 * thick + 2
        x, y = min(x, max(width - tw, 0)), min(y, max(height - th, 0))
        draw.rectangle((x, y, x + tw, y + th), fill=_PALETTE[s % len(_PALETTE)])
        draw.text((x + thick + 1 - x0, y + thick + 1 - y0), text, fill=(255, 255, 255), font=font)
    return result
