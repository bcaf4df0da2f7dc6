"""The app's model side, without Gradio: one model per process, the CLI's sampler core and checks,
images with the layout drawn over them, and attention heat maps.

`Engine.generate` is what the Generate button runs; tests/test_app.py calls it directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from PIL import Image

from cones_jax import layout as layout_lib
from cones_jax.app import state
from cones_jax.config import Config
from cones_jax.errors import ConesError, LayoutError
from cones_jax.fileio import atomic_output, check_output_dir
from cones_jax.generate import GenerateOptions, check_artifacts, check_seeds, clamp_guidance, layout_config
from cones_jax.layout.draw import heatmap_overlay, subject_heatmaps
from cones_jax.pipeline import StableDiffusion, load_pipeline
from cones_jax.sampler import Drawn, LayoutSampler, check_config

DISPLAY_SIDE = 256  # images smaller than this (the demo model's 64 px) are shown enlarged, without smoothing
PAGE_SOURCE = "the page"  # where a layout came from, in messages
MAX_SAMPLERS = 16  # LayoutSamplers kept, one per config (each CFG scale or λ is one); the oldest goes first


@dataclasses.dataclass
class Result:
    """One Generate: images with the layout drawn on them, optional heat maps, and what it cost."""

    images: list[tuple[Image.Image, str]]  # (image with the layout over it, caption)
    heatmaps: list[tuple[Image.Image, str]]  # (heat map over the image, "seed N: word")
    files: list[str]  # the PNGs written to the output folder
    seconds: float  # sampling time, compile time apart
    compile_seconds: float  # 0 when the compiled sampler was reused
    notes: list[str]  # warnings about the layout (overlaps...), one line each


@contextlib.contextmanager
def in_page_terms() -> Iterator[None]:
    """A `ConesError` from the layout parser or the sampler names fields of a layout file
    (`subjects[1].residual`); the page calls them boxes (box 2: residual)."""
    try:
        yield
    except ConesError as e:
        text = re.sub(r"subjects\[(\d+)\]\.?", lambda m: f"box {int(m[1]) + 1}: ", str(e))
        raise type(e)(text.replace(f"{PAGE_SOURCE}: ", "")) from None


class Engine:
    """The loaded model and the samplers built on it; `generate` runs one request at a time.

    Compiled samplers live on the model (`sd.compiled`, keyed by their shapes and the step
    callback), so the step callback is one function for the engine's lifetime: a new layout,
    prompt, seed, λ, γ⁺ or CFG scale reuses the compiled sampler; only new steps, a new scheduler,
    a new image size or attention maps on/off compile again. Each seed is one sampler call of
    `batch` images (default: one per local device), so the number of seeds never recompiles either.
    """

    def __init__(self, model: str, out_dir: str, *, dtype: str = "fp32", batch: int | None = None,
                 sd: StableDiffusion | None = None) -> None:
        check_output_dir(out_dir, "out_dir")
        self.model, self.out_dir = model, os.path.abspath(out_dir)
        self.sd = sd if sd is not None else load_pipeline(model, dtype)
        self.batch = batch or jax.local_device_count()
        self.lock = threading.Lock()  # one request on the model at a time, whatever the web server does
        self.samplers: dict[tuple, LayoutSampler] = {}
        self.progress: Callable[[int], None] | None = None
        self.on_step = self._step  # one object: it is part of the compiled samplers' cache key
        self.runs = 0

    def _step(self, i: int) -> None:
        hear = self.progress
        if hear is not None:
            hear(int(i))

    # ------------------------------------------------------------------------------------------
    # checks the page shows as the user types

    def word_problems(self, prompt: str, words: Sequence[str]) -> list[str]:
        """One message per subject word that is empty or not in the prompt (none when all are)."""
        tok = self.sd.tokenizer
        if not prompt.strip():
            return ["write the prompt that names the subjects"]
        try:
            layout_lib.check_prompt_length(tok, prompt)
        except LayoutError as e:
            return [str(e)]
        ids = tok.encode([prompt])[0]
        problems = []
        for k, word in enumerate(words, 1):
            if not word.strip():
                problems.append(f"box {k}: give its subject's word")
                continue
            try:
                layout_lib.token_occurrences(tok, ids, word.strip(), f"box {k}: word")
            except LayoutError as e:
                problems.append(str(e))
        return problems

    def layout(self, boxes: Sequence[state.Box], settings: state.Settings) -> tuple[layout_lib.Layout, list[str]]:
        """The page's layout through the same parser as a layout file (what `sample.py` would read),
        and its warnings (overlapping boxes...) as lines for the page."""
        state.check_boxes(boxes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", layout_lib.LayoutWarning)
            lay = layout_lib.parse_layout(state.layout_dict(boxes, settings), self.out_dir, source=PAGE_SOURCE,
                                          check_residuals=True)
        return lay, [str(w.message) for w in caught if issubclass(w.category, layout_lib.LayoutWarning)]

    # ------------------------------------------------------------------------------------------

    def sampler(self, cfg: Config, attention: bool) -> LayoutSampler:
        key = (tuple((k, repr(cfg[k])) for k in cfg), attention)
        core = self.samplers.get(key)
        if core is None:
            if len(self.samplers) >= MAX_SAMPLERS:  # cheap to rebuild: the compiled code stays on sd.compiled
                self.samplers.pop(next(iter(self.samplers)))
            core = LayoutSampler(self.sd, cfg, attention_maps=attention, batch=self.batch, on_step=self.on_step)
            self.samplers[key] = core
        return core

    def generate(self, boxes: Sequence[state.Box], settings: state.Settings, *, attention: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> Result:
        """Samples one image per seed of the page's layout. Every input is checked first (boxes, words,
        residuals against this model, settings) and any problem is a `ConesError` whose message the
        page shows; images go to `out_dir` only."""
        with in_page_terms():
            lay, notes = self.layout(boxes, settings)
            seeds = check_seeds(list(settings.seeds))
            overrides = {"steps": int(settings.steps), "cfg_scale": float(settings.cfg_scale)}
            cfg, lay = layout_config(settings.preset, lay, overrides)
            check_config(cfg)
            cfg, lay, _ = clamp_guidance(cfg, lay)  # fewer steps than guided steps: guide them all, as sample.py
            check_artifacts(lay, GenerateOptions(), None, self.sd)
            core = self.sampler(cfg, attention)
        calls = -(-len(seeds) // self.batch)
        total = calls * int(cfg["steps"])
        with self.lock:
            done = [0]

            def step(i: int) -> None:  # the sampler's steps restart at 0 on each call
                done[0] += 1
                if progress is not None:
                    progress(min(done[0], total), total)

            self.progress = step
            try:
                with warnings.catch_warnings(record=True) as caught:  # a residual trained for another word
                    warnings.simplefilter("always")
                    drawn = core.sample([(lay, s) for s in seeds])
                notes += [str(w.message) for w in caught  # ours only: the user's input, not a library's
                          if issubclass(w.category, UserWarning) and f"{os.sep}cones_jax{os.sep}" in w.filename]
            finally:
                self.progress = None
            self.runs += 1
            run = self.runs
        return self.pictures(drawn, lay, seeds, run, notes, attention)

    def pictures(self, drawn: Drawn, lay: layout_lib.Layout, seeds: Sequence[int], run: int, notes: list[str],
                 attention: bool) -> Result:
        folder = os.path.join(self.out_dir, f"run{run:04d}_{time.strftime('%Y%m%d-%H%M%S')}")
        images, heat_images, files = [], [], []
        for k, pixels in enumerate(drawn.images):
            prep = drawn.prepared[k]
            raw = Image.fromarray(pixels)
            files.append(save_png(os.path.join(folder, f"seed{seeds[k]:04d}.png"), raw))
            shown = enlarge(raw)
            over = layout_lib.draw_layout(shown, lay, prep.masks)
            files.append(save_png(os.path.join(folder, f"seed{seeds[k]:04d}_layout.png"), over))
            images.append((over, f"seed {seeds[k]}"))
            if attention:
                heat = subject_heatmaps(drawn.attention[k], prep.positions, prep.height, prep.width)
                for s, sub in enumerate(lay.subjects):
                    pic = enlarge(heatmap_overlay(np.asarray(pixels), heat[s]))
                    safe = "".join(ch if ch.isalnum() else "_" for ch in sub.word)
                    files.append(save_png(os.path.join(folder, f"seed{seeds[k]:04d}_attn_{s}_{safe}.png"), pic))
                    heat_images.append((pic, f"seed {seeds[k]}: {sub.word}"))
        return Result(images, heat_images, files, drawn.seconds, drawn.compiled.compile_seconds, notes)

    def save_layout(self, boxes: Sequence[state.Box], settings: state.Settings) -> str:
        """The page's layout as a JSON file in `out_dir/layouts` that `sample.py --layout` reads as is;
        refused (`ConesError`) unless the layout parser accepts it."""
        with in_page_terms():
            self.layout(boxes, settings)
        with self.lock:  # the counter keeps two saves in one second apart
            self.runs += 1
            run = self.runs
        path = os.path.join(self.out_dir, "layouts", f"layout_{time.strftime('%Y%m%d-%H%M%S')}_{run:04d}.json")
        with atomic_output(path, "w") as f:
            f.write(state.layout_json(boxes, settings))
        return path

    def read_layout(self, path: str, defaults: state.Settings) -> tuple[list[state.Box], state.Settings]:
        """A layout file (uploaded or bundled) -> the page's boxes and settings, after the parser's checks."""
        import json

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", layout_lib.LayoutWarning)
            layout_lib.load_layout(path)  # every check of sample.py's reading, with its messages
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        boxes, settings = state.from_layout(obj, os.path.dirname(os.path.abspath(path)), defaults)
        if len(boxes) > state.MAX_SUBJECTS:
            raise LayoutError(f"{path}: {len(boxes)} subjects; the page holds at most {state.MAX_SUBJECTS}")
        return boxes, settings


def enlarge(image: Image.Image) -> Image.Image:
    """Small images (the demo model's) scaled up by a whole factor, without smoothing, to be seen."""
    factor = max(1, DISPLAY_SIDE // max(image.size))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def save_png(path: str, image: Image.Image) -> str:
    with atomic_output(path) as f:
        image.save(f, format="PNG")
    return path
