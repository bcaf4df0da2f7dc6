"""Layout-guided multi-subject generation (Cones 2 inference): what `sample.py` does, importable.

    from cones_jax.generate import generate
    paths = generate("examples/layouts/stable_diffusion/two_subjects.json", model="/models/sd21-base",
                     out_dir="outputs", seeds=[0, 1, 2, 3], preset="official")

A thin driver over `cones_jax.sampler.LayoutSampler`: layout file + preset -> one config; concept
neurons shut once in the weights; the core samples every seed (sharded over the local devices);
PNGs (and optionally the layout drawn over them and per-subject attention maps) written atomically.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from cones_jax import layout as layout_lib
from cones_jax.config import Config, resolve_sampling
from cones_jax.fileio import atomic_output
from cones_jax.layout.draw import heatmap_overlay, image_grid, subject_heatmaps
from cones_jax.sampler import Drawn, GenerateError, LayoutSampler, Prepared

if TYPE_CHECKING:
    from cones_jax.pipeline import StableDiffusion

DEFAULT_MODEL_ENV = "CONES_JAX_MODEL"


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """How `generate` samples and what it writes beside the images (sample.py's flags).

    `overrides` (config key -> value) go on top of the preset and of the layout file's own
    guidance_steps / guidance_weight; `steps`, `scheduler` and `cfg_scale` are keys like any other.
    `neurons`: Cones concept-neuron files; the union of their neurons is shut in the UNet (once,
    before sampling), which composes with the layout and the residuals.
    """

    model: str | None = None  # a local diffusers folder; default `default_model()`
    out_dir: str = "outputs"
    seeds: Sequence[int] = (0,)
    preset: str = "official"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str = "fp32"
    batch: int | None = None  # images per sampler call; default all, halved until they fit
    guided: bool = True  # False: plain text-to-image (residuals still applied)
    negative_prompt: str | None = None  # default the layout's
    neurons: Sequence[str] = ()
    allow_pickle: bool = False  # allow importing official .pt residuals
    show_layout: bool = False
    attention_maps: bool = False
    overwrite: bool = False
    progress: bool = True


def default_model() -> str:
    model = os.environ.get(DEFAULT_MODEL_ENV)
    if model:
        return model
    from cones_jax import bundled

    demo = bundled.demo_model()
    if os.path.isfile(os.path.join(demo, "model_index.json")):
        return demo
    raise GenerateError("no --model given and no bundled demo model found; pass --model a local Stable "
                        f"Diffusion folder in diffusers layout (or set {DEFAULT_MODEL_ENV})")


def save_png(path: str, image: Image.Image) -> None:
    with atomic_output(path) as f:
        image.save(f, format="PNG")


def output_paths(out_dir: str, stem: str, seeds: Sequence[int], *, show_layout: bool, attention: bool,
                 words: Sequence[str]) -> dict:
    paths = {"images": [os.path.join(out_dir, f"{stem}_seed{s:04d}.png") for s in seeds],
             "grid": os.path.join(out_dir, f"{stem}_grid.png"), "layout": [], "attention": []}
    if show_layout:
        paths["layout"] = [os.path.join(out_dir, f"{stem}_seed{s:04d}_layout.png") for s in seeds]
    if attention:
        safe = ["".join(ch if ch.isalnum() else "_" for ch in w) for w in words]
        paths["attention"] = [[os.path.join(out_dir, f"{stem}_seed{s:04d}_attn_{k}_{w}.png")
                               for k, w in enumerate(safe)] for s in seeds]
    return paths


def layout_config(preset: str, lay: layout_lib.Layout | None,
                  overrides: Mapping[str, Any] | None = None) -> tuple[Config, layout_lib.Layout | None]:
    """(config, layout) by `config.resolve_sampling`'s one precedence: preset < layout file < overrides."""
    try:
        return resolve_sampling(preset, lay, dict(overrides or {}))
    except ValueError as e:
        raise GenerateError(str(e)) from None


def refuse_existing(paths: dict, overwrite: bool) -> None:
    wanted = paths["images"] + [paths["grid"]] + paths["layout"] + [p for ps in paths["attention"] for p in ps]
    existing = [p for p in wanted if os.path.exists(p)]
    if existing and not overwrite:
        raise GenerateError(f"{existing[0]} already exists ({len(existing)} output file(s) in all); "
                            "pass `overwrite` or choose another `out_dir`")


def generate(layout_path: str, options: GenerateOptions | None = None, *, sd: StableDiffusion | None = None,
             log: Callable[[str], None] = print, **fields: Any) -> dict:
    """Renders one image per seed for a layout file; returns the written paths.

    `fields` replace fields of `options` (`generate(path, seeds=[0, 1], model=...)`); `sd`, a
    loaded `cones_jax.pipeline.StableDiffusion`, is used instead of loading `options.model`.
    Raises `GenerateError` / `cones_jax.layout.LayoutError` (one line each) before writing
    anything when an input is bad or an output exists and `overwrite` is False.
    """
    from cones_jax.pipeline import load_pipeline

    try:
        opts = dataclasses.replace(options or GenerateOptions(), **fields)
    except TypeError as e:
        raise TypeError(f"generate: {e} (fields of GenerateOptions: "
                        f"{', '.join(f.name for f in dataclasses.fields(GenerateOptions))})") from None
    seeds = [int(s) for s in opts.seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise GenerateError("`seeds` must be a non-empty list of distinct integers")
    layout_config(opts.preset, None, opts.overrides)  # flags checked before any file is read
    cfg, lay = layout_config(opts.preset, layout_lib.load_layout(layout_path), opts.overrides)
    stem = os.path.splitext(os.path.basename(layout_path))[0]
    paths = output_paths(opts.out_dir, stem, seeds, show_layout=opts.show_layout, attention=opts.attention_maps,
                         words=[s.word for s in lay.subjects])
    refuse_existing(paths, opts.overwrite)

    sd = sd if sd is not None else load_pipeline(opts.model or default_model(), opts.dtype)
    core = LayoutSampler(sd, cfg, guided=opts.guided, attention_maps=opts.attention_maps, batch=opts.batch,
                         negative_prompt=opts.negative_prompt, allow_pickle=opts.allow_pickle)
    prepared = core.prepare(lay)  # a bad layout or residual fails here, before any compile
    params = None
    if opts.neurons:
        from cones_jax.neurons import params_with_neurons  # optax and the search: only when asked

        params, shut = params_with_neurons(sd, opts.neurons)
        log(f"shut {shut} concept neurons from {len(opts.neurons)} file(s)")
    drawn = draw_with_progress(core, prepared, seeds, params, opts.progress)
    log(f"{drawn.compiled.describe()} ({cfg['scheduler']}, {cfg['steps']} steps, batch {drawn.batch} over "
        f"{drawn.devices} device(s))")
    log(f"sampled {len(seeds)} image(s) in {drawn.seconds:.2f} s ({drawn.seconds_per_image:.3f} s per image, "
        "compile time apart)")
    write_outputs(paths, drawn, lay, opts)
    paths["seconds_per_image"] = drawn.seconds_per_image
    return paths


def draw_with_progress(core: LayoutSampler, prepared: Prepared, seeds: Sequence[int], params: Any,
                       progress: bool) -> Drawn:
    """`core.sample` with a bar that counts images, one update per sampler call: a per-step host
    callback (`on_step`) would keep JAX from caching the compiled sampler on disk."""
    if not progress:
        return core.sample([(prepared, s) for s in seeds], params=params)
    from tqdm.auto import tqdm

    with tqdm(total=len(seeds), desc=f"sampling ({core.spec.steps} steps a call)", unit="img") as bar:
        return core.sample([(prepared, s) for s in seeds], params=params, on_batch=bar.update)


def write_outputs(paths: dict, drawn: Drawn, lay: layout_lib.Layout, opts: GenerateOptions) -> None:
    """The images, their grid and, when asked, the layout over each image and its attention maps."""
    os.makedirs(opts.out_dir, exist_ok=True)
    for k, img in enumerate(drawn.images):
        prep = drawn.prepared[k]
        save_png(paths["images"][k], Image.fromarray(img))
        if opts.show_layout:
            save_png(paths["layout"][k], layout_lib.draw_layout(Image.fromarray(img), lay, prep.masks))
        if opts.attention_maps:
            heat = subject_heatmaps(drawn.attention[k], prep.positions, prep.height, prep.width)
            for s, p in enumerate(paths["attention"][k]):
                save_png(p, heatmap_overlay(img, heat[s]))
    save_png(paths["grid"], image_grid(list(drawn.images)))
