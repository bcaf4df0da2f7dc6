"""The demo world's fidelity gates: what the demo model must reach, each measured and marked.

    python -m cones_jax.demo.fidelity --model examples/demo_model --seeds 4 --layouts dev

Prints one markdown table, each gate with its measured value, its goal and pass / FAIL:
  single objects   "a {colour} {shape}" for every colour x shape: colour and shape both right (≥ 98%),
                   and each shape drawn as itself (the worst shape ≥ 95%)
  text alignment   unguided prompts naming 2 and 4 objects, each with its colour ("a red star and a
                   blue circle on a grey background"): every named (shape, colour) found (≥ 85%, ≥ 70%)
  placement        layouts of 2, 3 and 4 objects with small, corner and unequal boxes (`layout_set`):
                   every object found inside its own box in its shape and colour (guided: ≥ 90%,
                   ≥ 80%, ≥ 75%; unguided: printed, near chance), and the median ratio of a placed
                   object's area to its box's (0.5-1.2: guidance that places an object the size of a
                   dot, or spills it over its box, does not respect the box)
for each preset, guided at λ = evaluate.GUIDANCE_WEIGHT unless --set guidance_weight=... says
otherwise. Layouts and prompts come from a seeded generator: --layouts dev (DEV_SEED) for tuning,
--layouts held-out (HELD_OUT_SEED) for the reported numbers only, --layout-seed N for a fresh
held-out set once HELD_OUT_SEED's has seen a decision; --guide-box-scale S guides each object to
its box shrunk about its centre (scored against the box as drawn). The detector's ceiling on
renders that follow the layouts is printed alongside.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cones_jax import bundled
from cones_jax import layout as layout_lib
from cones_jax.demo import detect, evaluate, world
from cones_jax.sampler import sample_prompts

if TYPE_CHECKING:
    from cones_jax.pipeline import StableDiffusion

# The generator's seeds. DEV_SEED's layouts and prompts are the ones to look at while tuning the model,
# its captions or guidance; HELD_OUT_SEED's are never used while tuning (not for picking a checkpoint, a
# λ or a prompt form either), so that the numbers reported on them are not fitted to them.
DEV_SEED = 1729
HELD_OUT_SEED = 90210
LAYOUT_SEEDS = {"dev": DEV_SEED, "held-out": HELD_OUT_SEED}

BACKGROUND = evaluate.BACKGROUND
DEFAULT_COUNTS = {2: 8, 3: 8, 4: 8}

# Box sides, fractions of the image: the world's objects span 0.2-0.45 of it (world.SIZES); a layout
# also asks for smaller ones (≤ SMALL_SIDE), where guidance has the fewest latent pixels to work with.
MIN_SIDE, MAX_SIDE, SMALL_SIDE = 0.18, 0.5, 0.25
MARGIN = 0.02        # from the image's edges, and between boxes
CORNER_P = 0.35      # the chance that a box is snapped to a free corner (at least one per layout is)
UNEQUAL = 1.25       # the largest box of a layout is at least this much wider than its smallest

# The gates' goals: (lowest, highest) accepted value.
GOALS = {
    "single": (0.98, 1.0),
    "per_shape": (0.95, 1.0),
    "text@2": (0.85, 1.0),
    "text@4": (0.70, 1.0),
    "placed@2": (0.90, 1.0),
    "placed@3": (0.80, 1.0),
    "placed@4": (0.75, 1.0),
    "area": (0.5, 1.2),
}

Objects = tuple[tuple[str, str], ...]  # (shape, colour) of each object, in prompt order


def size_word(side: float) -> str:
    """The world's size word for an object drawn in a square box of `side` (a fraction of the image):
    the one whose drawn side is nearer (`world.size_word`), so that its area ratio is nearer 1."""
    return world.size_word(side * world.IMAGE_SIZE)


def objects_prompt(objects: Objects, background: str = BACKGROUND, sizes: Sequence[str] | None = None) -> str:
    """The captions' form of a scene without patterns: "a red star and a blue circle on a grey
    background", or with `sizes` (one world size word per object) "a small red star and a big blue
    circle on a grey background" (world.caption keeps the background in most captions and the size
    words in half)."""
    things = [world.Thing(shape, colour) for shape, colour in objects]
    if sizes is not None:
        if len(sizes) != len(objects):
            raise ValueError(f"{len(sizes)} size words for {len(objects)} objects")
        things = [dataclasses.replace(t, size=size) for t, size in zip(things, sizes)]
    # world.describe, so that the words come in the captions' order
    phrases = [world.describe(t, size=sizes is not None) for t in things]
    return world.join_phrases(phrases) + f" on a {background} background"


@dataclasses.dataclass(frozen=True)
class LayoutCase:
    objects: Objects                                      # in box order: left to right
    boxes: tuple[tuple[float, float, float, float], ...]  # (x0, y0, x1, y1), fractions of the image
    size_words: bool = False                              # the prompt names each box's `size_word`

    @property
    def prompt(self) -> str:
        sizes = [size_word(b[2] - b[0]) for b in self.boxes] if self.size_words else None
        return objects_prompt(self.objects, sizes=sizes)


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------


def _distinct_objects(rng: np.random.Generator, k: int) -> Objects:
    """k objects of distinct shapes and distinct colours, so that each (shape, colour) pair names one object."""
    shapes = rng.choice(world.SHAPES, k, replace=False)
    colours = rng.choice(list(world.COLOURS), k, replace=False)
    return tuple((str(s), str(c)) for s, c in zip(shapes, colours))


def multi_object_prompts(k: int, n: int, seed: int) -> list[Objects]:
    """n sets of k objects (distinct shapes and colours) for unguided prompts (`objects_prompt`); the
    i-th set depends on (seed, k, i) alone, so asking for more keeps the first ones."""
    if not 1 <= k <= len(world.SHAPES):
        raise ValueError(f"{k} objects: the world has {len(world.SHAPES)} shapes")
    return [_distinct_objects(np.random.default_rng([seed, 0x7E27, k, i]), k) for i in range(n)]


def _apart(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[2] + MARGIN <= b[0] or b[2] + MARGIN <= a[0] or a[3] + MARGIN <= b[1] or b[3] + MARGIN <= a[1]


def _sides(rng: np.random.Generator, k: int) -> list[float]:
    """k box sides from MIN_SIDE-MAX_SIDE, one of them small when k ≥ 3, unequal when k ≥ 2."""
    while True:
        sides = list(rng.uniform(MIN_SIDE, MAX_SIDE, k))
        if k >= 3:
            sides[int(rng.integers(k))] = rng.uniform(MIN_SIDE, SMALL_SIDE)
        if k == 1 or max(sides) >= UNEQUAL * min(sides):
            return sides


def _boxes(rng: np.random.Generator, sides: Sequence[float],
           tries: int = 100) -> list[tuple[float, float, float, float]] | None:
    """Non-overlapping square boxes of `sides` (in placing order, not the order of `sides`): a random
    one in a corner, then the others largest first (they are the hardest to fit), each in a free
    corner with chance CORNER_P; None when they do not fit."""
    boxes: list[tuple[float, float, float, float]] = []
    first = int(rng.integers(len(sides)))
    for i in [first] + sorted((j for j in range(len(sides)) if j != first), key=lambda j: -sides[j]):
        s = sides[i]
        corners = [(x, y, x + s, y + s) for x in (MARGIN, 1 - MARGIN - s) for y in (MARGIN, 1 - MARGIN - s)]
        free = [c for c in corners if all(_apart(c, b) for b in boxes)]
        box = None
        if free and (not boxes or rng.random() < CORNER_P):
            box = free[int(rng.integers(len(free)))]
        for _ in range(tries if box is None else 0):
            x, y = rng.uniform(MARGIN, 1 - MARGIN - s, 2)
            if all(_apart((x, y, x + s, y + s), b) for b in boxes):
                box = (x, y, x + s, y + s)
                break
        if box is None:
            return None
        boxes.append(tuple(round(float(v), 4) for v in box))
    return boxes


def random_layout_case(rng: np.random.Generator, k: int) -> LayoutCase:
    objects = _distinct_objects(rng, k)
    while (boxes := _boxes(rng, _sides(rng, k))) is None:
        pass
    order = sorted(range(k), key=lambda i: ((boxes[i][0] + boxes[i][2]) / 2, (boxes[i][1] + boxes[i][3]) / 2))
    return LayoutCase(tuple(objects[i] for i in order), tuple(boxes[i] for i in order))


def layout_set(seed: int, counts: Mapping[int, int] | None = None, *, size_words: bool = False) -> list[LayoutCase]:
    """counts[k] layouts of k objects for each k (default DEFAULT_COUNTS): distinct shapes and colours,
    square boxes inside the image that keep apart, sides 0.18-0.5 of the image, unequal within a
    layout, one of at most 0.25 in every layout of 3 or more, at least one box per layout in a corner.
    Each layout depends on (seed, k, its index) alone; `size_words` changes the prompts alone. Tune on
    DEV_SEED; HELD_OUT_SEED is for the reported numbers only and is never used while tuning."""
    counts = DEFAULT_COUNTS if counts is None else counts
    cases = []
    for k in sorted(counts):
        if not 1 <= k <= len(world.SHAPES):
            raise ValueError(f"layouts of {k} objects: the world has {len(world.SHAPES)} shapes")
        cases += [random_layout_case(np.random.default_rng([seed, 0x1A7, k, i]), k) for i in range(counts[k])]
    return [dataclasses.replace(c, size_words=True) for c in cases] if size_words else cases


def scaled_box(box: Sequence[float], scale: float) -> tuple[float, float, float, float]:
    """`box` scaled about its centre by `scale`."""
    x0, y0, x1, y1 = box
    cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
    return (cx - hx, cy - hy, cx + hx, cy + hy)


def layout_of_case(case: LayoutCase, *, strength: float, box_scale: float = 1.0) -> layout_lib.Layout:
    """The case as a layout guiding each object's shape word to its box at γ⁺ = `strength`; λ is the
    sampling config's (evaluate.preset_config: evaluate.GUIDANCE_WEIGHT unless overridden). With
    `box_scale` < 1 the guided region is the box shrunk about its centre (objects are still scored
    against the box itself), to ask for objects that fit their boxes."""
    subjects = tuple(layout_lib.Subject(word=shape, box=scaled_box(box, box_scale) if box_scale != 1.0 else box,
                                        strength=strength)
                     for (shape, _), box in zip(case.objects, case.boxes))
    return layout_lib.Layout(prompt=case.prompt, subjects=subjects, size=(world.IMAGE_SIZE, world.IMAGE_SIZE))


# --------------------------------------------------------------------------------------------
# Scoring one image
# --------------------------------------------------------------------------------------------


def names_every_object(found: Sequence[Mapping[str, Any]], objects: Objects) -> bool:
    """Every named (shape, colour) pair is among the objects `found` (detect.find_things)."""
    pairs = {(f["shape"], f["colour"]) for f in found}
    return all(o in pairs for o in objects)


def text_aligned(detector: detect.Detector, image: np.ndarray, objects: Objects) -> bool:
    return names_every_object(detect.find_things(detector, image), objects)


@functools.cache
def extent_of_shape(shape: str) -> float:
    """A shape's larger extent over the side of the box the world draws it in (a square: 0.86)."""
    r = 200
    ys, xs = np.nonzero(world.shape_mask(shape, 2.5 * r, 2.5 * r, r, 5 * r))
    return max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / (2 * r)


def object_box_side(found: Mapping[str, Any]) -> float:
    """The side, in pixels, of the box the world would draw a found object in: its blob's larger
    extent (detect.object_side) over its shape's `extent_of_shape`, so that a square filling its box
    reads as large as a circle filling it."""
    return detect.object_side(found["box"]) / extent_of_shape(found["shape"])


def score_layout_image(detector: detect.Detector, image: np.ndarray, case: LayoutCase) -> dict[str, Any]:
    """Per object, the largest thing found in the whole image whose box centre lies in the object's
    box: placed when it has the object's shape and colour. `area_ratios`: for each placed object, the
    area of the square box the world would draw the thing in (`object_box_side`) over its layout box's
    area: 1 for an object that fills its box as the model's training scenes fill theirs. Returns
    placement (share of objects), all_placed (0 or 1) and area_ratios."""
    found = detect.find_things(detector, image)
    size = image.shape[0]
    placed, ratios = [], []
    for (shape, colour), box in zip(case.objects, case.boxes):
        x0, y0, x1, y1 = (v * size for v in box)
        inside = [f for f in found if x0 <= (f["box"][0] + f["box"][2]) / 2 <= x1
                  and y0 <= (f["box"][1] + f["box"][3]) / 2 <= y1]
        ok = bool(inside) and inside[0]["shape"] == shape and inside[0]["colour"] == colour
        placed.append(ok)
        if ok:
            ratios.append(object_box_side(inside[0]) ** 2 / ((x1 - x0) * (y1 - y0)))
    return {"placement": float(np.mean(placed)), "all_placed": float(all(placed)), "area_ratios": ratios}


def render_case(case: LayoutCase, seed: int, fill: tuple[float, float] = (0.6, 0.9)) -> np.ndarray:
    """A render that follows the layout: each object solid, inside its box, its side a share `fill`
    (uniform) of the box's side; the default's area ratios spread over 0.36-0.81, median 0.56."""
    rng = np.random.default_rng([seed, 0x6A7])
    things = [evaluate.thing_in_box(world.Thing(shape, colour), [v * world.IMAGE_SIZE for v in box], rng, fill)
              for (shape, colour), box in zip(case.objects, case.boxes)]
    return world.render(world.Scene(tuple(things), BACKGROUND, seed=seed))


def summarise(cases: Sequence[LayoutCase], scores: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """Per number of objects: all_placed and placement (means over images), the median area ratio
    over placed objects (nan when none was placed) and the number of images."""
    out = {}
    for k in sorted({len(c.objects) for c in cases}):
        sel = [s for c, s in zip(cases, scores, strict=True) if len(c.objects) == k]
        ratios = [r for s in sel for r in s["area_ratios"]]
        out[k] = {"all_placed": float(np.mean([s["all_placed"] for s in sel])),
                  "placement": float(np.mean([s["placement"] for s in sel])),
                  "area_ratio": float(np.median(ratios)) if ratios else float("nan"), "images": len(sel)}
    return out


def ground_truth_check(detector: detect.Detector, cases: Sequence[LayoutCase], seeds: Sequence[int],
                       fill: tuple[float, float] = (0.6, 0.9)) -> dict[int, dict[str, float]]:
    """`summarise` of renders that follow each layout (`render_case`): what a perfect model would get,
    the detector's ceiling on these layouts (objects of a small box's 60% can fall under
    detect.find_boxes' smallest blob)."""
    cases_of_images = [c for c in cases for _ in seeds]
    scores = [score_layout_image(detector, render_case(c, s, fill), c) for c in cases for s in seeds]
    return summarise(cases_of_images, scores)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def text_alignment(sd: StableDiffusion, detector: detect.Detector, *, n_objects: int,
                   prompts: Sequence[Objects] | None = None, seeds: Sequence[int] = (0, 1, 2, 3),
                   steps: int = 25, cfg_scale: float = 5.0) -> dict[str, float]:
    """Unguided multi-object text alignment: each of `prompts` (default: 16 sets of `n_objects`
    objects from DEV_SEED) drawn with each seed; the share of images with every named (shape, colour)."""
    prompts = list(prompts if prompts is not None else multi_object_prompts(n_objects, 16, DEV_SEED))
    pairs = [(objs, s) for objs in prompts for s in seeds]
    images = sample_prompts(sd, [objects_prompt(o) for o, _ in pairs], [s for _, s in pairs], steps=steps,
                            cfg_scale=cfg_scale)
    aligned = [text_aligned(detector, img, objs) for img, (objs, _) in zip(images, pairs)]
    return {"aligned": float(np.mean(aligned)), "samples": len(aligned)}


def placement(sd: StableDiffusion, detector: detect.Detector, cases: Sequence[LayoutCase], seeds: Sequence[int],
              preset: str, *, guided: bool, overrides: Mapping[str, Any] | None = None,
              steps: int | None = None, box_scale: float = 1.0) -> dict[int, dict[str, float]]:
    """Each case drawn with each seed on the preset (evaluate.preset_config: λ = GUIDANCE_WEIGHT
    unless `overrides` say otherwise; `steps` fewer than the preset's), guided by its layout
    (`layout_of_case` with `box_scale`) or not; `summarise` of the images' `score_layout_image`."""
    cfg = evaluate.preset_config(preset, overrides, steps=steps)
    layouts = [layout_of_case(c, strength=cfg["weight_positive"], box_scale=box_scale) for c in cases]
    images = evaluate.layout_sampler(sd, cfg, guided=guided).draw(layouts, seeds).images
    cases_of_images = [c for c in cases for _ in seeds]  # draw's order
    return summarise(cases_of_images, [score_layout_image(detector, img, c)
                                       for img, c in zip(images, cases_of_images, strict=True)])


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def mark(value: float, goal: str) -> str:
    lo, hi = GOALS[goal]
    return "pass" if lo <= value <= hi else "FAIL"


def _pct(v: float) -> str:
    # rounded down, so that a failing 97.96% does not read as 98.0%
    return f"{math.floor(1000 * v + 1e-9) / 10:.1f}%"


def gate_rows(measured: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """(gate, measured, goal, mark) rows of what `measured` holds: "single" (single_object_gate),
    "text" (k -> text_alignment), "ceiling" (ground_truth_check), "placement" ((preset or
    "unguided") -> placement), "minutes"."""
    rows = []
    if "single" in measured:
        g = measured["single"]
        rows.append(("single object: colour and shape", _pct(g["colour_and_shape"]), "≥ 98%",
                     mark(g["colour_and_shape"], "single")))
        worst = min(g["per_shape"], key=g["per_shape"].get)
        rows.append((f"single object: shape, worst shape ({worst})", _pct(g["per_shape"][worst]), "≥ 95%",
                     mark(g["per_shape"][worst], "per_shape")))
        rows.append(("single object: shape per shape", ", ".join(f"{s} {_pct(v)}" for s, v in g["per_shape"].items()),
                     "", ""))
    for k, t in sorted(measured.get("text", {}).items()):
        goal = f"text@{k}"
        rows.append((f"text alignment, {k} objects (unguided)", _pct(t["aligned"]), f"≥ {100 * GOALS[goal][0]:.0f}%",
                     mark(t["aligned"], goal)))
    for k, c in sorted(measured.get("ceiling", {}).items()):
        rows.append((f"detector ceiling, {k} objects: all placed / area ratio",
                     f"{_pct(c['all_placed'])} / {c['area_ratio']:.2f}", "", ""))
    for name, per_k in measured.get("placement", {}).items():
        guided = name != "unguided"
        for k, p in sorted(per_k.items()):
            goal = f"placed@{k}"
            if guided and goal in GOALS:
                rows.append((f"placement, {name}, {k} objects: all placed", _pct(p["all_placed"]),
                             f"≥ {100 * GOALS[goal][0]:.0f}%", mark(p["all_placed"], goal)))
            else:
                rows.append((f"placement, {name}, {k} objects: all placed", _pct(p["all_placed"]),
                             "near chance" if not guided else "", ""))
        # Every k's median must be in range: a model that shrinks crowded objects fails at 4 objects.
        ratios = [p["area_ratio"] for _, p in sorted(per_k.items())]
        ok = all(GOALS["area"][0] <= r <= GOALS["area"][1] for r in ratios)  # nan (none placed) fails
        rows.append((f"placement, {name}: median area ratio, {' / '.join(map(str, sorted(per_k)))} objects",
                     " / ".join(f"{r:.2f}" for r in ratios), "0.5-1.2 each" if guided else "",
                     ("pass" if ok else "FAIL") if guided else ""))
    if "minutes" in measured:
        rows.append(("elapsed", f"{measured['minutes']:.1f} min", "", ""))
    return rows


def format_table(rows: Sequence[tuple[str, str, str, str]]) -> str:
    lines = ["| gate | measured | goal | |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def measure(sd: StableDiffusion, detector: detect.Detector, *, seeds: Sequence[int], layout_seed: int,
            counts: Mapping[int, int], presets: Sequence[str], overrides: Mapping[str, Any] | None = None,
            steps: int | None = None, prompts: int = 16, base: bool = True, size_words: bool = False,
            box_scale: float = 1.0, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every gate (the base model's with `base`), in the form `gate_rows` reads; `size_words`: the
    layouts' prompts name each object's size (`size_word`); `box_scale`: see `layout_of_case`."""
    t0 = time.time()
    cases = layout_set(layout_seed, counts, size_words=size_words)
    out: dict[str, Any] = {"ceiling": ground_truth_check(detector, cases, seeds)}
    if base:
        out["single"] = evaluate.single_object_gate(sd, detector, seeds, steps=steps or 25)
        log(f"single-object gate: {out['single']}")
        out["text"] = {}
        for k in (2, 4):
            out["text"][k] = text_alignment(sd, detector, n_objects=k, seeds=seeds, steps=steps or 25,
                                            prompts=multi_object_prompts(k, prompts, layout_seed))
            log(f"text alignment, {k} objects: {out['text'][k]}")
    out["placement"] = {}
    for name, preset, guided in [(p, p, True) for p in presets] + [("unguided", presets[0], False)]:
        out["placement"][name] = placement(sd, detector, cases, seeds, preset, guided=guided, overrides=overrides,
                                           steps=steps, box_scale=box_scale)
        log(f"placement, {name}: {out['placement'][name]}")
    out["minutes"] = (time.time() - t0) / 60
    return out


def parse_counts(text: str) -> dict[int, int]:
    """"2=8,3=8,4=4" -> {2: 8, 3: 8, 4: 4}."""
    try:
        counts = {int(k): int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not like 2=8,3=8,4=8") from None
    if not counts or any(not 2 <= k <= 4 or v < 1 for k, v in counts.items()):
        raise argparse.ArgumentTypeError(f"{text!r}: objects per layout 2-4, at least 1 layout each")
    return counts


def main(argv: list[str] | None = None) -> int:
    from cones_jax.pipeline import load_pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=bundled.demo_model())
    p.add_argument("--detector", default=os.path.join(evaluate.DEMO_WORLD, "detector.safetensors"))
    p.add_argument("--seeds", type=int, default=4,
                   help="seeds per layout, per text prompt and per colour x shape of the single-object gate")
    p.add_argument("--layouts", choices=tuple(LAYOUT_SEEDS), default="dev",
                   help="the layouts and prompts: dev (for tuning) or held-out (for reported numbers only)")
    p.add_argument("--layout-seed", type=int, metavar="N",
                   help="another seed of the generator, instead of --layouts: a fresh held-out set, once "
                        "HELD_OUT_SEED's has seen a decision")
    p.add_argument("--counts", type=parse_counts, default=DEFAULT_COUNTS, metavar="2=N,3=N,4=N",
                   help="layouts per number of objects (default 2=8,3=8,4=8)")
    p.add_argument("--prompts", type=int, default=16, help="text-alignment prompts per number of objects")
    p.add_argument("--steps", type=int, help="sampling steps (default: 25 unguided, each preset's with layouts)")
    p.add_argument("--presets", nargs="+", default=["official", "paper"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of every preset (e.g. guidance_weight=0.5); "
                        f"guidance_weight defaults to the demo model's {evaluate.GUIDANCE_WEIGHT}")
    p.add_argument("--skip-base", action="store_true", help="skip the base model's gates (single objects, text)")
    p.add_argument("--size-words", action="store_true",
                   help='the layouts\' prompts name each object\'s size for its box ("a small red star and a big ...")')
    p.add_argument("--guide-box-scale", type=float, default=1.0, metavar="S",
                   help="guide each object to its box scaled about its centre by S (0 < S <= 1); it is "
                        "still scored against the box itself")
    args = p.parse_args(argv)
    if not 0.0 < args.guide_box_scale <= 1.0:
        p.error(f"--guide-box-scale {args.guide_box_scale} must be in (0, 1]")
    if args.layout_seed is not None and args.layout_seed in (DEV_SEED, HELD_OUT_SEED):
        p.error(f"--layout-seed {args.layout_seed} is a named set's seed; use --layouts instead")
    for name in ("seeds", "prompts", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} must be at least 1")
    try:
        overrides = evaluate.preset_overrides(args.set, args.presets)
    except ValueError as e:
        p.error(str(e).splitlines()[0])
    det = detect.load_detector(args.detector)
    sd = load_pipeline(args.model)
    layout_seed = LAYOUT_SEEDS[args.layouts] if args.layout_seed is None else args.layout_seed
    layouts = args.layouts if args.layout_seed is None else f"seed {args.layout_seed}"
    measured = measure(sd, det, seeds=list(range(args.seeds)), layout_seed=layout_seed,
                       counts=args.counts, presets=args.presets, overrides=overrides, steps=args.steps,
                       prompts=args.prompts, base=not args.skip_base, size_words=args.size_words,
                       box_scale=args.guide_box_scale, log=lambda s: print(s, file=sys.stderr))
    scaled = f", guided to boxes scaled by {args.guide_box_scale}" if args.guide_box_scale != 1.0 else ""
    print(f"fidelity gates, {layouts} layouts {args.counts}{', size words' if args.size_words else ''}{scaled}, "
          f"{args.seeds} seed(s), model {args.model}")
    print(format_table(gate_rows(measured)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
