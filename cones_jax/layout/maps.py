"""Validated layout -> subject regions -> per-resolution attention maps (M of Cones 2, Eq. 7).

1. `region_masks`   bool [S, H, W], one region per subject at image resolution;
2. `gamma_maps`     float32 [S, H, W]: γ⁺ (the subject's `strength`) inside its region and γ⁻
                    (`weight_negative`) everywhere else — the other subjects' regions and the
                    background alike, as in the official code;
3. `attention_maps` "{h}x{w}" -> float32 [h*w, L] per cross-attention resolution: each subject's
                    γ map, resized bilinearly with aligned corners (torch's
                    ``F.interpolate(mode="bilinear", align_corners=True)``) and flattened row-major,
                    is added into the columns of all sub-word tokens of every occurrence of its word
                    in the encoded prompt; all other columns are 0.

The token functions find each subject's word in the encoded prompt (all its sub-words, every
occurrence) and check the hand-typed indices of an official config.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np

from cones_jax.layout.images import read_color_map, read_mask, resize_nearest
from cones_jax.layout.schema import (
    DEFAULT_STRENGTH,
    Layout,
    LayoutError,
    LayoutWarning,
    field_error,
    is_number,
    short,
    where,
)
from cones_jax.models.unet import UNetConfig, cross_attention_resolutions


class TokenizerLike(Protocol):
    """What the token functions use of a tokenizer: `cones_jax.tokenizer.ClipTokenizer`, which this
    layer does not import (docs/ARCHITECTURE.md)."""

    max_length: int

    def encode(self, prompts: list[str] | str) -> np.ndarray:
        ...

    def n_tokens(self, prompt: str) -> int:
        ...

    def find_word(self, ids_row: Sequence[int], word: str) -> list[list[int]]:
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ...


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


def warn_if_stretched(layout: Layout, field: str, shape: tuple[int, ...], height: int, width: int) -> None:
    """A mask or colour map of another aspect ratio than the image is stretched to fit: allowed (a
    mask drawn at another resolution is common), but said, since the regions change shape."""
    h0, w0 = shape
    if abs(h0 / w0 - height / width) > 0.01 * height / width:
        warnings.warn(f"{layout.source}: {field} is {w0}x{h0} (width x height) but the image is {width}x{height}; "
                      "it is stretched to fit", LayoutWarning, stacklevel=3)


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
            mask = read_mask(sub.mask_path, field + ".mask", layout.source)
            warn_if_stretched(layout, field + ".mask", mask.shape[:2], height, width)
            out[s] = resize_nearest(mask, height, width)
        elif sub.color is not None:
            if rgb is None:
                if layout.color_map_path is None:
                    raise field_error(layout.source, field + ".color", "needs a colour map (\"color_map\")")
                rgb = read_color_map(layout.color_map_path, "color_map", layout.source)
                warn_if_stretched(layout, "color_map", rgb.shape[:2], height, width)
                rgb = resize_nearest(rgb, height, width)
            out[s] = np.all(rgb == np.asarray(sub.color, np.uint8), axis=-1)
        else:
            raise field_error(layout.source, field, "has no region (box, mask or color)")
        if not out[s].any():
            raise field_error(layout.source, field, f"its region covers no pixel at {height}x{width} "
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
    if weight_negative is None or not is_number(weight_negative) or not math.isfinite(float(weight_negative)):
        raise LayoutError(f"weight_negative: expected a finite number (from the layout or the preset), "
                          f"got {short(weight_negative)}")
    masks = np.asarray(masks, bool)
    if masks.ndim != 3 or masks.shape[0] != len(layout.subjects):
        raise LayoutError(f"gamma_maps: masks must be [S={len(layout.subjects)}, H, W], got {masks.shape}")
    strength = np.asarray([DEFAULT_STRENGTH if sub.strength is None else sub.strength
                           for sub in layout.subjects], np.float32)[:, None, None]
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


def check_prompt_length(tokenizer: TokenizerLike, prompt: str, field: str = "prompt") -> None:
    """LayoutError when `prompt` has more tokens (start and end included) than the text encoder takes."""
    n = tokenizer.n_tokens(prompt)
    if n > tokenizer.max_length:
        raise LayoutError(f"{field}: {n} tokens with the start and end tokens, over the text encoder's limit of "
                          f"{tokenizer.max_length}; shorten the prompt (words past the limit would be cut off)")


def token_occurrences(tokenizer: TokenizerLike, ids_row: np.ndarray, word: str, field: str = "word") -> list[list[int]]:
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


def token_positions(tokenizer: TokenizerLike, ids_row: np.ndarray, word: str, field: str = "word") -> list[int]:
    """All sub-word positions of every occurrence of `word` in an encoded prompt, in order (start token = 0).

    LayoutError naming `field` when the word does not occur.
    """
    return [p for occ in token_occurrences(tokenizer, ids_row, word, field) for p in occ]


def subject_positions(layout: Layout, tokenizer: TokenizerLike, ids_row: np.ndarray | None = None) -> list[list[int]]:
    """Per subject, all its token positions in the encoded prompt; checks the prompt length, each word,
    and any hand-typed official `subject_list` index (it must be the first sub-word of an occurrence)."""
    check_prompt_length(tokenizer, layout.prompt, where(layout.source, "prompt"))
    if ids_row is None:
        ids_row = tokenizer.encode([layout.prompt])[0]
    out = []
    for s, sub in enumerate(layout.subjects):
        field = where(layout.source, layout.field(s) + (".word" if layout.format != "official" else ""))
        occ = token_occurrences(tokenizer, ids_row, sub.word, field)
        starts = [o[0] for o in occ]
        for index in sub.token_indices:
            if index not in starts:
                found = ", ".join(str(i) for i in starts)
                raise field_error(layout.source, "subject_list",
                                  f"{sub.word!r} is at token index {found} in the prompt (start token = 0), but the "
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


def attention_resolutions(height: int, width: int, vae_scale_factor: int = 8,
                          unet: UNetConfig | None = None) -> list[tuple[int, int]]:
    """The (h, w) grids at which the UNet (`unet`, default: SD 2.x's) cross-attends for an image of
    height x width pixels; see `cones_jax.models.unet.cross_attention_resolutions`."""
    latent_hw = (height // vae_scale_factor, width // vae_scale_factor)
    return cross_attention_resolutions(unet if unet is not None else UNetConfig(), latent_hw)


class LayoutMaps(NamedTuple):
    masks: np.ndarray  # bool [S, H, W]
    gammas: np.ndarray  # float32 [S, H, W]
    positions: list  # per subject, its token positions
    maps: dict  # "{h}x{w}" -> float32 [h*w, L]


def layout_maps(layout: Layout, tokenizer: TokenizerLike, height: int, width: int, weight_negative: float | None = None,
                resolutions: Sequence[tuple[int, int]] | None = None) -> LayoutMaps:
    """All of the above for one layout: regions, γ maps, token positions and per-resolution maps."""
    positions = subject_positions(layout, tokenizer)
    masks = region_masks(layout, height, width)
    gammas = gamma_maps(layout, masks, weight_negative)
    if resolutions is None:
        resolutions = attention_resolutions(height, width)
    return LayoutMaps(masks, gammas, positions, attention_maps(gammas, positions, tokenizer.max_length, resolutions))
