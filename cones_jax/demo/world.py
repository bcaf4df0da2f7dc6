"""The shapes world: a procedural renderer of small captioned scenes, deterministic from a seed.

A scene holds 1-4 objects on a background. Each object has a shape, a colour, a fill pattern and a
size, which captions name ("a big red striped star and a blue circle on a grey background"), and two
*hidden traits* that captions never name: a dark outline and a pair of eyes. The hidden traits play
the part of what makes one dog differ from another in Stable Diffusion's world: the base model
learns that "a star" sometimes has eyes, but no words ask for them, so a custom subject ("my star":
a yellow star with an outline and eyes) can only be reached through a residual or concept neurons.

Rendering is 4x supersampled and box-filtered down, so edges are anti-aliased as photographs are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart", "ring", "cross")
COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 25),
    "green": (35, 165, 60),
    "blue": (35, 75, 215),
    "purple": (135, 45, 185),
    "pink": (245, 125, 190),
}
BACKGROUNDS = {
    "grey": (128, 128, 128),
    "black": (22, 22, 22),
    "white": (236, 236, 236),
    "brown": (115, 80, 50),
}
PATTERNS = ("solid", "striped", "dotted")
SIZES = {"small": (13, 17), "big": (23, 29)}  # object side in pixels at 64 px
IMAGE_SIZE = 64
# Object sides of the "continuous" scene sizes (pixels at 64 px): the span of the layouts that the
# demo's gates draw boxes from (0.18-0.5 of the image), each side named by `size_word`.
CONTINUOUS_SIDES = (11.0, 32.0)
SCENE_SIZES = ("words", "continuous")
SUPERSAMPLE = 4

# Words the demo tokenizer knows whole: caption words, the category words, and the words of the
# prompt templates that residual training and the notebook use.
CAPTION_WORDS = (
    list(SHAPES) + list(COLOURS) + list(BACKGROUNDS) + list(PATTERNS) + list(SIZES)
    + "a an the and on with background , . of photo picture rendering image my one two".split()
)


@dataclasses.dataclass(frozen=True)
class Thing:
    """One object of a scene. `box` is (x0, y0, x1, y1) in pixels of the 64 px image."""

    shape: str
    colour: str
    pattern: str = "solid"
    size: str = "big"
    outline: bool = False
    eyes: bool = False
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def with_box(self, box: Sequence[float]) -> Thing:
        return dataclasses.replace(self, box=tuple(float(v) for v in box))


@dataclasses.dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str
    seed: int = 0


# --------------------------------------------------------------------------------------------
# Sampling scenes and captions
# --------------------------------------------------------------------------------------------

N_OBJECTS_P = (0.35, 0.3, 0.2, 0.15)  # 1, 2, 3, 4 objects
PATTERN_P = (0.6, 0.2, 0.2)
HIDDEN_TRAIT_P = 0.2


def _place(rng: np.random.Generator, side: float, taken: list[tuple[float, ...]], size: int,
           tries: int = 50) -> tuple[float, float, float, float] | None:
    """A box of `side` pixels that does not touch any box in `taken` (2 px margin)."""
    for _ in range(tries):
        x0 = rng.uniform(1, size - side - 1)
        y0 = rng.uniform(1, size - side - 1)
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[2] + 2 <= b[0] or b[2] + 2 <= box[0] or box[3] + 2 <= b[1] or b[3] + 2 <= box[1] for b in taken):
            return box
    return None


def random_thing(rng: np.random.Generator) -> Thing:
    return Thing(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))),
                 pattern=str(rng.choice(PATTERNS, p=PATTERN_P)), size=str(rng.choice(list(SIZES))),
                 outline=bool(rng.random() < HIDDEN_TRAIT_P), eyes=bool(rng.random() < HIDDEN_TRAIT_P))


def size_word(side: float) -> str:
    """The size word for an object of `side` pixels (at 64 px): the `SIZES` entry whose middle side
    is nearer on a log scale (the two meet at about 19.7 px, 0.31 of the image)."""
    mids = {name: (lo + hi) / 2 for name, (lo, hi) in SIZES.items()}
    return min(mids, key=lambda name: abs(math.log(side / mids[name])))


def place_things(rng: np.random.Generator, things: Sequence[Thing], size: int = IMAGE_SIZE,
                 sizes: str = "words") -> list[Thing]:
    """Puts each thing at a random free spot. With `sizes` "words", a thing is drawn at a side of its
    size word's `SIZES` range; with no room left it shrinks to small, then is dropped. With
    "continuous", its side is uniform in `CONTINUOUS_SIDES` and its size word follows the side
    (`size_word`); with no room left it is tried at a side of the range's lower half, then at the
    smallest side, then dropped."""
    if sizes not in SCENE_SIZES:
        raise ValueError(f"scene sizes {sizes!r} is not one of {', '.join(SCENE_SIZES)}")
    placed: list[Thing] = []
    taken: list[tuple[float, ...]] = []
    for thing in things:
        if sizes == "continuous":
            lo, hi = CONTINUOUS_SIDES
            ranges = [(None, (lo, hi)), (None, (lo, (lo + hi) / 2)), (None, (lo, lo))]
        else:
            ranges = [(name, SIZES[name]) for name in dict.fromkeys((thing.size, "small"))]
        for name, (lo, hi) in ranges:
            side = rng.uniform(lo, hi)
            box = _place(rng, side * size / IMAGE_SIZE, taken, size)
            if box is not None:
                placed.append(dataclasses.replace(thing, size=name or size_word(side), box=box))
                taken.append(box)
                break
    return placed


def random_scene(seed: int, size: int = IMAGE_SIZE, sizes: str = "words") -> Scene:
    """A random scene; a pure function of `seed` and `sizes` (`place_things`)."""
    rng = np.random.default_rng([seed, 0x5CE7E])
    n = int(rng.choice(len(N_OBJECTS_P), p=N_OBJECTS_P)) + 1
    things = place_things(rng, [random_thing(rng) for _ in range(n)], size, sizes)
    return Scene(tuple(things), str(rng.choice(list(BACKGROUNDS))), seed)


def describe(thing: Thing, *, size: bool = True, colour: bool = True, pattern: bool = True) -> str:
    """"a big red striped star": the words a caption may use for one thing (hidden traits never)."""
    words = ["a"]
    if size:
        words.append(thing.size)
    if colour:
        words.append(thing.colour)
    if pattern and thing.pattern != "solid":
        words.append(thing.pattern)
    words.append(thing.shape)
    return " ".join(words)


def join_phrases(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return " , ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """A caption of `scene`. With `rng`, words are dropped at random (size often, colour and pattern
    rarely, the background sometimes) and objects listed in random order, so the model also learns
    short prompts; without it, the full caption in scene order."""
    things = list(scene.things)
    if rng is None:
        phrases = [describe(t) for t in things]
        return join_phrases(phrases) + f" on a {scene.background} background"
    order = rng.permutation(len(things))
    phrases = [describe(things[i], size=rng.random() < 0.5, colour=rng.random() < 0.9,
                        pattern=rng.random() < 0.85) for i in order]
    text = join_phrases(phrases)
    if rng.random() < 0.7:
        text += f" on a {scene.background} background"
    return text


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = 0.86 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a) + 0.1 * r))  # centred on its area
        return pts
    if shape == "cross":
        w = 0.34 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    if shape == "heart":
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 15.5))
        return pts
    raise ValueError(f"no polygon for shape {shape!r}")


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """A binary mask (bool [size, size]) of `shape` centred at (cx, cy) with radius r, in pixels."""
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    if shape in ("circle", "ring"):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            q = 0.55 * r
            d.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
    else:
        d.polygon(_polygon(shape, cx, cy, r), fill=255)
    return np.asarray(img) > 127


def _pattern_mask(pattern: str, size: int, scale: float, phase: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / scale
    if pattern == "striped":
        return ((xx + yy + phase) % 5.0) < 2.0
    if pattern == "dotted":
        gx = (xx + phase) % 5.0 - 2.5
        gy = (yy + phase) % 5.0 - 2.5
        return gx * gx + gy * gy < 1.3
    return np.zeros((size, size), bool)


def _outline_colour(background: str) -> np.ndarray:
    return np.array((250, 250, 250) if background == "black" else (15, 15, 15), np.float32)


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as uint8 RGB [size, size, 3]."""
    ss = size * SUPERSAMPLE
    scale = ss / IMAGE_SIZE  # pattern periods are fixed in 64 px units
    rng = np.random.default_rng([scene.seed, 0xBAC])
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    ramp = np.linspace(-1.0, 1.0, ss, dtype=np.float32)[:, None, None]
    canvas = np.broadcast_to(bg + rng.uniform(-12, 12) * ramp, (ss, ss, 3)).copy()
    k = SUPERSAMPLE * size / IMAGE_SIZE
    for thing in scene.things:
        x0, y0, x1, y1 = (v * ss / size for v in thing.box)
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        body = shape_mask(thing.shape, cx, cy, r, ss)
        colour = np.array(COLOURS[thing.colour], np.float32)
        if thing.pattern == "striped":
            accent = 0.45 * colour + 0.55 * 255.0
        else:
            accent = 0.45 * colour
        if thing.outline:
            # a band of ~1.5 px at 64 px just outside the body
            grown = shape_mask(thing.shape, cx, cy, r + 1.6 * k, ss)
            if thing.shape == "ring":
                grown |= body
                inner = shape_mask("circle", cx, cy, 0.55 * r - 1.6 * k, ss)
                grown &= ~inner
            canvas[grown & ~body] = _outline_colour(scene.background)
        canvas[body] = colour
        pat = _pattern_mask(thing.pattern, ss, scale, float(rng.uniform(0, 5))) & body
        canvas[pat] = accent
        if thing.eyes:
            er = max(0.16 * r, 1.3 * k)
            for ex in (cx - 0.33 * r, cx + 0.33 * r):
                ey = cy - 0.12 * r
                eye = shape_mask("circle", ex, ey, er, ss)
                canvas[eye] = (250, 250, 250)
                canvas[shape_mask("circle", ex, ey + 0.15 * er, 0.55 * er, ss)] = (10, 10, 10)
    canvas += rng.normal(0.0, 2.0, canvas.shape[:2] + (1,)).astype(np.float32)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.BOX))


def render_batch(seeds: Sequence[int], size: int = IMAGE_SIZE, sizes: str = "words") -> tuple[np.ndarray, list[Scene]]:
    scenes = [random_scene(int(s), size, sizes) for s in seeds]
    return np.stack([render(s, size) for s in scenes]), scenes
