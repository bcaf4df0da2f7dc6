"""Detectors for the shapes world: what object (shape, colour, pattern, outline, eyes) a region holds.

A small CNN reads a 32x32 crop and answers five questions at once; it is trained on crops of
rendered scenes, blurred and jittered so that it also reads the softer images a diffusion model
makes, and validated on held-out renders (`validate`). `find_things` segments an image against its
background and classifies each blob, for prompts without a layout.

    python -m cones_jax.demo.detect --out examples/demo_world/detector.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image, ImageFilter

from cones_jax import convert
from cones_jax.demo import world
from cones_jax.fileio import CheckpointError, load_safetensors, save_safetensors

CROP = 32
NONE = len(world.SHAPES)  # the shape class of a crop with no object
COLOUR_NAMES = tuple(world.COLOURS)
HEADS = {"shape": len(world.SHAPES) + 1, "colour": len(COLOUR_NAMES), "pattern": len(world.PATTERNS),
         "outline": 2, "eyes": 2}
FORMAT = "cones_jax.demo.detector"


class Classifier(nn.Module):
    """Three conv stages (16, 32, 64 channels) and one linear head per question."""

    @nn.compact
    def __call__(self, x_BxHxWx3: jax.Array) -> dict[str, jax.Array]:
        h = x_BxHxWx3.astype(jnp.float32) / 127.5 - 1.0
        for i, ch in enumerate((16, 32, 64)):
            h = nn.relu(nn.Conv(ch, (3, 3), name=f"conv{i}a")(h))
            h = nn.relu(nn.Conv(ch, (3, 3), name=f"conv{i}b")(h))
            h = nn.max_pool(h, (2, 2), (2, 2))
        h = jnp.concatenate([jnp.mean(h, axis=(1, 2)), jnp.max(h, axis=(1, 2)), h.reshape(h.shape[0], -1)], -1)
        h = nn.relu(nn.Dense(128, name="hidden")(h))
        return {k: nn.Dense(n, name=f"head_{k}")(h) for k, n in HEADS.items()}


# --------------------------------------------------------------------------------------------
# Crops and labels
# --------------------------------------------------------------------------------------------


def crop(image: np.ndarray, box: Sequence[float], size: int = CROP) -> np.ndarray:
    """The pixels of `box` (x0, y0, x1, y1 in pixels, clipped to the image) resized to size x size."""
    h, w = image.shape[:2]
    x0, y0 = max(0.0, float(box[0])), max(0.0, float(box[1]))
    x1, y1 = min(float(w), float(box[2])), min(float(h), float(box[3]))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError(f"box {tuple(box)} is empty inside a {w}x{h} image")
    img = Image.fromarray(np.asarray(image, np.uint8))
    return np.asarray(img.resize((size, size), Image.BILINEAR, box=(x0, y0, x1, y1)))


def labels_of(thing: world.Thing | None) -> dict[str, int]:
    if thing is None:
        return {"shape": NONE, "colour": -1, "pattern": -1, "outline": -1, "eyes": -1}
    return {"shape": world.SHAPES.index(thing.shape), "colour": COLOUR_NAMES.index(thing.colour),
            "pattern": world.PATTERNS.index(thing.pattern), "outline": int(thing.outline), "eyes": int(thing.eyes)}


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Area of a∩b over the area of b."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / max((b[2] - b[0]) * (b[3] - b[1]), 1e-9)


def object_window(thing: world.Thing, rng: np.random.Generator,
                  size: int = world.IMAGE_SIZE) -> tuple[float, float, float, float]:
    """A random square window holding the whole object, 1.05-2.2 times its side, inside the image."""
    x0, y0, x1, y1 = thing.box
    side = min(size, (x1 - x0) * rng.uniform(1.05, 2.2))
    wx = rng.uniform(max(0.0, x1 - side), min(x0, size - side))
    wy = rng.uniform(max(0.0, y1 - side), min(y0, size - side))
    return (wx, wy, wx + side, wy + side)


def examples_of_scene(image: np.ndarray, scene: world.Scene,
                      rng: np.random.Generator) -> tuple[list[np.ndarray], list[dict[str, int]]]:
    """(crops, labels) from one rendered scene: a window per object (skipped when another object sits
    mostly inside it too) and one empty window when one is found."""
    crops, labels = [], []
    for thing in scene.things:
        win = object_window(thing, rng)
        if any(o is not thing and _overlap(win, o.box) > 0.4 for o in scene.things):
            continue
        crops.append(crop(image, win))
        labels.append(labels_of(thing))
    for _ in range(10):
        side = rng.uniform(12, 40)
        x, y = rng.uniform(0, world.IMAGE_SIZE - side, size=2)
        win = (x, y, x + side, y + side)
        if all(_overlap(win, o.box) < 0.1 for o in scene.things):
            crops.append(crop(image, win))
            labels.append(labels_of(None))
            break
    return crops, labels


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, colour shift and noise of the kind a small diffusion model's images show."""
    img = Image.fromarray(image)
    radius = rng.uniform(0.0, 1.2)
    if radius > 0.2:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    out = np.asarray(img, np.float32)
    out = out * rng.uniform(0.9, 1.1) + rng.uniform(-15, 15, size=3) + rng.normal(0, rng.uniform(0, 6), out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_dataset(seeds: Sequence[int], *, augment: bool, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng([seed, 0xDE7])
    crops, labels = [], []
    for s in seeds:
        scene = world.random_scene(int(s))
        image = world.render(scene)
        if augment:
            image = degrade(image, rng)
        c, lab = examples_of_scene(image, scene, rng)
        crops += c
        labels += lab
    return np.stack(crops), {k: np.array([lab[k] for lab in labels], np.int32) for k in HEADS}


# --------------------------------------------------------------------------------------------
# Training and use
# --------------------------------------------------------------------------------------------


def classification_loss(logits: dict, labels: dict) -> jax.Array:
    """Cross-entropy summed over the heads; attribute heads skip crops with no object (label -1)."""
    total = 0.0
    for k, lg in logits.items():
        y = labels[k]
        valid = (y >= 0).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(lg, jnp.maximum(y, 0))
        total = total + jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    return total


@dataclasses.dataclass
class Detector:
    params: dict

    def __post_init__(self) -> None:
        self._apply = jax.jit(lambda p, x: Classifier().apply({"params": p}, x))

    def predict(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """Per crop: the most likely class of each head (shape NONE: no object)."""
        if len(crops) == 0:
            return {k: np.zeros((0,), np.int32) for k in HEADS}
        logits = self._apply(self.params, jnp.asarray(np.asarray(crops, np.uint8)))
        return {k: np.asarray(jnp.argmax(v, -1)) for k, v in logits.items()}

    def describe(self, crops: np.ndarray) -> list[dict | None]:
        """Readable predictions: {"shape", "colour", "pattern", "outline", "eyes"} or None (empty)."""
        p = self.predict(crops)
        out = []
        for i in range(len(crops)):
            if p["shape"][i] == NONE:
                out.append(None)
                continue
            out.append({"shape": world.SHAPES[p["shape"][i]], "colour": COLOUR_NAMES[p["colour"][i]],
                        "pattern": world.PATTERNS[p["pattern"][i]], "outline": bool(p["outline"][i]),
                        "eyes": bool(p["eyes"][i])})
        return out


def save_detector(path: str, params: dict, metrics: dict) -> None:
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in convert.flatten(params).items()}
    save_safetensors(path, flat, {"format": FORMAT, **{k: f"{v:.4f}" for k, v in metrics.items()}})


def load_detector(path: str) -> Detector:
    if not os.path.isfile(path):
        raise CheckpointError(f"no detector at {path}; train one with python -m cones_jax.demo.detect --out {path}")
    tensors, meta = load_safetensors(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a shapes-world detector (format {meta.get('format')!r})")
    return Detector(convert.unflatten({tuple(k.split("/")): np.array(v) for k, v in tensors.items()}))


def head_accuracy(detector: Detector, crops: np.ndarray, labels: dict) -> dict[str, float]:
    """Accuracy per head on labelled crops (attribute heads over crops that hold an object)."""
    p = detector.predict(crops)
    out = {}
    for k in HEADS:
        valid = labels[k] >= 0
        out[k] = float(np.mean(p[k][valid] == labels[k][valid]))
    has = labels["shape"] != NONE
    out["all"] = float(np.mean(np.all([p[k][has] == labels[k][has] for k in HEADS], axis=0)))
    return out


def train_detector(out: str, *, train_scenes: int = 12000, steps: int = 3000, batch: int = 128,
                   seed: int = 0) -> dict[str, float]:
    """Trains on degraded renders of scenes 10^6 .. 10^6 + train_scenes (apart from the base model's
    training scenes) and validates on clean and degraded renders of 2000 further scenes."""
    t0 = time.time()
    x, y = make_dataset(range(10 ** 6, 10 ** 6 + train_scenes), augment=True, seed=seed)
    x2, y2 = make_dataset(range(10 ** 6, 10 ** 6 + train_scenes), augment=False, seed=seed + 1)
    x = np.concatenate([x, x2])
    y = {k: np.concatenate([y[k], y2[k]]) for k in y}
    print(f"[detect] {len(x)} training crops in {time.time() - t0:.0f} s", file=sys.stderr)
    model = Classifier()
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, CROP, CROP, 3), jnp.uint8))["params"]
    sched = optax.warmup_cosine_decay_schedule(0.0, 2e-3, min(200, steps // 10), steps, 2e-5)
    opt = optax.adamw(sched, weight_decay=1e-4)
    opt_state = opt.init(params)

    @jax.jit
    def step(params: Any, opt_state: optax.OptState, xb: jax.Array, yb: dict[str, jax.Array]):
        loss, g = jax.value_and_grad(lambda p: classification_loss(model.apply({"params": p}, xb), yb))(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    rng = np.random.default_rng(seed)
    from tqdm import tqdm

    bar = tqdm(range(steps), desc="detector", file=sys.stderr)
    for _ in bar:
        idx = rng.integers(0, len(x), batch)
        xb = x[idx]
        flip = rng.random(batch) < 0.5  # every shape of the world is mirror-symmetric
        xb = np.where(flip[:, None, None, None], xb[:, :, ::-1], xb)
        params, opt_state, loss = step(params, opt_state, xb, {k: v[idx] for k, v in y.items()})
        bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    det = Detector(jax.device_get(params))
    metrics = validate(det)
    save_detector(out, det.params, metrics)
    return metrics


def validate(detector: Detector, n_scenes: int = 2000) -> dict[str, float]:
    """Head accuracies on held-out scenes (2·10^6 ...), clean renders and degraded ones."""
    metrics = {}
    for name, augment in (("clean", False), ("degraded", True)):
        x, y = make_dataset(range(2 * 10 ** 6, 2 * 10 ** 6 + n_scenes), augment=augment, seed=7)
        for k, v in head_accuracy(detector, x, y).items():
            metrics[f"{name}_{k}"] = v
    return metrics


# --------------------------------------------------------------------------------------------
# Finding objects without a layout
# --------------------------------------------------------------------------------------------


def background_colour(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x)."""
    seen = np.zeros_like(mask, bool)
    h, w = mask.shape
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pts = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(np.array(pts))
    return comps


# A found box is square, BOX_SCALE times the blob's larger extent plus BOX_MARGIN pixels: context
# for the classifier, which was trained on windows 1.05-2.2 times an object's side.
BOX_SCALE = 1.3
BOX_MARGIN = 2.0


def object_side(box: Sequence[float]) -> float:
    """The larger extent, in pixels, of the blob a `find_boxes` box was drawn around: about the side
    of the square box the world drew the object in (world.Thing.box; a square fills 0.86 of its)."""
    return (float(box[2]) - float(box[0]) - BOX_MARGIN) / BOX_SCALE


def find_boxes(image: np.ndarray, min_area: int = 30, threshold: float = 60.0) -> list[tuple[float, ...]]:
    """Square boxes around the blobs that differ from the background colour, largest first."""
    diff = np.linalg.norm(image.astype(np.float32) - background_colour(image), axis=-1)
    boxes = []
    for pts in sorted(_components(diff > threshold), key=len, reverse=True):
        if len(pts) < min_area:
            continue
        y0, x0 = pts.min(0)
        y1, x1 = pts.max(0) + 1
        cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * BOX_SCALE + BOX_MARGIN
        boxes.append((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    return boxes


def find_things(detector: Detector, image: np.ndarray) -> list[dict]:
    """The objects found in an image (each with its "box"), largest first."""
    boxes = find_boxes(image)
    if not boxes:
        return []
    found = detector.describe(np.stack([crop(image, b) for b in boxes]))
    return [dict(d, box=b) for d, b in zip(found, boxes) if d is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="examples/demo_world/detector.safetensors")
    p.add_argument("--scenes", type=int, default=12000)
    p.add_argument("--steps", type=int, default=3000)
    args = p.parse_args(argv)
    t0 = time.time()
    metrics = train_detector(args.out, train_scenes=args.scenes, steps=args.steps)
    for k, v in metrics.items():
        print(f"{k:20s} {v:.4f}")
    print(f"trained in {(time.time() - t0) / 60:.1f} min; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
