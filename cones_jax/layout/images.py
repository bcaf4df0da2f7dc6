"""Mask and colour-map images: reading them, what counts as inside, and resizing without new values."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from cones_jax.layout.schema import field_error


def _open_image(path: str, field: str, source: str | None, what: str) -> Image.Image:
    if not os.path.isfile(path):
        raise field_error(source, field, f"{what} file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except Exception as e:  # PIL raises many types for corrupt files
        raise field_error(source, field, f"cannot read {what} {path} ({type(e).__name__}: {e})") from None


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


def read_mask(path: str, field: str, source: str | None) -> np.ndarray:
    inside = _mask_inside(_open_image(path, field, source, "mask"))
    if not inside.any():
        raise field_error(source, field, f"no pixel of {path} is above 50%; white (or opaque) marks the inside")
    return inside


def resize_nearest(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    if arr.shape[:2] == (height, width):
        return arr
    if arr.dtype == bool:
        img = Image.fromarray(arr.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
        return np.asarray(img) > 127
    return np.asarray(Image.fromarray(arr).resize((width, height), Image.NEAREST))


def read_color_map(path: str, field: str, source: str | None) -> np.ndarray:
    return np.asarray(_open_image(path, field, source, "colour map").convert("RGB"))
