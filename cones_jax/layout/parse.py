"""Reading a layout file: our format (below), or the official Cones 2 list (`cones_jax.layout.official`).

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
subject's residual embedding), and exactly one
region:

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
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np

from cones_jax.layout.images import read_color_map, read_mask
from cones_jax.layout.maps import TokenizerLike, subject_positions
from cones_jax.layout.official import parse_official_entry
from cones_jax.layout.schema import (
    FieldContext,
    Layout,
    LayoutError,
    LayoutWarning,
    Subject,
    check_keys,
    color_text,
    common_values,
    field_error,
    parse_color,
    read_box,
    read_number,
    read_string,
    short,
)

NEAR_COLOR_DISTANCE = 64  # max |ΔR|,|ΔG|,|ΔB| for a pixel to count as a near miss of a subject colour
NEAR_COLOR_MIN_PIXELS = 10  # warn about near misses from this many pixels on

_TOP_KEYS = ("prompt", "negative_prompt", "size", "weight_negative", "guidance_steps", "guidance_weight",
             "color_map", "subjects")
_SUBJECT_KEYS = ("word", "strength", "residual", "box", "box_px", "mask", "color")
_REGION_KEYS = ("box", "box_px", "mask", "color")


def _parse_subject(ctx: FieldContext, obj: Any, s: int, size: tuple[int, int] | None) -> Subject:
    field = f"subjects[{s}]"
    if not isinstance(obj, dict):
        raise ctx.err(field, f"expected an object with \"word\" and a region, got {short(obj)}")
    check_keys(ctx, obj, _SUBJECT_KEYS, field)
    if "word" not in obj:
        raise ctx.err(f"{field}.word", "missing; name the subject's word or phrase as it is written in the prompt")
    word = read_string(ctx, obj["word"], f"{field}.word")
    if not word.strip():
        raise ctx.err(f"{field}.word", f"{word!r} tokenises to nothing; give a word of the prompt")
    strength = read_number(ctx, obj["strength"], f"{field}.strength") if obj.get("strength") is not None else None
    residual = ctx.path(obj["residual"], f"{field}.residual") if obj.get("residual") is not None else None
    regions = [k for k in _REGION_KEYS if k in obj]
    if len(regions) != 1:
        got = "none" if not regions else " and ".join(regions)
        raise ctx.err(field, f"needs exactly one region of box, box_px, mask, color (got {got})")
    kind = regions[0]
    box = mask_path = color = None
    if kind in ("box", "box_px"):
        box = read_box(ctx, obj[kind], f"{field}.{kind}", size, pixels=kind == "box_px")
    elif kind == "mask":
        mask_path = ctx.path(obj["mask"], f"{field}.mask")
        read_mask(mask_path, ctx.prefix + f"{field}.mask", ctx.source)
    else:
        color = parse_color(obj["color"], ctx.prefix + f"{field}.color", ctx.source)
    return Subject(word=word.strip(), strength=strength, residual=residual, box=box, mask_path=mask_path,
                   color=color)


def _parse_ours(ctx: FieldContext, obj: dict) -> Layout:
    check_keys(ctx, obj, _TOP_KEYS, "")
    common = common_values(ctx, obj)
    if "subjects" not in obj:
        raise ctx.err("subjects", "missing; list the subjects, each with a word and a box, mask or color")
    items = obj["subjects"]
    if not isinstance(items, list) or not items:
        raise ctx.err("subjects", f"expected a non-empty list of subjects, got {short(items)}")
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


def parse_layout(obj: dict | list, base_dir: str, source: str = "<dict>", *, index: int = 0,
                 tokenizer: TokenizerLike | None = None, check_residuals: bool = False) -> Layout:
    """A parsed layout file (our schema, an official config list, or one official entry) -> `Layout`.

    Relative paths resolve against `base_dir`. Mask and colour-map files are read and checked here.
    With `tokenizer`, the prompt length, every subject word and any hand-typed token index are checked
    too (see `subject_positions`). With `check_residuals`, residual files must exist.
    """
    base_dir = os.path.abspath(base_dir)
    if isinstance(obj, list):
        if not obj:
            raise field_error(source, "[]", "the official config list is empty")
        if not (-len(obj) <= index < len(obj)):
            raise field_error(source, f"[{index}]", f"no entry {index}; the config list has {len(obj)}")
        entry = obj[index]
        ctx = FieldContext(source, base_dir, prefix=f"[{index}]." if len(obj) > 1 or index else "")
        if not isinstance(entry, dict):
            raise ctx.err(f"[{index}]", f"expected an object, got {short(entry)}")
        layout = parse_official_entry(ctx, entry)
    elif isinstance(obj, dict):
        ctx = FieldContext(source, base_dir)
        if "subjects" not in obj and any(k in obj for k in ("color_context", "subject_list", "residual_dict")):
            layout = parse_official_entry(ctx, obj)
        else:
            layout = _parse_ours(ctx, obj)
    else:
        raise field_error(source, "layout", f"expected an object (or the official list of objects), got {short(obj)}")
    _check_color_map(layout)
    if check_residuals:
        for s, sub in enumerate(layout.subjects):
            if sub.residual is not None and not os.path.isfile(sub.residual):
                raise field_error(source, layout.field(s) + ".residual", f"file not found: {sub.residual}")
    _warn_same_word(layout)
    if tokenizer is not None:
        subject_positions(layout, tokenizer)
    return layout


def load_layout(path: str | os.PathLike, *, index: int = 0, tokenizer: TokenizerLike | None = None,
                check_residuals: bool = False) -> Layout:
    """Reads and validates a layout file (JSON, or YAML when PyYAML is importable).

    Our schema or the official Cones 2 config list (entry `index`); see the module docstring.
    Returned paths are absolute; relative ones resolve against the file's folder.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise LayoutError(f"{path} is a folder; pass the layout's .json file")
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


def _common_colors(rgb: np.ndarray, n: int = 5) -> str:
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    values, counts = np.unique(packed.reshape(-1), return_counts=True)
    top = values[np.argsort(-counts)[:n]]
    return ", ".join(f"#{int(v):06x}" for v in top)



def _check_color_map(layout: Layout) -> None:
    """Each colour must match a pixel exactly; warns about near misses (anti-aliased edges)."""
    colored = [(s, sub) for s, sub in enumerate(layout.subjects) if sub.color is not None]
    if not colored:
        return
    field = "layout" if layout.format == "official" else "color_map"
    rgb = read_color_map(layout.color_map_path, field, layout.source)
    rgb16 = rgb.astype(np.int16)
    exact_any = np.zeros(rgb.shape[:2], bool)
    for s, sub in colored:
        hit = np.all(rgb == np.asarray(sub.color, np.uint8), axis=-1)
        if not hit.any():
            raise field_error(layout.source, layout.field(s) + (".color" if layout.format != "official" else ""),
                              f"{color_text(sub.color)} matches no pixel of the colour map {layout.color_map_path} "
                              f"(its most common colours: {_common_colors(rgb)})")
        exact_any |= hit
    near = {}
    for _, sub in colored:
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
