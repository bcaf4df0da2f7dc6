"""Layout-guided multi-subject generation (Cones 2 inference): what `sample.py` does, importable.

    from cones_jax.generate import generate
    paths = generate("examples/layouts/stable_diffusion/two_subjects.json", model="/models/sd21-base",
                     out_dir="outputs", seeds=[0, 1, 2, 3], preset="official")

Steps: layout file -> token positions and residual rows (Eq. 6) -> per-resolution γ maps ->
one jitted sampler (Eq. 7 inside every cross-attention) over batches of seeds sharded across all
local devices -> PNGs written atomically.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from cones_jax import artifacts, guidance, layout as layout_lib, sampling, schedulers
from cones_jax.config import resolve_sampling
from cones_jax.fileio import atomic_output
from cones_jax.layout.draw import heatmap_overlay, image_grid, subject_heatmaps, to_uint8 as _to_uint8
from cones_jax.models.unet import cross_attention_resolutions

DEFAULT_MODEL_ENV = "CONES_JAX_MODEL"


class GenerateError(ValueError):
    """Bad input to `generate` (one-line message; `sample.py` exits with code 2)."""


@dataclasses.dataclass
class Prepared:
    """Everything about one layout that the sampler takes as arrays (for a batch of one image)."""

    prompt_ids: np.ndarray  # [L]
    negative_ids: np.ndarray  # [L]
    residual_rows: np.ndarray  # [L, E]
    maps: dict  # "{h}x{w}" -> [h*w, L]
    masks: np.ndarray  # [S, H, W] region of each subject at image resolution
    positions: list  # per subject: list of occurrences (lists of token positions)
    height: int
    width: int


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


def prepare_layout(sd, lay, cfg: dict, *, height: int | None = None, width: int | None = None,
                   negative_prompt: str | None = None, allow_pickle: bool = False) -> Prepared:
    """Layout -> token ids, residual rows (Cones 2, Eq. 6) and per-resolution γ maps."""
    tok = sd.tokenizer
    ids = tok.encode([lay.prompt])[0]
    flat_positions = layout_lib.subject_positions(lay, tok, ids)  # checks length, words, official indices
    factor = sd.latent_factor * 2 ** (len(sd.unet.config.block_out_channels) - 1)
    if height is None or width is None:
        if lay.size is not None:
            height, width = lay.size
        else:
            height = width = sd.unet.config.sample_size * sd.latent_factor
    if height % factor or width % factor:
        raise GenerateError(f"image size {height}x{width} must be a multiple of {factor} for this model")
    neg = negative_prompt if negative_prompt is not None else lay.negative_prompt
    neg_ids = tok.encode([neg or ""])[0]
    dim = sd.text_encoder.config.hidden_size
    positions, placements = [], []
    for s, subject in enumerate(lay.subjects):
        occ = layout_lib.token_occurrences(tok, ids, subject.word)
        positions.append(occ)
        if subject.residual:
            try:
                res = artifacts.load_residual(subject.residual, word=subject.word, dim=dim,
                                              text_encoder=sd.text_encoder_fingerprint, allow_pickle=allow_pickle)
            except (artifacts.ArtifactError, ValueError) as e:
                raise GenerateError(f"{lay.field(s)}.residual: {e}") from None
            placements.append((occ, res.delta))
    rows = guidance.residual_rows(len(ids), dim, placements)
    masks = layout_lib.region_masks(lay, height, width)
    weight_negative = lay.weight_negative if lay.weight_negative is not None else cfg["weight_negative"]
    gammas = layout_lib.gamma_maps(lay, masks, weight_negative)
    lat_h, lat_w = height // sd.latent_factor, width // sd.latent_factor
    resolutions = cross_attention_resolutions(sd.unet.config, (lat_h, lat_w))
    maps = layout_lib.attention_maps(gammas, flat_positions, len(ids), resolutions)
    return Prepared(ids, neg_ids, rows, maps, masks, positions, height, width)


def guidance_sigmas(cfg: dict, schedule: schedulers.Schedule, guidance_steps: int) -> np.ndarray:
    """σ_t for η(t) at each sampling step (zeros past the guided steps)."""
    n = schedule.num_steps
    out = np.zeros((n,), np.float32)
    g = min(guidance_steps, n)
    if g <= 0:
        return out
    if cfg["guidance_sigmas"] == "separate":
        # The official code reads σ from a fresh scaled-linear LMS schedule of guidance_steps steps.
        sep = schedulers.make_schedule("euler", schedulers.SchedulerConfig(timestep_spacing="linspace",
                                                                           steps_offset=0), g)
        out[:g] = np.asarray(sep.sigmas[:g])
    else:
        out[:g] = np.asarray(schedule.sigmas[:g])
    return out


def build_inputs(sd, prepared: Sequence[Prepared], noise: np.ndarray, cfg: dict, seeds: Sequence[int], *,
                 guided: bool) -> sampling.SampleInputs:
    """Stacks per-image arrays into one batch of sampler inputs; `seeds` (one per image) key each
    image's self-recurrence noise, as `initial_noise` keys its starting noise."""
    b = len(prepared)
    g = None
    if guided:
        maps = {k: jnp.asarray(np.stack([p.maps[k] for p in prepared])) for k in prepared[0].maps}
        g = guidance.LayoutGuidance(maps=maps, weight=jnp.full((b,), cfg["guidance_weight"], jnp.float32),
                                    sigmas=jnp.asarray(cfg["_sigmas"]))
    return sampling.SampleInputs(
        prompt_ids=jnp.asarray(np.stack([p.prompt_ids for p in prepared]), jnp.int32),
        negative_ids=jnp.asarray(np.stack([p.negative_ids for p in prepared]), jnp.int32),
        token_residuals=jnp.asarray(np.stack([p.residual_rows for p in prepared])),
        noise=jnp.asarray(noise), cfg_scale=jnp.float32(cfg["cfg_scale"]), renoise_keys=renoise_keys(seeds),
        guidance=g, guided_steps=jnp.int32(cfg["guidance_steps"] if guided else 0))


def shard_batch(inputs: sampling.SampleInputs, mesh: Mesh) -> sampling.SampleInputs:
    """Per-image arrays (and keys) split over the mesh's data axis; scalars and schedules replicated."""
    data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    put = lambda x, s: jax.device_put(x, s)
    g = inputs.guidance
    if g is not None:
        g = g.replace(maps={k: put(v, data) for k, v in g.maps.items()}, weight=put(g.weight, data),
                      sigmas=put(g.sigmas, rep))
    return inputs.replace(
        prompt_ids=put(inputs.prompt_ids, data), negative_ids=put(inputs.negative_ids, data),
        token_residuals=put(inputs.token_residuals, data), noise=put(inputs.noise, data),
        cfg_scale=put(inputs.cfg_scale, rep), renoise_keys=put(inputs.renoise_keys, data), guidance=g,
        guided_steps=put(inputs.guided_steps, rep))


def default_batch(n_images: int, n_devices: int) -> int:
    """Every image in one sampler call, padded up to a multiple of the local devices."""
    return -(-n_images // n_devices) * n_devices


def batch_mesh(batch: int) -> Mesh:
    """A 1-D "data" mesh over the most local devices that split `batch` evenly."""
    devices = jax.local_devices()
    size = max(d for d in range(1, len(devices) + 1) if batch % d == 0)
    return Mesh(np.array(devices[:size]), ("data",))


def device_memory_bytes(n_devices: int) -> int | None:
    """Memory one device may fill: the allocator's limit on GPU/TPU; on CPU a share of the host's
    RAM (fake CPU devices share it). None where neither is known."""
    stats = jax.local_devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return int(0.8 * host / n_devices)


def fits_in_memory(compiled, n_devices: int) -> bool:
    """Whether XLA's buffer plan of a compiled call (per device) fits its device's memory."""
    analysis = compiled.memory_analysis()
    limit = device_memory_bytes(n_devices)
    if analysis is None or limit is None:
        return True
    need = sum(getattr(analysis, f"{k}_size_in_bytes", 0) for k in ("argument", "output", "temp"))
    return need <= limit


def make_schedule(sd, cfg: dict) -> schedulers.Schedule:
    sched_cfg = sd.scheduler
    if cfg.get("timestep_spacing"):
        sched_cfg = dataclasses.replace(sched_cfg, timestep_spacing=cfg["timestep_spacing"])
    return schedulers.make_schedule(cfg["scheduler"], sched_cfg, cfg["steps"])


def renoise_keys(seeds: Sequence[int]) -> jax.Array:
    """[B, 2] PRNG keys of the images' self-recurrence noise, one per seed (a stream apart from
    `initial_noise`'s): the same seed gives the same image whatever else is in its batch."""
    return jnp.stack([jax.random.fold_in(jax.random.PRNGKey(int(s)), 1) for s in seeds])


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Per-seed noise, independent of batch composition: the same seed gives the same image."""
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32))


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


def generate(layout_path: str, *, model: str | None = None, out_dir: str = "outputs",
             seeds: Sequence[int] = (0,), preset: str = "official", steps: int | None = None,
             scheduler: str | None = None, cfg_scale: float | None = None, negative_prompt: str | None = None,
             dtype: str = "fp32", batch: int | None = None, guided: bool = True, show_layout: bool = False,
             attention_maps: bool = False, overwrite: bool = False, allow_pickle: bool = False,
             neurons: Sequence[str] = (), overrides: dict | None = None, sd=None, progress: bool = True,
             log=print) -> dict:
    """Renders one image per seed for a layout file; returns the written paths.

    `neurons`: Cones concept-neuron files; the union of their neurons is shut in the UNet (once,
    before sampling), which composes with the layout and the residuals.

    Raises `GenerateError` / `cones_jax.layout.LayoutError` (one line each) before writing
    anything when an input is bad or an output exists and `overwrite` is False.
    """
    from cones_jax.pipeline import load_pipeline

    # One precedence (config.resolve_sampling): preset < layout file < flags; the keyword
    # arguments are flags like `overrides`, and win over them.
    flags = dict(overrides or {}, **{k: v for k, v in (("steps", steps), ("scheduler", scheduler),
                                                       ("cfg_scale", cfg_scale)) if v is not None})
    try:
        cfg, _ = resolve_sampling(preset, None, flags)  # flags checked before any file is read
    except ValueError as e:
        raise GenerateError(str(e)) from None
    if cfg["scheduler"] not in schedulers.KINDS:
        raise GenerateError(f"--scheduler {cfg['scheduler']!r} is not one of {', '.join(schedulers.KINDS)}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise GenerateError("--seeds must be a non-empty list of distinct integers")
    cfg, lay = resolve_sampling(preset, layout_lib.load_layout(layout_path), flags)
    stem = os.path.splitext(os.path.basename(layout_path))[0]
    paths = output_paths(out_dir, stem, seeds, show_layout=show_layout, attention=attention_maps,
                         words=[s.word for s in lay.subjects])
    wanted = paths["images"] + [paths["grid"]] + paths["layout"] + [p for ps in paths["attention"] for p in ps]
    existing = [p for p in wanted if os.path.exists(p)]
    if existing and not overwrite:
        raise GenerateError(f"{existing[0]} already exists ({len(existing)} output file(s) in all); "
                            "pass --overwrite or choose another --out")

    if sd is None:
        sd = load_pipeline(model or default_model(), dtype)
    prep = prepare_layout(sd, lay, cfg, negative_prompt=negative_prompt, allow_pickle=allow_pickle)
    schedule = make_schedule(sd, cfg)
    cfg = dict(cfg, _sigmas=guidance_sigmas(cfg, schedule, cfg["guidance_steps"]))

    lat_shape = (prep.height // sd.latent_factor, prep.width // sd.latent_factor, sd.unet.config.in_channels)
    spec = sampling.SamplerSpec(scheduler=cfg["scheduler"], steps=cfg["steps"],
                                self_recurrence=bool(cfg["self_recurrence"]) and guided,
                                sow_attention=attention_maps)
    bias_fn = guidance.layout_bias if guided else None
    params = sd.params
    if neurons:
        from cones_jax import neurons as neurons_lib

        sets = neurons_lib.load_for_model(list(neurons), sd.params["unet"], fingerprint=sd.unet_fingerprint)
        params = dict(params, unet=neurons_lib.apply_neurons(sd.params["unet"], sets))
        log(f"shut {sum(len(v) for v in neurons_lib.union(sets).values())} concept neurons from {len(sets)} file(s)")

    def batch_inputs(batch_seeds, mesh):
        noise = np.stack([initial_noise(s, lat_shape) for s in batch_seeds])
        inputs = build_inputs(sd, [prep] * len(batch_seeds), noise, cfg, batch_seeds, guided=guided)
        return shard_batch(inputs, mesh)

    b = batch or default_batch(len(seeds), len(jax.local_devices()))
    while True:
        mesh = batch_mesh(b)
        rep_params = jax.device_put(params, NamedSharding(mesh, P()))
        with jax.set_mesh(mesh):
            compiled = sampling.compile_sampler(sd, spec, bias_fn, rep_params, schedule,
                                                batch_inputs((seeds * b)[:b], mesh))
        if batch or b <= mesh.size or fits_in_memory(compiled.fn, mesh.size):
            break
        b = max(mesh.size, b // 2 // mesh.size * mesh.size)  # halve, keeping every device busy
    params = rep_params
    log(f"{compiled.describe()} ({cfg['scheduler']}, {cfg['steps']} steps, batch {b} over {mesh.size} device(s))")
    padded = seeds + [seeds[-1]] * (-len(seeds) % b)

    results, heat = [], []
    # The bar counts images, one update per sampler call: a per-step host callback inside the
    # sampler (SamplerSpec.progress) would keep JAX from caching the compiled sampler on disk.
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(seeds), desc=f"sampling ({cfg['steps']} steps a call)", unit="img")
    try:
        t0 = time.perf_counter()
        for start in range(0, len(padded), b):
            out = compiled.fn(params, schedule, batch_inputs(padded[start:start + b], mesh))
            images, maps = out if attention_maps else (out, None)
            images = np.asarray(images)
            keep = min(b, len(seeds) - start)
            results.extend(images[:keep])
            if maps is not None:
                for k in range(keep):
                    heat.append(subject_heatmaps(jax.tree_util.tree_map(lambda m: m[k], maps), prep.positions,
                                                 prep.height, prep.width))
            if bar is not None:
                bar.update(keep)
        elapsed = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
    log(f"sampled {len(seeds)} image(s) in {elapsed:.2f} s ({elapsed / len(padded):.3f} s per image, "
        "compile time apart)")

    os.makedirs(out_dir, exist_ok=True)
    pixels = [_to_uint8(img) for img in results]
    for k, img in enumerate(pixels):
        save_png(paths["images"][k], Image.fromarray(img))
        if show_layout:
            save_png(paths["layout"][k], layout_lib.draw_layout(Image.fromarray(img), lay, prep.masks))
        if attention_maps:
            for s, p in enumerate(paths["attention"][k]):
                save_png(p, heatmap_overlay(img, heat[k][s]))
    save_png(paths["grid"], image_grid(pixels))
    paths["seconds_per_image"] = elapsed / len(padded)
    return paths


def padded_chunks(n: int, batch: int) -> Iterator[tuple[list[int], int]]:
    """Index lists of exactly `batch` items covering range(n), the last one padded by repeating its
    final index (one compiled shape for every call), each with how many of its items are real."""
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        yield idx + [idx[-1]] * (batch - len(idx)), len(idx)


def sample_prompts(sd, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 25, cfg_scale: float = 7.5,
                   scheduler: str = "ddim", negative_prompt: str = "", batch: int = 8) -> np.ndarray:
    """Plain text-to-image (no layout): one uint8 image [H, W, 3] per (prompt, seed), in a batch of
    `batch` at a time through one compiled sampler."""
    if len(prompts) != len(seeds):
        raise GenerateError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    cfg = {"scheduler": scheduler, "steps": steps}
    schedule = make_schedule(sd, cfg)
    spec = sampling.SamplerSpec(scheduler=scheduler, steps=steps, self_recurrence=False, progress=False)
    sampler = sampling.make_sampler(sd, spec, None)
    side = sd.unet.config.sample_size
    lat_shape = (side, side, sd.unet.config.in_channels)
    ids = sd.tokenizer.encode(list(prompts))
    neg = sd.tokenizer.encode([negative_prompt])[0]
    rows = np.zeros((batch, ids.shape[1], sd.text_encoder.config.hidden_size), np.float32)
    out = []
    for idx, real in padded_chunks(len(prompts), batch):
        inputs = sampling.SampleInputs(
            prompt_ids=jnp.asarray(ids[idx]), negative_ids=jnp.asarray(np.stack([neg] * batch)),
            token_residuals=jnp.asarray(rows),
            noise=jnp.asarray(np.stack([initial_noise(int(seeds[i]), lat_shape) for i in idx])),
            cfg_scale=jnp.float32(cfg_scale), renoise_keys=renoise_keys([int(seeds[i]) for i in idx]), guidance=None,
            guided_steps=jnp.int32(0))
        images = np.asarray(sampler(sd.params, schedule, inputs))
        out.extend(_to_uint8(img) for img in images[:real])
    return np.stack(out)
