"""The README's picture of the main command: the subjects' photos beside what the layout draws.

    python -m cones_jax.demo.figure --out docs/demo_grid.png

Samples the main command's layout (`examples/layouts/two_subjects.json`, official preset, the
seeds `sample.py` would be given) on the bundled model and lays out, enlarged with nearest-pixel
scaling so the 64 px pixels stay sharp: one row per subject with its photos (the folder of
`examples/demo_world/subjects/` named like its residual file), then the samples, each with the
layout's boxes drawn over a copy below it. Written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from cones_jax import bundled
from cones_jax import layout as layout_lib
from cones_jax.errors import ConesError

SUBJECT_PHOTOS = os.path.join(bundled.demo_world(), "subjects")
GAP = 4  # pixels between tiles, after scaling
LABEL = 14  # pixels of a row's caption band


def subject_photos(lay: layout_lib.Layout, folder: str = SUBJECT_PHOTOS) -> list[tuple[str, list[np.ndarray]]]:
    """(label, photos) per subject with a residual: the photo folder named like the residual file."""
    rows = []
    for s in lay.subjects:
        if not s.residual:
            continue
        name = os.path.splitext(os.path.basename(s.residual))[0]
        where = os.path.join(folder, name)
        if not os.path.isdir(where):
            raise ConesError(f"no photos of subject {name!r} in {folder}; pass --photos with a folder of "
                             f"<name>/ photo folders")
        files = sorted(f for f in os.listdir(where) if f.lower().endswith(".png"))
        rows.append((f"{name} ('{s.word}'): its photos",
                     [np.asarray(Image.open(os.path.join(where, f)).convert("RGB")) for f in files]))
    return rows


def _row(label: str, images: Sequence[np.ndarray], scale: int, width: int) -> Image.Image:
    tile = images[0].shape[0] * scale
    row = Image.new("RGB", (width, LABEL + tile), (255, 255, 255))
    ImageDraw.Draw(row).text((2, 1), label, fill=(0, 0, 0))
    for k, img in enumerate(images):
        big = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
        row.paste(big, (k * (tile + GAP), LABEL))
    return row


def compose(rows: Sequence[tuple[str, Sequence[np.ndarray]]], scale: int = 3) -> Image.Image:
    """Rows of labelled, enlarged tiles stacked top to bottom on white."""
    tile = max(r[1][0].shape[1] for r in rows) * scale
    width = max(len(r[1]) for r in rows) * (tile + GAP) - GAP
    parts = [_row(label, images, scale, width) for label, images in rows]
    out = Image.new("RGB", (width, sum(p.height for p in parts) + GAP * (len(parts) - 1)), (255, 255, 255))
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height + GAP
    return out


def main(argv: list[str] | None = None) -> int:
    from cones_jax.cli import run_cli
    from cones_jax.generate import GenerateOptions, clamp_guidance, layout_config, render, save_png

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", default="demo:two_subjects")
    p.add_argument("--model", default=bundled.demo_model())
    p.add_argument("--photos", default=SUBJECT_PHOTOS, help="folder of <subject>/ photo folders")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--preset", default="official")
    p.add_argument("--scale", type=int, default=3, help="pixels per image pixel")
    p.add_argument("--out", default="docs/demo_grid.png")
    args = p.parse_args(argv)
    if args.scale < 1:
        p.error(f"--scale must be at least 1, got {args.scale}")
    def job() -> None:
        cfg, lay = layout_config(args.preset, layout_lib.load_layout(bundled.resolve_layout(args.layout)), {})
        rows = subject_photos(lay, args.photos)
        cfg, lay, _ = clamp_guidance(cfg, lay)
        drawn = render(lay, cfg, args.seeds, GenerateOptions(progress=False), args.model, log=print)
        images = list(drawn.images)
        # A light tint: the figure is there to show the objects under the boxes.
        boxed = [np.asarray(layout_lib.draw_layout(Image.fromarray(img), lay, prep.masks, alpha=0.12))
                 for img, prep in zip(images, drawn.prepared)]
        rows += [(f'"{lay.prompt}", seeds {" ".join(map(str, args.seeds))}', images), ("with the layout", boxed)]
        figure = compose(rows, args.scale)
        save_png(args.out, figure)
        print(f"wrote {args.out} ({figure.width}x{figure.height})")

    return run_cli(job, parser=p)


if __name__ == "__main__":
    sys.exit(main())
