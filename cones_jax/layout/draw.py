"""Pictures of a layout and of where the model looked: regions drawn over an image, per-subject
cross-attention heat maps, and a grid of images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cones_jax.layout.images import resize_nearest
from cones_jax.layout.schema import Layout

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
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
        mask = resize_nearest(mask, height, width)
        color = np.asarray(PALETTE[s % len(PALETTE)], np.float32)
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
        draw.rectangle((x, y, x + tw, y + th), fill=PALETTE[s % len(PALETTE)])
        draw.text((x + thick + 1 - x0, y + thick + 1 - y0), text, fill=(255, 255, 255), font=font)
    return result


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Decoded pixels in [0, 1] (float, any shape) -> uint8, rounded."""
    return (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def image_grid(images: Sequence[np.ndarray]) -> Image.Image:
    """uint8 images [H, W, 3] of one size in a near-square grid, row by row (black where none is left)."""
    n = len(images)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    h, w = images[0].shape[:2]
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    return Image.fromarray(grid)


def subject_heatmaps(maps_tree: Any, positions: Sequence[Sequence[Sequence[int]]], height: int,
                     width: int) -> np.ndarray:
    """Per-subject cross-attention heat maps [S, H, W] in [0, 1] from the sown attention sums.

    Each layer's map [Q, K] (summed over steps, head-averaged) is reshaped to its grid, the
    columns of the subject's tokens are summed, layers are resized to the image and averaged.
    """
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(maps_tree)]
    out = np.zeros((len(positions), height, width), np.float32)
    for leaf in leaves:  # [Q, K] for one image
        q = leaf.shape[0]
        scale = int(round(np.sqrt(height * width / q)))
        gh, gw = height // scale, width // scale
        for s, occ in enumerate(positions):
            cols = [p for o in occ for p in o]
            m = leaf[:, cols].sum(-1).reshape(gh, gw)
            out[s] += np.asarray(Image.fromarray(m.astype(np.float32)).resize((width, height), Image.BILINEAR))
    out -= out.min(axis=(1, 2), keepdims=True)
    out /= np.maximum(out.max(axis=(1, 2), keepdims=True), 1e-12)
    return out


def heatmap_overlay(image: np.ndarray, heat: np.ndarray) -> Image.Image:
    """The image darkened, with the heat map in red-yellow on top."""
    colour = np.stack([np.ones_like(heat), heat, np.zeros_like(heat)], -1) * 255.0
    alpha = (0.75 * heat)[..., None]
    mixed = image.astype(np.float32) * 0.5 * (1 - alpha) + colour * alpha
    return Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))
