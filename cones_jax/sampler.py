"""The layout sampler core: layouts (or prompts), residuals, seeds and weights in, uint8 images out.

`cones_jax.sampling` holds the one jitted sampler; this module holds everything every caller of it
needs around it, once: a layout turned into arrays (token ids, Eq. 6 residual rows, per-resolution
γ maps), the σ schedules of η(t), per-seed noise, a batch split over the local devices with no
collective, the compiled-sampler cache and the choice of a batch that fits in memory.

    core = LayoutSampler(sd, load_config("official"))
    drawn = core.draw([layout], seeds=[0, 1, 2, 3])        # drawn.images: [4, H, W, 3] uint8

`cones_jax.generate.generate` (sample.py), the demo evaluation, the concept-neuron class images and
the notebook are thin drivers over `LayoutSampler`. A config is read, never written: anything the
sampler derives from it (schedules, σ of η(t)) is held here.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cones_jax import artifacts, guidance, sampling, schedulers
from cones_jax import layout as layout_lib
from cones_jax.errors import GenerateError, NonFiniteError
from cones_jax.layout.draw import to_uint8
from cones_jax.models.unet import cross_attention_resolutions
from cones_jax.pipeline import size_multiple

if TYPE_CHECKING:
    from cones_jax.pipeline import StableDiffusion


@dataclasses.dataclass
class Prepared:
    """Everything about one layout that the sampler takes as arrays (for a batch of one image)."""

    prompt_ids: np.ndarray  # [L]
    negative_ids: np.ndarray  # [L]
    residual_rows: np.ndarray  # [L, E]
    maps: dict  # "{h}x{w}" -> [h*w, L]; empty for a plain prompt
    masks: np.ndarray  # [S, H, W] region of each subject at image resolution
    positions: list  # per subject: list of occurrences (lists of token positions)
    height: int
    width: int


def config_value(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """`cfg[key]`, or `default` where the config has no such key (read access only)."""
    try:
        return cfg[key]
    except (KeyError, AttributeError):
        return default


FINITE_KEYS = ("cfg_scale", "guidance_weight", "weight_positive", "weight_negative")


def check_config(cfg: Mapping[str, Any], batch: int | None = None) -> None:
    """The settings that would make meaningless images, refused up front: an unknown scheduler, a
    batch below 1, steps below 1, negative guided steps, NaN or Inf in the CFG scale, λ, γ⁺ or γ⁻ (a
    `--set x=1e999` is Inf). Needs no model: `generate` runs it before loading one."""
    if cfg["scheduler"] not in schedulers.KINDS:
        raise GenerateError(f"`scheduler` {cfg['scheduler']!r} is not one of {', '.join(schedulers.KINDS)}")
    if batch is not None and batch < 1:
        raise GenerateError(f"`batch` must be at least 1, got {batch}")
    steps = config_value(cfg, "steps")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise GenerateError(f"`steps` must be an integer >= 1, got {steps!r}")
    guided = config_value(cfg, "guidance_steps", 0)
    if guided is not None and guided < 0:
        raise GenerateError(f"`guidance_steps` must be >= 0, got {guided}")
    for key in FINITE_KEYS:
        value = config_value(cfg, key)
        if value is not None and not np.isfinite(value):
            raise GenerateError(f"`{key}` must be a finite number, got {value}")


def prepare_layout(sd: StableDiffusion, lay: layout_lib.Layout, cfg: dict, *, height: int | None = None,
                   width: int | None = None, negative_prompt: str | None = None,
                   allow_pickle: bool = False) -> Prepared:
    """Layout -> token ids, residual rows (Cones 2, Eq. 6) and per-resolution γ maps."""
    tok = sd.tokenizer
    ids = tok.encode([lay.prompt])[0]
    flat_positions = layout_lib.subject_positions(lay, tok, ids)  # checks length, words, official indices
    factor = size_multiple(sd.vae.config, sd.unet.config)
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


def prepare_prompt(sd: StableDiffusion, prompt: str, *, negative_prompt: str = "") -> Prepared:
    """A plain prompt at the model's own size: no subjects, residuals or maps (text-to-image)."""
    tok = sd.tokenizer
    ids = tok.encode([prompt])[0]
    side = sd.unet.config.sample_size * sd.latent_factor
    rows = np.zeros((len(ids), sd.text_encoder.config.hidden_size), np.float32)
    return Prepared(ids, tok.encode([negative_prompt])[0], rows, {}, np.zeros((0, side, side), bool), [], side, side)


def guidance_sigmas(cfg: Mapping[str, Any], schedule: schedulers.Schedule, guidance_steps: int) -> np.ndarray:
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


def make_schedule(sd: StableDiffusion, cfg: Mapping[str, Any]) -> schedulers.Schedule:
    sched_cfg = sd.scheduler
    spacing = config_value(cfg, "timestep_spacing")
    if spacing:
        sched_cfg = dataclasses.replace(sched_cfg, timestep_spacing=spacing)
    return schedulers.make_schedule(cfg["scheduler"], sched_cfg, cfg["steps"])


def renoise_keys(seeds: Sequence[int]) -> jax.Array:
    """[B, 2] PRNG keys of the images' self-recurrence noise, one per seed (a stream apart from
    `initial_noise`'s): the same seed gives the same image whatever else is in its batch."""
    return jnp.stack([jax.random.fold_in(jax.random.PRNGKey(int(s)), 1) for s in seeds])


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Per-seed noise, independent of batch composition: the same seed gives the same image."""
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32))


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


def fits_in_memory(compiled: jax.stages.Compiled, n_devices: int) -> bool:
    """Whether XLA's buffer plan of a compiled call (per device) fits its device's memory."""
    analysis = compiled.memory_analysis()
    limit = device_memory_bytes(n_devices)
    if analysis is None or limit is None:
        return True
    need = sum(getattr(analysis, f"{k}_size_in_bytes", 0) for k in ("argument", "output", "temp"))
    return need <= limit


def padded_chunks(n: int, batch: int) -> Iterator[tuple[list[int], int]]:
    """Index lists of exactly `batch` items covering range(n), the last one padded by repeating its
    final index (one compiled shape for every call), each with how many of its items are real."""
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        yield idx + [idx[-1]] * (batch - len(idx)), len(idx)


@dataclasses.dataclass
class Drawn:
    """What one `LayoutSampler.sample` call made, in the order of its jobs."""

    images: np.ndarray  # [N, H, W, 3] uint8
    prepared: list[Prepared]  # per image, what it was sampled from
    attention: list | None  # per image, the sown cross-attention sums (a numpy pytree), when asked for
    seconds: float  # sampling time, compile time apart
    compiled: sampling.CompiledSampler
    batch: int  # images per sampler call (the last call padded)
    devices: int  # devices one call is split over

    @property
    def seconds_per_image(self) -> float:
        """Seconds per sampled image, padding included (what one more image in a full call costs)."""
        padded = -(-len(self.images) // self.batch) * self.batch
        return self.seconds / padded


@dataclasses.dataclass
class Plan:
    """A compiled sampler for one batch size, with its mesh and the weights placed on it."""

    compiled: sampling.CompiledSampler
    mesh: Mesh
    batch: int
    params: Any


class LayoutSampler:
    """Builds, caches and runs the compiled layout sampler of one model and one config.

    `cfg` (a preset, read only) gives the scheduler, steps, CFG scale, self-recurrence, guided steps,
    λ, γ⁻ and how η(t) takes its σ; the schedules are computed here. `guided=False` samples
    text-to-image (residuals still added; plain prompt strings allowed as jobs). `batch` fixes the
    images per call; by default every image goes in one call, halved until it fits in memory,
    split over the local devices (each image's CFG rows stay on one device: no collective).
    `on_step(i)` is called on the host after every sampler step; it compiles a host callback into
    the sampler, which keeps JAX from writing that sampler to the persistent compilation cache, so
    without it none is compiled in. Compiled samplers are kept on `sd.compiled`
    (`sampling.compile_sampler`): a new layout, prompt, seed or set of weights at the same shapes
    reuses them.
    """

    def __init__(self, sd: StableDiffusion, cfg: Mapping[str, Any], *, guided: bool = True,
                 attention_maps: bool = False, batch: int | None = None, negative_prompt: str | None = None,
                 allow_pickle: bool = False,
                 on_step: Callable[[int], None] | None = None) -> None:
        check_config(cfg, batch)
        self.sd, self.cfg, self.guided, self.batch = sd, cfg, guided, batch
        self.negative_prompt, self.allow_pickle, self.on_step = negative_prompt, allow_pickle, on_step
        self.schedule = make_schedule(sd, cfg)
        # more guided steps than steps means all of them (`generate` says so when it clamps)
        self.guided_steps = min(int(cfg["guidance_steps"]), int(cfg["steps"])) if guided else 0
        self.sigmas = guidance_sigmas(cfg, self.schedule, self.guided_steps) if guided else None
        self.spec = sampling.SamplerSpec(
            scheduler=cfg["scheduler"], steps=cfg["steps"], sow_attention=attention_maps, check_finite=True,
            self_recurrence=guided and bool(config_value(cfg, "self_recurrence", False)))
        self.bias_fn = guidance.layout_bias if guided else None

    def prepare(self, job: layout_lib.Layout | str | Prepared) -> Prepared:
        """A layout (or, unguided, a plain prompt) as arrays; a `Prepared` passes through."""
        if isinstance(job, Prepared):
            return job
        if isinstance(job, str):
            if self.guided:
                raise GenerateError("a plain prompt has no layout to guide by; sample it with guided=False")
            return prepare_prompt(self.sd, job, negative_prompt=self.negative_prompt or "")
        return prepare_layout(self.sd, job, self.cfg, negative_prompt=self.negative_prompt,
                              allow_pickle=self.allow_pickle)

    def inputs(self, prepared: Sequence[Prepared], seeds: Sequence[int]) -> sampling.SampleInputs:
        """One batch of sampler inputs (on the default device), image k from `prepared[k]` and
        `seeds[k]`, which keys both its starting noise and its self-recurrence noise."""
        sizes = {(p.height, p.width) for p in prepared}
        if len(sizes) != 1:
            raise GenerateError(f"one sampler call needs one image size, got {sorted(sizes)}")
        (height, width), f = sizes.pop(), self.sd.latent_factor
        lat_shape = (height // f, width // f, self.sd.unet.config.in_channels)
        noise = np.stack([initial_noise(int(s), lat_shape) for s in seeds])
        g = None
        if self.guided:
            maps = {k: jnp.asarray(np.stack([p.maps[k] for p in prepared])) for k in prepared[0].maps}
            g = guidance.LayoutGuidance(maps=maps, weight=jnp.full((len(prepared),), self.cfg["guidance_weight"],
                                                                   jnp.float32), sigmas=jnp.asarray(self.sigmas))
        return sampling.SampleInputs(
            prompt_ids=jnp.asarray(np.stack([p.prompt_ids for p in prepared]), jnp.int32),
            negative_ids=jnp.asarray(np.stack([p.negative_ids for p in prepared]), jnp.int32),
            token_residuals=jnp.asarray(np.stack([p.residual_rows for p in prepared])),
            noise=jnp.asarray(noise), cfg_scale=jnp.float32(self.cfg["cfg_scale"]),
            renoise_keys=renoise_keys(seeds), guidance=g, guided_steps=jnp.int32(self.guided_steps))

    def plan(self, params: Any, prepared: Sequence[Prepared], seeds: Sequence[int]) -> Plan:
        """The compiled sampler for these jobs: the fixed batch, or all of them at once, halved
        (keeping every device busy) until XLA's buffer plan fits in device memory."""
        n = len(seeds)
        b = self.batch or default_batch(n, len(jax.local_devices()))
        while True:
            mesh = batch_mesh(b)
            placed = jax.device_put(params, NamedSharding(mesh, P()))
            idx = [k % n for k in range(b)]
            example = shard_batch(self.inputs([prepared[k] for k in idx], [seeds[k] for k in idx]), mesh)
            with jax.set_mesh(mesh):
                compiled = sampling.compile_sampler(self.sd, self.spec, self.bias_fn, placed, self.schedule,
                                                    example, on_step=self.on_step)
            if self.batch or b <= mesh.size or fits_in_memory(compiled.fn, mesh.size):
                return Plan(compiled, mesh, b, placed)
            b = max(mesh.size, b // 2 // mesh.size * mesh.size)

    def sample(self, jobs: Sequence[tuple[layout_lib.Layout | str | Prepared, int]], *, params: Any = None,
               on_batch: Callable[[int], None] | None = None) -> Drawn:
        """One image per (layout or prompt, seed) job, in order. `params` (default `sd.params`):
        other weights of the same shapes, e.g. a UNet with concept neurons shut
        (`cones_jax.neurons.params_with_neurons`). `on_batch(n)` hears after each sampler call how
        many images it finished (a host-side count, nothing compiled in)."""
        if not jobs:
            raise GenerateError("nothing to sample: no (layout, seed) jobs")
        made: dict[int, Prepared] = {}
        for job, _ in jobs:
            if id(job) not in made:
                made[id(job)] = self.prepare(job)
        prepared = [made[id(job)] for job, _ in jobs]
        seeds = [int(s) for _, s in jobs]
        plan = self.plan(self.sd.params if params is None else params, prepared, seeds)
        images, attention, bad = [], [] if self.spec.sow_attention else None, []
        t0 = time.perf_counter()
        for idx, real in padded_chunks(len(jobs), plan.batch):
            inputs = shard_batch(self.inputs([prepared[k] for k in idx], [seeds[k] for k in idx]), plan.mesh)
            pixels, *maps, finite = plan.compiled.fn(plan.params, self.schedule, inputs)
            maps = maps[0] if maps else None
            bad += [seeds[k] for k, ok in zip(idx[:real], np.asarray(finite)[:real]) if not ok]
            if not bad:  # no uint8 cast of undefined pixels: once one image failed, the caller gets an error
                images.extend(to_uint8(np.asarray(pixels))[:real])
            if maps is not None and not bad:
                maps = jax.device_get(maps)
                attention.extend(jax.tree_util.tree_map(lambda m, k=k: m[k], maps) for k in range(real))
            if on_batch is not None:
                on_batch(real)
        seconds = time.perf_counter() - t0
        if bad:
            raise NonFiniteError(
                f"the sampler produced NaN or Inf for seed(s) {', '.join(map(str, bad))}; nothing was written. "
                "Check the residual files, `cfg_scale` and `guidance_weight`; with `dtype` fp16, try bf16 or fp32")
        return Drawn(np.stack(images), prepared, attention, seconds, plan.compiled, plan.batch, plan.mesh.size)

    def draw(self, layouts: Sequence[layout_lib.Layout | str], seeds: Sequence[int], *, params: Any = None,
             on_batch: Callable[[int], None] | None = None) -> Drawn:
        """One image per (layout, seed) pair, layouts outer: `sample` over their product."""
        return self.sample([(lay, s) for lay in layouts for s in seeds], params=params, on_batch=on_batch)


def sample_prompts(sd: StableDiffusion, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 25,
                   cfg_scale: float = 7.5, scheduler: str = "ddim", negative_prompt: str = "", batch: int = 8,
                   params: Any = None) -> np.ndarray:
    """Plain text-to-image (no layout): one uint8 image [H, W, 3] per (prompt, seed), `batch` at a
    time through one compiled sampler."""
    if len(prompts) != len(seeds):
        raise GenerateError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    cfg = {"scheduler": scheduler, "steps": steps, "cfg_scale": cfg_scale}
    core = LayoutSampler(sd, cfg, guided=False, batch=batch, negative_prompt=negative_prompt)
    return core.sample(list(zip(prompts, seeds)), params=params).images
