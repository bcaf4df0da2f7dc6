"""Quality evaluation on the demo model: does layout guidance place subjects, do residuals carry them?

    python -m cones_jax.demo.evaluate --model examples/demo_model --seeds 16

Measures, with the shapes-world detector (`detect.py`, validated on held-out renders):
  gate       single objects from "a {colour} {shape}" prompts: colour and shape right (base model)
  placement  each subject's shape inside its own layout box
  identity   the subject's whole look (shape, colour, pattern, outline, eyes) inside its box
  confusion  another subject's shape inside a subject's box
  text       the prompt's shapes found anywhere in the image
over a fixed suite of 1-4-subject layouts x seeds, for: no guidance, strengthen-only (γ⁻ = 0),
weaken-only (γ⁺ = 0) and full guidance, each with and without residuals, for both presets.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from cones_jax import bundled
from cones_jax import layout as layout_lib
from cones_jax.config import load_config, parse_overrides
from cones_jax.demo import detect, world
from cones_jax.sampler import LayoutSampler, sample_prompts

if TYPE_CHECKING:
    from cones_jax.pipeline import StableDiffusion

DEMO_WORLD = bundled.demo_world()
DEMO_RESIDUALS = os.path.join(DEMO_WORLD, "residuals")
DEMO_NEURONS = os.path.join(DEMO_WORLD, "neurons")

# The custom subjects: a category word plus a look that no caption can ask for (hidden traits).
SUBJECTS = {
    "sunny": world.Thing("star", "yellow", "solid", "big", outline=True, eyes=True),
    "dotty": world.Thing("heart", "pink", "dotted", "big", outline=True, eyes=False),
    "stripes": world.Thing("circle", "blue", "striped", "big", outline=False, eyes=True),
    "boxy": world.Thing("square", "green", "solid", "big", outline=True, eyes=True),
}

# Boxes (fractions of the image) of the suite's layouts, per number of subjects.
BOXES = {
    1: [(0.25, 0.25, 0.75, 0.75)],
    2: [(0.02, 0.2, 0.48, 0.8), (0.52, 0.2, 0.98, 0.8)],
    3: [(0.02, 0.02, 0.48, 0.48), (0.52, 0.02, 0.98, 0.48), (0.26, 0.52, 0.74, 0.98)],
    4: [(0.02, 0.02, 0.48, 0.48), (0.52, 0.02, 0.98, 0.48), (0.02, 0.52, 0.48, 0.98), (0.52, 0.52, 0.98, 0.98)],
}
BACKGROUND = "grey"

# λ of the suite's layouts (and of the demo layouts in examples/layouts/). The presets' 0.08 is
# tuned for Stable Diffusion; on the demo model it barely moves the shapes, which a larger λ places.
GUIDANCE_WEIGHT = 0.3


def subject_photos(name: str, n: int = 4, seed: int = 0) -> list[np.ndarray]:
    """`n` photos of a subject: big, at random spots, on varied backgrounds, sometimes with company."""
    thing = SUBJECTS[name]
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    out = []
    for k in range(n):
        company = [world.random_thing(rng)] if k % 2 else []
        things = world.place_things(rng, [thing] + company)
        bg = list(world.BACKGROUNDS)[k % len(world.BACKGROUNDS)]
        out.append(world.render(world.Scene(tuple(things), bg, seed=seed * 1000 + k)))
    return out


def write_subject_photos(folder: str = os.path.join(DEMO_WORLD, "subjects")) -> None:
    from PIL import Image

    from cones_jax.generate import save_png

    for name in SUBJECTS:
        for k, img in enumerate(subject_photos(name)):
            save_png(os.path.join(folder, name, f"{k}.png"), Image.fromarray(img))


@dataclasses.dataclass(frozen=True)
class Case:
    names: tuple[str, ...]   # subjects, left to right / top to bottom
    boxes: tuple[tuple[float, ...], ...]

    @property
    def prompt(self) -> str:
        phrases = [f"a {SUBJECTS[n].shape}" for n in self.names]
        return world.join_phrases(phrases) + f" on a {BACKGROUND} background"


def suite() -> list[Case]:
    """Every ordered choice of k subjects with distinct shapes, k = 1..4, in the boxes of BOXES[k]."""
    cases = []
    for k in (1, 2, 3, 4):
        for names in itertools.permutations(SUBJECTS, k):
            if k == 1 or k == 4 or names[0] < names[1]:  # keep the suite small: one order per pair set for 2-3
                cases.append(Case(tuple(names), tuple(BOXES[k])))
    return cases


def layout_of(case: Case, *, residuals: bool, strength: float, residual_dir: str) -> layout_lib.Layout:
    subjects = []
    for name, box in zip(case.names, case.boxes):
        res = os.path.join(residual_dir, f"{name}.safetensors") if residuals else None
        subjects.append(layout_lib.Subject(word=SUBJECTS[name].shape, strength=strength, residual=res, box=box))
    size = world.IMAGE_SIZE
    return layout_lib.Layout(prompt=case.prompt, subjects=tuple(subjects), size=(size, size))


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _px(box: Sequence[float], size: int = world.IMAGE_SIZE):
    return tuple(v * size for v in box)


LOOK = ("shape", "colour", "pattern", "outline", "eyes")


def has_look(found: dict, thing: world.Thing) -> bool:
    """A detected object shows the subject's whole look, hidden traits included."""
    return all(found[a] == getattr(thing, a) for a in LOOK)


def score_image(detector: detect.Detector, image: np.ndarray, case: Case) -> dict[str, float]:
    """Per-image fractions: placement, identity, confusion (over subjects) and text alignment."""
    found = detector.describe(np.stack([detect.crop(image, _px(b)) for b in case.boxes]))
    place = ident = conf = 0
    for name, got, k in zip(case.names, found, range(len(case.names))):
        want = SUBJECTS[name]
        if got is None:
            continue
        place += got["shape"] == want.shape
        ident += has_look(got, want)
        others = {SUBJECTS[o].shape for j, o in enumerate(case.names) if j != k}
        conf += got["shape"] in others
    anywhere = {d["shape"] for d in detect.find_things(detector, image)}
    text = np.mean([SUBJECTS[n].shape in anywhere for n in case.names])
    n = len(case.names)
    return {"placement": place / n, "all_placed": float(place == n), "identity": ident / n,
            "confusion": conf / n, "text": float(text)}


def thing_in_box(thing: world.Thing, box_px: Sequence[float], rng: np.random.Generator,
                 fill: tuple[float, float] = (0.6, 0.9)) -> world.Thing:
    """`thing` drawn inside a layout box (pixels), its side a uniform share `fill` of the box's
    shorter side, at a uniform spot: what a model that follows the layout would draw."""
    x0, y0, x1, y1 = box_px
    side = min(x1 - x0, y1 - y0) * rng.uniform(*fill)
    # max(0, ...): a box filled whole leaves no room, up to rounding
    cx, cy = (rng.uniform(lo + side / 2, lo + side / 2 + max(0.0, hi - lo - side)) for lo, hi in ((x0, x1), (y0, y1)))
    return thing.with_box((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))


def ground_truth_check(detector: detect.Detector, cases: Sequence[Case], seeds: Sequence[int]) -> dict[str, float]:
    """The scores of renders that follow each layout exactly (subjects inside their boxes): what a
    perfect model would get, i.e. the detectors' ceiling on this suite."""
    rows = []
    for case in cases:
        for s in seeds:
            rng = np.random.default_rng([s, 77])
            things = []
            for name, box in zip(case.names, case.boxes):
                things.append(thing_in_box(SUBJECTS[name], _px(box), rng))
            image = world.render(world.Scene(tuple(things), BACKGROUND, seed=s))
            rows.append(score_image(detector, image, case))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def layout_sampler(sd: StableDiffusion, cfg: Mapping[str, Any], *, guided: bool, batch: int = 8) -> LayoutSampler:
    """The suite's sampler: `.draw(layouts, seeds, params=...)` gives one image per (layout, seed)
    pair in order. Layouts, γ, λ and the weights (`params`, e.g. the UNet with concept neurons
    shut) are inputs of one compiled sampler, so a suite costs one compile per setting."""
    return LayoutSampler(sd, cfg, guided=guided, batch=batch)


def sample_layouts(sd: StableDiffusion, layouts: Sequence[layout_lib.Layout], seeds: Sequence[int],
                   cfg: Mapping[str, Any], *, guided: bool, batch: int = 8) -> np.ndarray:
    """uint8 images, one per (layout, seed) pair in order (`layout_sampler` for one call)."""
    return layout_sampler(sd, cfg, guided=guided, batch=batch).draw(layouts, seeds).images


SETTINGS = {  # name -> (guided, γ⁺ scale, γ⁻ on)
    "no guidance": (False, 1.0, True),
    "strengthen only (γ⁻ = 0)": (True, 1.0, False),
    "weaken only (γ⁺ = 0)": (True, 0.0, True),
    "full guidance": (True, 1.0, True),
}


def setting_overrides(preset: str, overrides: dict, steps: int | None, negative: bool) -> dict:
    """What a row changes in its preset: fewer steps (guiding at most all of them), γ⁻ off."""
    extra = {}
    if steps:
        extra.update(steps=steps, guidance_steps=min(load_config(preset, overrides)["guidance_steps"], steps))
    if not negative:
        extra["weight_negative"] = 0.0
    return extra


def preset_config(preset: str, overrides: Mapping[str, Any] | None = None, *, steps: int | None = None,
                  negative: bool = True) -> dict:
    """A preset's config as the suites sample it: λ = GUIDANCE_WEIGHT unless `overrides` set
    guidance_weight, the `overrides`, then a row's `setting_overrides` (fewer steps, γ⁻ off)."""
    overrides = {"guidance_weight": GUIDANCE_WEIGHT, **(overrides or {})}
    return load_config(preset, {**overrides, **setting_overrides(preset, overrides, steps, negative)})


def preset_overrides(sets: Sequence[str], presets: Sequence[str]) -> dict:
    """A command line's `--set key=value` items, checked against every preset they will change
    (a `ValueError` naming the bad one), before any model loads."""
    overrides = parse_overrides(sets)
    for preset in presets:
        load_config(preset, overrides)
    return overrides


def evaluate(sd: StableDiffusion, detector: detect.Detector, *, seeds: Sequence[int],
             presets: Sequence[str] = ("official", "paper"), residual_dir: str = DEMO_RESIDUALS,
             cases: Sequence[Case] | None = None, steps: int | None = None, residuals: Sequence[bool] = (False, True),
             settings: Sequence[str] = tuple(SETTINGS), overrides: dict | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
    """One row per (preset, setting, residuals) with the mean scores per number of subjects;
    `settings` picks rows of SETTINGS; `overrides` (key -> value) change every preset alike, on top
    of the suite's λ (GUIDANCE_WEIGHT)."""
    overrides = {"guidance_weight": GUIDANCE_WEIGHT, **(overrides or {})}
    cases = list(cases or suite())
    case_of_image = [c for c in cases for _ in seeds]  # sample_layouts' order
    rows = []
    for preset, name, with_res in itertools.product(presets, settings, residuals):
        guided, pos, neg = SETTINGS[name]
        if not guided and preset != presets[0]:
            continue  # no guidance is the same for every preset
        cfg = preset_config(preset, overrides, steps=steps, negative=neg)
        layouts = [layout_of(c, residuals=with_res, strength=pos * cfg["weight_positive"], residual_dir=residual_dir)
                   for c in cases]
        t0 = time.perf_counter()
        images = sample_layouts(sd, layouts, seeds, cfg, guided=guided)
        scores = [score_image(detector, img, c) for c, img in zip(case_of_image, images)]
        row = {"preset": preset if guided else "-", "setting": name, "residuals": with_res,
               "seconds": time.perf_counter() - t0}
        for k in (1, 2, 3, 4):
            sel = [s for c, s in zip(case_of_image, scores) if len(c.names) == k]
            if sel:
                for metric in sel[0]:
                    row[f"{metric}@{k}"] = float(np.mean([s[metric] for s in sel]))
        rows.append(row)
        log(format_row(row))
    return rows


def single_object_gate(sd: StableDiffusion, detector: detect.Detector, seeds: Sequence[int], steps: int = 25,
                       cfg_scale: float = 5.0) -> dict[str, Any]:
    """Base-model fidelity: "a {colour} {shape}" for every colour x shape; the largest object found
    must have both right (`score_single_objects`)."""
    truth = [(shape, colour) for shape, colour in itertools.product(world.SHAPES, world.COLOURS) for _s in seeds]
    prompts = [f"a {colour} {shape}" for shape, colour in truth]
    images = sample_prompts(sd, prompts, list(range(len(prompts))), steps=steps,
                                cfg_scale=cfg_scale)
    return score_single_objects(detector, images, truth)


def score_single_objects(detector: detect.Detector, images: Sequence[np.ndarray],
                         truth: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Shares of images whose largest object found has the (shape, colour) of `truth`: shape, colour,
    both, and `per_shape` (shape -> share of that shape's images drawn in it), since one shape the
    model confuses hides in the mean over seven."""
    shape_ok, colour_ok, both = [], [], []
    for img, (shape, colour) in zip(images, truth, strict=True):
        found = detect.find_things(detector, img)
        shape_ok.append(bool(found) and found[0]["shape"] == shape)
        colour_ok.append(bool(found) and found[0]["colour"] == colour)
        both.append(shape_ok[-1] and colour_ok[-1])
    n = len(truth)
    per_shape = {s: float(np.mean([ok for ok, (t, _) in zip(shape_ok, truth) if t == s]))
                 for s in world.SHAPES if any(t == s for t, _ in truth)}
    return {"shape": sum(shape_ok) / n, "colour": sum(colour_ok) / n, "colour_and_shape": sum(both) / n,
            "samples": n, "per_shape": per_shape}


# The identifier V* of each subject's concept neurons ("a sks star"); rare letter runs the
# captions never hold, one per subject so that two subjects' sets can be asked for in one prompt.
IDENTIFIERS = {"sunny": "sks", "dotty": "zwx", "stripes": "qrv", "boxy": "pkd"}
PAIRS = (("sunny", "dotty"), ("stripes", "boxy"))
IDENTITY_GROUPS = tuple((n,) for n in SUBJECTS) + PAIRS  # each subject alone, then the pairs


def subject_traits(things: Sequence[dict], thing: world.Thing) -> dict[str, bool]:
    """Which of a subject's traits the detected `things` show: its shape (some object has it), each
    other trait of LOOK on an object of that shape, and the whole look on one object."""
    same = [t for t in things if t["shape"] == thing.shape]
    out = {"shape": bool(same)}
    out.update({a: any(t[a] == getattr(thing, a) for t in same) for a in LOOK[1:]})
    out["look"] = any(has_look(t, thing) for t in same)
    return out


class IdentityMethod(NamedTuple):
    identifier: bool       # the identifier prompt ("a sks star"), else the class prompt ("a star")
    residuals: bool        # each subject's residual at its shape word
    neurons: str | None    # "own": each subject's set, concatenated; "joint": the group's neurons-joint set


IDENTITY_METHODS = {
    "base model, class prompt": IdentityMethod(False, False, None),
    "residuals": IdentityMethod(False, True, None),
    "base model, identifier prompt": IdentityMethod(True, False, None),
    "concept neurons": IdentityMethod(True, False, "own"),
    "concept neurons, joint fine-tune": IdentityMethod(True, False, "joint"),
}


def neuron_files(names: Sequence[str], method: str) -> list[str]:
    """The .cones files (in a neuron folder) a method shuts for a group: each subject's own set
    (concatenated), or for a joint fine-tune the group's one file from `train.py neurons-joint`
    (Cones Sec. 3.3), named by its subjects ("sunny_dotty.cones"; none for one subject); none for
    the methods without neurons."""
    kind = IDENTITY_METHODS[method].neurons
    if kind == "own":
        return [f"{n}.cones" for n in names]
    if kind == "joint" and len(names) > 1:
        return ["_".join(names) + ".cones"]
    return []


def identity_prompt(names: Sequence[str], method: str, residual_dir: str, *, boxed: bool = False,
                    strength: float = 1.0) -> layout_lib.Layout:
    """The prompt of a group of subjects for one method of `identity_by_method`, in the captions' own
    form (the demo model never saw "photo of"): the identifier prompt ("a sks star and a zwx heart")
    for concept neurons and their base model, the class prompt ("a star and a heart") for the
    residuals (each at its subject's word) and theirs. With `boxed`, each subject's region is its box
    of BOXES (else the whole image). The layout guides the shape word alone: guiding the whole phrase
    ("sks star") drew the subject's shape less often (67% against 91% of single subjects, 16 seeds)."""
    kind = IDENTITY_METHODS[method]
    phrases = [f"a {IDENTIFIERS[n]} {SUBJECTS[n].shape}" if kind.identifier else f"a {SUBJECTS[n].shape}"
               for n in names]
    boxes = BOXES[len(names)] if boxed else [(0.0, 0.0, 1.0, 1.0)] * len(names)
    subjects = tuple(layout_lib.Subject(
        word=SUBJECTS[n].shape, box=box, strength=strength,
        residual=os.path.join(residual_dir, f"{n}.safetensors") if kind.residuals else None)
        for n, box in zip(names, boxes))
    return layout_lib.Layout(prompt=world.join_phrases(phrases), subjects=subjects,
                             size=(world.IMAGE_SIZE, world.IMAGE_SIZE))


def identity_by_method(sd: StableDiffusion, detector: detect.Detector, *, seeds: Sequence[int],
                       neuron_dir: str = DEMO_NEURONS, residual_dir: str = DEMO_RESIDUALS,
                       groups: Sequence[tuple[str, ...]] | None = None,
                       methods: Sequence[str] = tuple(IDENTITY_METHODS), steps: int = 20, with_layout: bool = False,
                       log: Callable[[str], None] = print) -> list[dict]:
    """Cones against Cones 2 on the same subjects (paper preset's DDIM; unguided, or `with_layout`:
    every step guided to the suite's boxes, BOXES, at λ = GUIDANCE_WEIGHT): how often each trait of
    a subject's look appears (`subject_traits`), for each subject alone and for the pairs of PAIRS
    together (default `groups`: IDENTITY_GROUPS). Methods (IDENTITY_METHODS): the residuals on the
    class prompt, the group's concept
    neurons shut on the identifier prompt (a pair: its two sets concatenated, or the set of their
    joint fine-tune: `neuron_files`), and the base model on each prompt (`identity_prompt`). One row
    per (method, group), then one per (method, subjects per image) with the means; traits are
    shares of subjects, `all_shape` and `all_colour` the shares of images with every subject's
    shape, and with each in its colour."""
    from cones_jax import neurons as neurons_lib

    cfg = load_config("paper", {"steps": steps, "guidance_steps": steps, "guidance_weight": GUIDANCE_WEIGHT})
    core = layout_sampler(sd, cfg, guided=with_layout)
    groups = [tuple(g) for g in (groups or IDENTITY_GROUPS)]
    rows = []
    for method in methods:
        label = method + (" + layout" if with_layout else "")
        per_k: dict[int, list] = {}
        for names in groups:
            files = neuron_files(names, method)
            if IDENTITY_METHODS[method].neurons and not files:
                continue  # a joint fine-tune is of several subjects
            lay = identity_prompt(names, method, residual_dir, boxed=with_layout, strength=cfg["weight_positive"])
            params = None
            if files:
                params, _ = neurons_lib.params_with_neurons(sd, [os.path.join(neuron_dir, f) for f in files])
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                if not with_layout:  # unguided pairs share the whole image on purpose: no overlap warning
                    warnings.simplefilter("ignore", layout_lib.LayoutWarning)
                images = core.draw([lay], seeds, params=params).images
            found = [[subject_traits(detect.find_things(detector, img), SUBJECTS[n]) for n in names]
                     for img in images]
            per_k.setdefault(len(names), []).extend(found)
            rows.append(identity_row(label, "+".join(names), found, time.perf_counter() - t0))
            log(format_identity_row(rows[-1]))
        for k, found in sorted(per_k.items()):
            rows.append(identity_row(label, f"mean, {k} per image", found, None))
            log(format_identity_row(rows[-1]))
    return rows


def identity_row(method: str, group: str, found: list[list[dict]], seconds: float | None) -> dict:
    traits = [t for image in found for t in image]
    row = {"method": method, "group": group, "images": len(found), "seconds": seconds,
           "all_shape": float(np.mean([all(t["shape"] for t in image) for image in found])),
           "all_colour": float(np.mean([all(t["shape"] and t["colour"] for t in image) for image in found]))}
    row.update({k: float(np.mean([t[k] for t in traits])) for k in traits[0]})
    return row


IDENTITY_HEADER = ("| method | subjects | shape | + colour | + pattern | + outline | + eyes | whole look | "
                   "images with every subject's shape / and colour | images |\n"
                   "|---|---|---|---|---|---|---|---|---|---|")


def format_identity_row(row: dict) -> str:
    cells = [row["method"], row["group"]] + [f"{100 * row[k]:.0f}%" for k in LOOK + ("look",)]
    cells.append(f"{100 * row['all_shape']:.0f}% / {100 * row['all_colour']:.0f}%")
    return "| " + " | ".join(cells + [str(row["images"])]) + " |"


def format_row(row: dict) -> str:
    cells = [row["preset"], row["setting"], "yes" if row["residuals"] else "no"]
    for k in (1, 2, 3, 4):
        if f"placement@{k}" in row:
            cells.append(f"{100 * row[f'all_placed@{k}']:.0f} / {100 * row[f'identity@{k}']:.0f} / "
                         f"{100 * row[f'confusion@{k}']:.0f} / {100 * row[f'text@{k}']:.0f}")
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = ("| preset | setting | residuals | 1 subject | 2 subjects | 3 subjects | 4 subjects |\n"
                "|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    from cones_jax.pipeline import load_pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=bundled.demo_model())
    p.add_argument("--detector", default=os.path.join(DEMO_WORLD, "detector.safetensors"))
    p.add_argument("--residuals", default=DEMO_RESIDUALS)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--steps", type=int, help="sampling steps (default: each preset's)")
    p.add_argument("--presets", nargs="+", default=["official", "paper"])
    p.add_argument("--gate-seeds", type=int, default=4, help="seeds per colour x shape for the single-object gate")
    p.add_argument("--gate-only", action="store_true", help="only the base model's single-object gate")
    p.add_argument("--neurons", metavar="DIR",
                   help="also compare identity by concept neurons (DIR/<subject>.cones) with the residuals")
    p.add_argument("--identity-only", action="store_true",
                   help="only that comparison (with the shipped demo_world/neurons "
                        "unless --neurons says otherwise)")
    p.add_argument("--residual-rows", action="store_true",
                   help="only the table's rows with residuals (after a change of the residuals alone)")
    p.add_argument("--methods", nargs="+", choices=list(IDENTITY_METHODS), metavar="METHOD",
                   help="with --identity-only: these rows of the comparison only "
                        f"(default all: {'; '.join(IDENTITY_METHODS)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of every preset (e.g. self_recurrence=False); "
                        f"guidance_weight defaults to the demo model's {GUIDANCE_WEIGHT}")
    args = p.parse_args(argv)
    try:
        overrides = preset_overrides(args.set, args.presets)
    except ValueError as e:
        p.error(str(e))
    if args.methods and not args.identity_only:
        p.error("--methods picks rows of the identity comparison; add --identity-only")
    methods = tuple(args.methods or IDENTITY_METHODS)
    if args.identity_only and not args.neurons:
        args.neurons = DEMO_NEURONS
    if args.neurons:
        missing = [f for g in IDENTITY_GROUPS for m in methods for f in neuron_files(g, m)
                   if not os.path.isfile(os.path.join(args.neurons, f))]
        if missing:
            p.error(f"--neurons {args.neurons} lacks {', '.join(missing)}; make them with python train.py neurons "
                    f"(NAME.cones, --config cones1_train_demo, identifier from evaluate.IDENTIFIERS) "
                    f"and python train.py neurons-joint (A_B.cones, from A.cones and B.cones)")
    have_res = all(os.path.isfile(os.path.join(args.residuals, f"{n}.safetensors")) for n in SUBJECTS)
    if args.residual_rows and not have_res:
        p.error(f"--residual-rows: {args.residuals} lacks a residual of every subject "
                f"({', '.join(f'{n}.safetensors' for n in SUBJECTS)})")
    t0 = time.time()
    det = detect.load_detector(args.detector)
    sd = load_pipeline(args.model)
    seeds = list(range(args.seeds))
    if args.gate_only:
        print(f"single-object gate: {single_object_gate(sd, det, list(range(args.gate_seeds)))}")
        print(f"evaluated in {(time.time() - t0) / 60:.1f} min")
        return 0
    if args.neurons:
        print("identity by method; cells: share of subjects showing each trait (on an object of their shape)")
        print(IDENTITY_HEADER)
        for with_layout in (False, True):
            identity_by_method(sd, det, seeds=seeds, residual_dir=args.residuals, neuron_dir=args.neurons,
                               methods=methods, steps=args.steps or 20, with_layout=with_layout)
        if args.identity_only:
            print(f"evaluated in {(time.time() - t0) / 60:.1f} min")
            return 0
    if not args.residual_rows:  # neither depends on the residuals
        print("detector ceiling on ground-truth renders of the suite:",
              {k: round(v, 3) for k, v in ground_truth_check(det, suite(), seeds[:4]).items()})
        print(f"single-object gate: {single_object_gate(sd, det, list(range(args.gate_seeds)))}")
    print("cells: all subjects placed / identity / confusion / text alignment, in %")
    print(TABLE_HEADER)
    evaluate(sd, det, seeds=seeds, presets=args.presets, residual_dir=args.residuals, steps=args.steps,
             residuals=(True,) if args.residual_rows else (False, True) if have_res else (False,),
             overrides=overrides)
    print(f"evaluated in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
