"""The page: a box canvas (a small HTML canvas in `canvas.js`), one row of subject fields per box,
the prompt with its word check, the settings, Generate, and layout files down and up.

Every handler shows a `ConesError` as its message in the page and keeps the app running; any other
exception is a bug: its traceback goes to the log and the page says so.
"""

from __future__ import annotations

import base64
import contextvars
import functools
import html
import io
import json
import logging
import os
import shutil
import traceback
from collections.abc import Callable
from importlib import resources
from typing import Any

from PIL import Image

from cones_jax import artifacts
from cones_jax.app import state
from cones_jax.app.engine import Engine
from cones_jax.bundled import layout_names, resolve_layout
from cones_jax.config import PRESETS
from cones_jax.errors import ConesError, ConfigError
from cones_jax.layout.draw import PALETTE

try:
    import gradio as gr
except ImportError:  # the [app] extra; `main` says how to install it
    gr = None

log = logging.getLogger("cones_jax.app")
CANVAS_SIDE = 512  # the canvas's drawing buffer, in pixels (it is shown scaled to the column)
BACKGROUND_SIDE = 512  # a background image is sent to the page at most this large

CANVAS_HTML = """
<div class="cones-canvas-wrap">
  <canvas width="{side}" height="{side}" tabindex="0" aria-label="layout canvas"></canvas>
  <div class="cones-canvas-bar">
    <button type="button" class="cones-delete">Delete box</button>
    <button type="button" class="cones-clear">Clear all</button>
    <span>Drag to draw a box · drag inside a box to move it · drag a corner of the selected box to resize ·
      Delete key removes it</span>
  </div>
</div>
"""
CANVAS_CSS = """
canvas { width: 100%; max-width: 512px; aspect-ratio: 1; cursor: crosshair; border: 1px solid #888;
         display: block; touch-action: none; }
.cones-canvas-bar { display: flex; gap: 8px; align-items: center; margin-top: 6px; font-size: 0.85em; }
.cones-canvas-bar button { padding: 2px 10px; border: 1px solid #888; border-radius: 4px; }
"""


def require_gradio() -> Any:
    if gr is None:
        raise ConfigError("the app needs Gradio, which is not installed; install the app extra: "
                          "pip install 'cones_jax[app]'")
    return gr


def canvas_script() -> str:
    text = resources.files("cones_jax.app").joinpath("canvas.js").read_text(encoding="utf-8")
    return (text.replace("__COLORS__", json.dumps([list(c) for c in PALETTE]))
            .replace("__STRENGTH__", repr(state.DEFAULT_STRENGTH)).replace("__MAX__", str(state.MAX_SUBJECTS)))


def message(text: str, kind: str = "info") -> str:
    """The page's message line: an error in red, a note in the page's text colour."""
    color = {"error": "#c62828", "ok": "#2e7d32"}.get(kind, "inherit")
    role = ' role="alert"' if kind == "error" else ""
    return f'<div class="cones-{kind}" style="color: {color}"{role}>{html.escape(text)}</div>' if text else ""


def shown(outputs_on_error: Callable[[str], list]) -> Callable:
    """A handler whose failure becomes the page's message: `outputs_on_error(html)` gives the values
    of its outputs then (`gr.skip()` for all but the message)."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ConesError as e:
                return outputs_on_error(message(str(e), "error"))
            except Exception as e:  # noqa: BLE001 - a bug: logged with its traceback, the app keeps running
                log.error("internal error in %s:\n%s", fn.__name__, traceback.format_exc())
                return outputs_on_error(message(f"internal error ({type(e).__name__}: {e}); the traceback is in "
                                                "the app's log; please report it", "error"))
        return run
    return wrap


def data_url(path: str) -> str:
    """An image file as a PNG data URL for the canvas, at most BACKGROUND_SIDE wide or high. NEAREST,
    so that a colour map keeps its exact colours."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((BACKGROUND_SIDE, BACKGROUND_SIDE), Image.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def residual_choices(uploaded: list[str]) -> list[tuple[str, str]]:
    """The residual dropdown: none, the demo subjects (with their words), the uploaded files."""
    choices = [("none", "")]
    for name, path in state.demo_residuals().items():
        try:
            word = artifacts.load_residual(path).word
        except ConesError:
            word = ""
        choices.append((f"{name} ({word})" if word else name, name))
    choices += [(f"{os.path.basename(p)} (uploaded)", p) for p in uploaded]
    return choices


def build(engine: Engine, *, demo_defaults: bool = True) -> Any:
    """The Gradio Blocks of the app on `engine` (not launched)."""
    gr = require_gradio()
    M = state.MAX_SUBJECTS
    defaults = state.Settings(guidance_weight=0.3 if demo_defaults else None)  # λ of the demo model's layouts
    box_layouts = [n for n in layout_names() if "/" not in n.removeprefix("demo:")] if demo_defaults else []

    with gr.Blocks(title="cones_jax: draw a layout", analytics_enabled=False) as page:  # no calls home
        gr.Markdown("## cones_jax: draw a layout, generate\nDraw one box per subject, give each its word "
                    "(as written in the prompt), optionally a residual and γ⁺, then Generate. "
                    f"Model: `{engine.model}` · outputs: `{engine.out_dir}`")
        kept = gr.State({})
        uploaded = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                canvas = gr.HTML(value=state.canvas_json([]), html_template=CANVAS_HTML.format(side=CANVAS_SIDE),
                                 css_template=CANVAS_CSS, js_on_load=canvas_script(), elem_id="cones-canvas")
                with gr.Row():
                    background = gr.Image(label="Background or colour map under the boxes", type="filepath",
                                          sources=["upload"], height=150, elem_id="cones-background")
                    with gr.Column():
                        layout_file = gr.File(label="Upload a layout JSON to edit", file_types=[".json"],
                                              elem_id="cones-upload", height=100)
                        demo_layout = gr.Dropdown([""] + box_layouts, value="", label="…or start from a demo layout",
                                                  elem_id="cones-demo-layout", visible=bool(box_layouts))
                save = gr.Button("Layout → JSON (for sample.py --layout)", elem_id="cones-save")
                saved = gr.File(label="layout JSON", interactive=False, visible=False, elem_id="cones-layout-file")
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", placeholder="a star and a heart on a grey background",
                                    elem_id="cones-prompt")
                check = gr.HTML(elem_id="cones-word-check")
                negative = gr.Textbox(label="Negative prompt", elem_id="cones-negative")
                rows, words, residuals, strengths = [], [], [], []
                for k in range(M):
                    with gr.Row(visible=False, equal_height=True) as row:
                        words.append(gr.Textbox(label=f"Box {k + 1}: word", elem_id=f"cones-word-{k}", scale=2))
                        residuals.append(gr.Dropdown(residual_choices([]), value="", label="residual",
                                                     allow_custom_value=True, elem_id=f"cones-residual-{k}", scale=2))
                        strengths.append(gr.Number(value=state.DEFAULT_STRENGTH, label="γ⁺", elem_id=f"cones-gamma-{k}",
                                                   scale=1))
                    rows.append(row)
                residual_upload = gr.File(label="Upload residual files (.safetensors) for the dropdowns",
                                          file_count="multiple", file_types=[".safetensors"], height=90,
                                          elem_id="cones-residual-upload")
                with gr.Row():
                    preset = gr.Dropdown(list(PRESETS), value=defaults.preset, label="preset", allow_custom_value=True,
                                         elem_id="cones-preset")
                    seeds = gr.Textbox(value="0", label="seeds", elem_id="cones-seeds")
                    steps = gr.Number(value=defaults.steps, precision=0, minimum=1, label="steps",
                                      elem_id="cones-steps")
                with gr.Row():
                    cfg_scale = gr.Number(value=defaults.cfg_scale, label="CFG scale", elem_id="cones-cfg")
                    lam = gr.Number(value=defaults.guidance_weight, label="λ (empty: the preset's)",
                                    elem_id="cones-lambda")
                    attention = gr.Checkbox(label="attention heat maps", elem_id="cones-attention")
                generate = gr.Button("Generate", variant="primary", elem_id="cones-generate")
                note = gr.HTML(elem_id="cones-message")
        with gr.Row():
            images = gr.Gallery(label="Images, with the layout drawn over them", columns=4, format="png",
                                height=300, object_fit="contain", preview=False, elem_id="cones-images")
            heatmaps = gr.Gallery(label="Attention of each subject's word", columns=4, format="png", visible=False,
                                  height=300, object_fit="contain", preview=False, elem_id="cones-heatmaps")

        subject_fields = [*words, *residuals, *strengths]
        # the page's own events run one at a time in the order they were sent (so the last word typed
        # wins), apart from Generate's queue: a long sampling run never holds up typing
        PAGE = {"concurrency_limit": 1, "concurrency_id": "page"}  # noqa: N806

        def subjects_of(values: list) -> tuple[list, list, list]:
            return values[:M], values[M:2 * M], values[2 * M:]

        def page_boxes(canvas_value: str, values: list) -> list[state.Box]:
            return state.with_subjects(state.boxes_from_canvas(canvas_value), *subjects_of(values))

        def checked(prompt_text: str, boxes: list[state.Box]) -> str:
            if not boxes:
                return message("draw a box for each subject on the canvas")
            problems = engine.word_problems(prompt_text or "", [b.word for b in boxes])
            if problems:
                return "".join(message(p, "error") for p in problems)
            return message("✓ every subject word is in the prompt", "ok")

        def row_values(boxes: list[state.Box]) -> list:
            return ([gr.update(visible=k < len(boxes)) for k in range(M)]
                    + [boxes[k].word if k < len(boxes) else "" for k in range(M)]
                    + [boxes[k].residual if k < len(boxes) else "" for k in range(M)]
                    + [boxes[k].strength if k < len(boxes) else state.DEFAULT_STRENGTH for k in range(M)])

        # the canvas changed by the user: rows follow its boxes (and their subjects, kept by the canvas)
        @shown(lambda msg: [gr.skip()] * (4 * M) + [msg])
        def on_canvas(canvas_value: str, prompt_text: str) -> list:
            boxes = state.boxes_from_canvas(canvas_value)
            return row_values(boxes) + [checked(prompt_text, boxes)]

        canvas.input(on_canvas, [canvas, prompt], [*rows, *subject_fields, check], **PAGE,
                     trigger_mode="always_last")

        # a subject field typed: the canvas keeps it (its labels show the words)
        @shown(lambda msg: [gr.skip(), msg])
        def on_subject(canvas_value: str, prompt_text: str, *values: Any) -> list:
            boxes = page_boxes(canvas_value, list(values))
            return [state.canvas_json(boxes, state.background_of(canvas_value)), checked(prompt_text, boxes)]

        for field in subject_fields:
            field.input(on_subject, [canvas, prompt, *subject_fields], [canvas, check], **PAGE,
                        trigger_mode="always_last")

        @shown(lambda msg: msg)
        def on_prompt(canvas_value: str, prompt_text: str, *values: Any) -> str:
            return checked(prompt_text, page_boxes(canvas_value, list(values)))

        prompt.input(on_prompt, [canvas, prompt, *subject_fields], check, **PAGE,
                     trigger_mode="always_last")

        @shown(lambda msg: [gr.skip(), msg])
        def on_background(path: str | None, canvas_value: str) -> list:
            boxes = state.boxes_from_canvas(canvas_value)
            return [state.canvas_json(boxes, data_url(path) if path else ""), ""]

        background.change(on_background, [background, canvas], [canvas, note], **PAGE)

        @shown(lambda msg: [gr.skip()] * (M + 1) + [msg])
        def on_residual_upload(files: list[str] | None, known: list[str]) -> list:
            folder = os.path.join(engine.out_dir, "residuals")
            os.makedirs(folder, exist_ok=True)
            known = list(known)
            for f in files or []:
                target = os.path.join(folder, os.path.basename(f))
                artifacts.load_residual(f)  # its format, now; its model is checked at Generate
                shutil.copyfile(f, target)
                if target not in known:
                    known.append(target)
            return [known, *[gr.update(choices=residual_choices(known)) for _ in range(M)],
                    message(f"{len(files or [])} residual file(s) added to the dropdowns")]

        residual_upload.upload(on_residual_upload, [residual_upload, uploaded], [uploaded, *residuals, note],
                               **PAGE)

        # layout files
        settings_fields = [prompt, negative, lam, preset, seeds, steps, cfg_scale]

        def settings_of(d: dict) -> state.Settings:
            return state.Settings(
                prompt=d[prompt] or "", negative_prompt=d[negative] or "", guidance_weight=d[lam],
                preset=d[preset] or defaults.preset, seeds=state.parse_seeds(d[seeds] or ""),
                steps=int(d[steps]) if d[steps] is not None else defaults.steps,
                cfg_scale=float(d[cfg_scale]) if d[cfg_scale] is not None else defaults.cfg_scale, kept=d[kept])

        def boxes_of(d: dict) -> list[state.Box]:
            return page_boxes(d[canvas], [d[f] for f in subject_fields])

        @shown(lambda msg: [gr.skip(), msg])
        def on_save(d: dict) -> list:
            path = engine.save_layout(boxes_of(d), settings_of(d))
            return [gr.update(value=path, visible=True), message(f"wrote {path}; sample.py --layout reads it", "ok")]

        save.click(on_save, {canvas, kept, *settings_fields, *subject_fields}, [saved, note], **PAGE)

        load_outputs = [canvas, *rows, *subject_fields, *settings_fields, kept, check, note]

        def loaded(path: str, canvas_value: str) -> list:
            boxes, s = engine.read_layout(path, defaults)
            values = row_values(boxes)
            return ([state.canvas_json(boxes, state.background_of(canvas_value)), *values,
                     s.prompt, s.negative_prompt, s.guidance_weight, s.preset, " ".join(map(str, s.seeds)), s.steps,
                     s.cfg_scale, s.kept, checked(s.prompt, boxes), message(f"loaded {os.path.basename(path)}", "ok")])

        skip_load = lambda msg: [gr.skip()] * (len(load_outputs) - 1) + [msg]  # noqa: E731

        @shown(skip_load)
        def on_upload(path: str | None, canvas_value: str) -> list:
            if not path:
                return skip_load("")
            return loaded(path, canvas_value)

        layout_file.upload(on_upload, [layout_file, canvas], load_outputs, **PAGE)

        @shown(skip_load)
        def on_demo_layout(name: str, canvas_value: str) -> list:
            return loaded(resolve_layout(name), canvas_value) if name else skip_load("")

        demo_layout.input(on_demo_layout, [demo_layout, canvas], load_outputs, **PAGE)

        # Generate: one at a time on the model (the queue, and the engine's lock behind it)
        @shown(lambda msg: [gr.skip(), gr.skip(), msg])
        def on_generate(d: dict, progress: Any = gr.Progress()) -> list:  # noqa: B008 - how Gradio asks for a bar
            context = contextvars.copy_context()  # the sampler's step callback runs on another thread

            def hear(done: int, total: int) -> None:
                context.run(progress, (done, total), desc="sampling", unit="steps")

            progress(0.0, desc="checking the layout")
            result = engine.generate(boxes_of(d), settings_of(d), attention=bool(d[attention]), progress=hear)
            cost = ("compiled the sampler in " f"{result.compile_seconds:.1f} s, then " if result.compile_seconds
                    else "")
            text = (f"{len(result.images)} image(s): {cost}sampled in {result.seconds:.2f} s; saved in "
                    f"{os.path.dirname(result.files[0])}")
            notes = "".join(message(n) for n in result.notes)
            return [result.images, gr.update(value=result.heatmaps, visible=bool(result.heatmaps)),
                    message(text, "ok") + notes]

        generate.click(on_generate, {canvas, kept, attention, *settings_fields, *subject_fields},
                       [images, heatmaps, note], concurrency_limit=1, concurrency_id="model")
    return page

