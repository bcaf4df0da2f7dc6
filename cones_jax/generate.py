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
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from cones_jax import artifacts
from cones_jax import layout as layout_lib
from cones_jax.config import Config, resolve_sampling
from cones_jax.errors import CheckpointError
from cones_jax.fileio import OutputLock, atomic_output, check_output_dir
from cones_jax.layout.draw import heatmap_overlay, image_grid, subject_heatmaps
from cones_jax.sampler import Drawn, GenerateError, LayoutSampler, Prepared, check_config

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


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """The seeds as ints: each an integer in [0, 2**32) (a larger one keys the same noise as its low
    32 bits, a fraction would be cut off silently), none twice (its files would collide)."""
    seeds = list(seeds)
    odd = [s for s in seeds if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < 2**32]
    if not seeds or odd or len(set(seeds)) != len(seeds):
        got = f"; got {odd[0]!r}" if odd else f"; got {' '.join(map(str, seeds))}" if seeds else ""
        raise GenerateError(f"`seeds` must be distinct integers from 0 to {2**32 - 1}{got}")
    return [int(s) for s in seeds]


def note(message: str) -> None:
    """One line on stderr about a value changed on the user's behalf (stdout keeps the results)."""
    print(f"note: {message}", file=sys.stderr)


def clamp_guidance(cfg: Config, lay: layout_lib.Layout) -> tuple[Config, layout_lib.Layout, str]:
    """More guided steps than steps (the presets' 50 with `--steps 20`) guide every step: η(t) reads
    its σ from a schedule of that many steps (`sampler.guidance_sigmas`), so the config says so
    rather than hold a number the sampler cannot follow. Returns (config, layout, the note to
    tell the user, "" when nothing changed)."""
    steps = cfg["steps"]
    if cfg["guidance_steps"] <= steps:
        return cfg, lay, ""
    told = (f"guidance_steps={cfg['guidance_steps']} is more than steps={steps}; guiding all {steps} steps "
            "(--set guidance_steps=N guides fewer)")
    return cfg.replace(guidance_steps=steps), dataclasses.replace(lay, guidance_steps=steps), told


def check_artifacts(lay: layout_lib.Layout, opts: GenerateOptions, model: str | None,
                    sd: StableDiffusion | None = None) -> None:
    """Before the model loads: the model folder (model_index.json, components, configs, safetensors
    weights), the layout's words against its tokenizer, the image size against its UNet, each
    residual (format, finite values, width; the base-model fingerprint too when `sd` is loaded) and
    each concept-neuron file's format. What needs the weights is checked after loading, before
    compiling (`LayoutSampler.prepare`, `params_with_neurons`)."""
    from cones_jax.pipeline import check_model_folder, size_multiple
    from cones_jax.tokenizer import load_tokenizer

    if sd is None:
        configs = check_model_folder(model)
        dim, fingerprint = configs["text_encoder"].hidden_size, None
        tok = load_tokenizer(os.path.join(model, "tokenizer"))
        factor = size_multiple(configs["vae"], configs["unet"])
    else:
        dim, fingerprint, tok = sd.text_encoder.config.hidden_size, sd.text_encoder_fingerprint, sd.tokenizer
        factor = size_multiple(sd.vae.config, sd.unet.config)
    layout_lib.subject_positions(lay, tok)
    if lay.size is not None and (lay.size[0] % factor or lay.size[1] % factor):
        raise GenerateError(f"{lay.source}: size {list(lay.size)} must be a multiple of {factor} for this model")
    for s, subject in enumerate(lay.subjects):
        if subject.residual:
            try:
                with warnings.catch_warnings():  # a word mismatch is told once, when the layout is prepared
                    warnings.simplefilter("ignore")
                    artifacts.load_residual(subject.residual, word=subject.word, dim=dim, text_encoder=fingerprint,
                                            allow_pickle=opts.allow_pickle)
            except (artifacts.ArtifactError, CheckpointError) as e:
                raise GenerateError(f"{lay.field(s)}.residual: {e}") from None
    for path in opts.neurons:
        artifacts.load_neurons(path)


def generate(layout_path: str, options: GenerateOptions | None = None, *, sd: StableDiffusion | None = None,
             log: Callable[[str], None] = print, **fields: Any) -> dict:
    """Renders one image per seed for a layout file; returns the written paths.

    `fields` replace fields of `options` (`generate(path, seeds=[0, 1], model=...)`); `sd`, a
    loaded `cones_jax.pipeline.StableDiffusion`, is used instead of loading `options.model`.
    Every input is checked before the model loads (`check_artifacts`), and nothing is written
    unless every image is finite (`NonFiniteError` otherwise). The output folder is locked from
    loading to writing (`fileio.OutputLock`); existing outputs are refused, unless `overwrite`,
    both up front and again just before writing.
    """
    try:
        opts = dataclasses.replace(options or GenerateOptions(), **fields)
    except TypeError as e:
        raise TypeError(f"generate: {e} (fields of GenerateOptions: "
                        f"{', '.join(f.name for f in dataclasses.fields(GenerateOptions))})") from None
    seeds = check_seeds(opts.seeds)
    check_config(layout_config(opts.preset, None, opts.overrides)[0], opts.batch)  # flags before any file is read
    cfg, lay = layout_config(opts.preset, layout_lib.load_layout(layout_path), opts.overrides)
    check_config(cfg)
    cfg, lay, clamped = clamp_guidance(cfg, lay) if opts.guided else (cfg, lay, "")
    stem = os.path.splitext(os.path.basename(layout_path))[0]
    paths = output_paths(opts.out_dir, stem, seeds, show_layout=opts.show_layout, attention=opts.attention_maps,
                         words=[s.word for s in lay.subjects])
    check_output_dir(opts.out_dir, "out_dir")
    refuse_existing(paths, opts.overwrite)
    model = None if sd is not None else opts.model or default_model()
    check_artifacts(lay, opts, model, sd)
    with OutputLock(opts.out_dir, "out_dir"):
        if clamped:  # told once every check has passed, so that a refusal stays one line
            note(clamped)
        drawn = render(lay, cfg, seeds, opts, sd if sd is not None else model, log)
        refuse_existing(paths, opts.overwrite)  # a run that is not ours may have written meanwhile
        write_outputs(paths, drawn, lay, opts)
    paths["seconds_per_image"] = drawn.seconds_per_image
    return paths


def render(lay: layout_lib.Layout, cfg: Config, seeds: Sequence[int], opts: GenerateOptions,
           sd_or_folder: StableDiffusion | str, log: Callable[[str], None]) -> Drawn:
    """Loads the model (unless given one), prepares the layout, shuts any concept neurons and
    samples every seed: the `Drawn` images, all finite."""
    from cones_jax.pipeline import load_pipeline

    sd = load_pipeline(sd_or_folder, opts.dtype) if isinstance(sd_or_folder, str) else sd_or_folder
    core = LayoutSampler(sd, cfg, guided=opts.guided, attention_maps=opts.attention_maps, batch=opts.batch,
                         negative_prompt=opts.negative_prompt, allow_pickle=opts.allow_pickle)
    prepared = core.prepare(lay)  # the residuals' base model is checked here, before any compile
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
    return drawn


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
