"""The sampler: one jitted pure function from token ids, noise and guidance arrays to images.

Text encoding, classifier-free guidance (one UNet batch of 2B), the scheduler loop
(`lax.fori_loop`), optional self-recurrence, the cross-attention bias and the VAE decode all run
inside one `jax.jit`. Everything that changes between calls at the same shapes (prompts,
residuals, layouts, guidance weights, schedules, seeds) is an array argument, so a new prompt or
layout never recompiles. `debug=True` runs the same loop in Python, eagerly.

The CFG batch interleaves each image's rows (`cfg_batch`: row 2k unconditional, 2k+1
conditional), so when the images are sharded over a mesh's data axis both rows of an image sit on
its device and no step moves data between devices. Guided and unguided steps run one traced UNet:
the bias is switched off past the guided steps rather than chosen by `lax.cond`, which would
compile the UNet twice. `compile_sampler` caches compiled samplers per model, spec and shapes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import flax
import jax
import jax.numpy as jnp

from cones_jax import schedulers
from cones_jax.models import attention
from cones_jax.models.vae import unscale_latents

if TYPE_CHECKING:
    from cones_jax.models.clip_text import CLIPTextTransformer
    from cones_jax.models.unet import UNet2DConditionModel
    from cones_jax.models.vae import AutoencoderKL

Array = jax.Array

# (scores S [2B, H, Q, K] fp32, (h, w), step index i, guidance pytree) -> additive bias
StepBiasFn = Callable[[Array, tuple[int, int], Array, Any], Array]


class SamplerModel(Protocol):
    """What the sampler reads of a loaded model: a `cones_jax.pipeline.StableDiffusion`, which this
    layer does not import (docs/ARCHITECTURE.md)."""

    unet: UNet2DConditionModel | None
    vae: AutoencoderKL | None
    text_encoder: CLIPTextTransformer | None
    compiled: dict


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """What is fixed for one compiled sampler (changing it recompiles)."""

    scheduler: str = "ddim"
    steps: int = 50
    self_recurrence: bool = False  # Cones 2 official: redo each guided step once after re-noising
    decode: bool = True
    sow_attention: bool = False  # also return cross-attention maps summed over all UNet calls
    check_finite: bool = False  # also return a [B] bool: image k's latents and pixels are all finite


@flax.struct.dataclass
class SampleInputs:
    """Traced inputs of one sampler call; B is the number of images."""

    prompt_ids: Array  # [B, L] int32
    negative_ids: Array  # [B, L] int32
    token_residuals: Array  # [B, L, E] added to the conditional text embeddings (Cones 2, Eq. 6)
    noise: Array  # [B, h, w, C] unit Gaussian
    cfg_scale: Array  # [] classifier-free guidance weight
    renoise_keys: Array  # [B, 2] one PRNG key per image for its self-recurrence noise (keyed by its seed,
    # so an image does not depend on which others share its batch)
    guidance: Any = None  # pytree handed to the bias function (None: no layout guidance)
    guided_steps: Array = None  # [] int: steps [0, guided_steps) get the bias and self-recurrence


def encode_text(text_module: CLIPTextTransformer, text_params: Any, ids_BxL: Array) -> Array:
    return text_module.apply({"params": text_params}, ids_BxL)["last_hidden_state"]


def cfg_batch(uncond_Bx: Array, cond_Bx: Array) -> Array:
    """The CFG batch [2B, ...]: image k's unconditional row at 2k, its conditional row at 2k+1.

    Interleaving (not concatenating halves) keeps both rows of an image in the same shard of a
    batch split over devices, so building the batch and `cfg_halves` are local on every device.
    """
    return jnp.stack([uncond_Bx, cond_Bx], axis=1).reshape((-1,) + uncond_Bx.shape[1:])


def cfg_halves(x_2Bx: Array) -> tuple[Array, Array]:
    """Inverse of `cfg_batch`: (unconditional rows [B, ...], conditional rows [B, ...])."""
    x_Bx2x = x_2Bx.reshape((-1, 2) + x_2Bx.shape[1:])
    return x_Bx2x[:, 0], x_Bx2x[:, 1]


def guided_denoise(unet: Any, spec: SamplerSpec, bias_fn: StepBiasFn | None, params: Any,
                   schedule: schedulers.Schedule, context_2BxLxE: Array, x: Array, i: Array | int,
                   inputs: SampleInputs) -> tuple[Array, Any]:
    """CFG-combined model output at step i, and the sown attention maps (or None).

    On guided steps the cross-attention bias is on (the unconditional rows get none); past
    them it is zero, through the same traced UNet.
    """
    x_in = schedulers.scale_model_input(schedule, x, i)
    x_2B = cfg_batch(x_in, x_in)
    t = jnp.broadcast_to(schedule.timesteps[i], (x_2B.shape[0],))
    hook = None
    if bias_fn is not None and inputs.guidance is not None:
        hook = lambda s, hw: jnp.where(i < inputs.guided_steps, bias_fn(s, hw, i, inputs.guidance), 0.0)
    out = unet.apply({"params": params["unet"]}, x_2B, t, context_2BxLxE, cross_attn_bias=hook,
                     sow_attention=spec.sow_attention,
                     mutable=["intermediates"] if spec.sow_attention else False)
    out, inter = out if spec.sow_attention else (out, None)
    uncond, cond = cfg_halves(out.astype(jnp.float32))
    return uncond + inputs.cfg_scale * (cond - uncond), inter


def make_sampler(sd: SamplerModel, spec: SamplerSpec, bias_fn: StepBiasFn | None = None, *, debug: bool = False,
                 on_step: Callable[[int], None] | None = None,
                 ) -> Callable[[Any, schedulers.Schedule, SampleInputs], Any]:
    """Builds `sample(params, schedule, inputs) -> images [B, H, W, 3] in [0, 1]` (or latents);
    with `spec.sow_attention` also the attention maps, with `spec.check_finite` last a [B] bool
    flag per image (a tuple then: images, maps, flags).

    `sd` is a `cones_jax.pipeline.StableDiffusion`; `params` its params dict. With `debug`, the
    function is not jitted and the step loop is a Python loop. `on_step(i)` is called on the host
    after every step (a host callback, which keeps JAX from caching the sampler on disk: none
    without it).
    """
    unet, vae, text = sd.unet, sd.vae, sd.text_encoder

    def denoise(params: Any, schedule: schedulers.Schedule, context_2BxLxE: Array, x: Array, i: Array | int,
                inputs: SampleInputs) -> tuple[Array, Any]:
        return guided_denoise(unet, spec, bias_fn, params, schedule, context_2BxLxE, x, i, inputs)

    def sample(params: Any, schedule: schedulers.Schedule, inputs: SampleInputs):
        cond = encode_text(text, params["text_encoder"], inputs.prompt_ids) + inputs.token_residuals
        uncond = encode_text(text, params["text_encoder"], inputs.negative_ids)
        context = cfg_batch(uncond, cond.astype(uncond.dtype))
        x = inputs.noise.astype(jnp.float32) * schedulers.init_noise_sigma(schedule)
        state = schedulers.init_state(schedule, x)
        guided = inputs.guided_steps if inputs.guided_steps is not None else jnp.zeros((), jnp.int32)
        inputs = inputs.replace(guided_steps=guided)

        def one_step(i: Array | int, carry: tuple[Array, Any, Any]):
            # Cones 2 official self-recurrence: a guided step is taken, taken back to level i with
            # fresh noise, and taken again; unguided steps run once.
            reps = (1 + (i < guided).astype(jnp.int32)) if spec.self_recurrence else 1

            def inner(k: Array | int, c: tuple[Array, Any, Any]):
                x, state, maps = c
                eps, inter = denoise(params, schedule, context, x, i, inputs)
                x_next, new_state = schedulers.step(schedule, state, eps, i, x)
                if spec.self_recurrence:
                    noise = jax.vmap(lambda key: jax.random.normal(
                        jax.random.fold_in(jax.random.fold_in(key, i), k), x.shape[1:], x.dtype))(inputs.renoise_keys)
                    again = k < reps - 1
                    x_next = jnp.where(again, schedulers.renoise(schedule, x_next, i, noise), x_next)
                    # a redone step must not advance the multistep memory twice
                    new_state = jax.tree_util.tree_map(lambda a, b: jnp.where(again, a, b), state, new_state)
                if maps is not None:
                    maps = jax.tree_util.tree_map(lambda m, a: m + a.astype(jnp.float32), maps, inter)
                return x_next, new_state, maps

            out = inner(0, carry) if not spec.self_recurrence else loop(0, reps, inner, carry)
            if on_step is not None:
                jax.debug.callback(lambda step: on_step(int(step)), i)
            return out

        maps0 = None
        if spec.sow_attention:
            shapes = jax.eval_shape(lambda: denoise(params, schedule, context, x, 0, inputs)[1])
            maps0 = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), shapes)
        x, _, maps = loop(0, schedule.timesteps.shape[0], one_step, (x, state, maps0))
        out, finite_B = x, all_finite(x)
        if spec.decode:
            images = vae.apply({"params": params["vae"]}, unscale_latents(vae.config, x), method=vae.decode)
            finite_B = finite_B & all_finite(images)  # before the clip, which would map ±Inf into [0, 1]
            out = jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
        outs = (out,)
        if spec.sow_attention:
            # cross-attention maps summed over every UNet call, conditional rows only
            outs += (jax.tree_util.tree_map(lambda m: cfg_halves(m)[1], maps),)
        if spec.check_finite:
            outs += (finite_B,)
        return outs if len(outs) > 1 else out

    loop = python_loop if debug else jax.lax.fori_loop
    return sample if debug else jax.jit(sample)


def all_finite(x_Bx: Array) -> Array:
    """[B] bool: whether every value of each item is finite (one reduction; a NaN anywhere in an
    image's latents or pixels makes its uint8 pixels undefined)."""
    return jnp.isfinite(x_Bx.reshape(x_Bx.shape[0], -1)).all(axis=1)


def python_loop(lo: int, hi: int | Array, body: Callable[[int, Any], Any], carry: Any) -> Any:
    """`lax.fori_loop` as a Python loop (the sampler's eager debug path)."""
    for i in range(lo, int(hi)):
        carry = body(i, carry)
    return carry


class CompiledSampler(NamedTuple):
    """A compiled sampler and what it cost: seconds to build it, and where it came from."""

    fn: Callable
    compile_seconds: float
    cached: bool  # this process had compiled it already
    from_disk: bool = False  # loaded from JAX's persistent compilation cache, not compiled

    def describe(self) -> str:
        if self.cached:
            return "reused the compiled sampler"
        if self.from_disk:
            return f"loaded the compiled sampler from the compilation cache in {self.compile_seconds:.1f} s"
        return f"compiled the sampler in {self.compile_seconds:.1f} s"


_DISK_HITS = [0]


def _count_disk_hits(event: str, **_: object) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _DISK_HITS[0] += 1


jax.monitoring.register_event_listener(_count_disk_hits)


def _signature(tree: Any) -> tuple:
    """What a compiled executable depends on in its arguments: structure, shapes, dtypes, shardings."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef,) + tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None)) for x in leaves)


def compile_sampler(sd: SamplerModel, spec: SamplerSpec, bias_fn: StepBiasFn | None, params: Any,
                    schedule: schedulers.Schedule, inputs: SampleInputs, *,
                    on_step: Callable[[int], None] | None = None) -> CompiledSampler:
    """The sampler for these arguments' shapes and shardings, compiled ahead of time.

    Kept per model (on `sd.compiled`) by spec, bias function, step callback, attention kernel and
    argument signature, so a second call at the same shapes (a new layout, prompt or seed) costs nothing
    here; JAX's persistent compilation cache, when the caller turned it on, makes the first call
    of a later process a load rather than a compile. Trace under `jax.set_mesh(mesh)` for kernels
    that run per shard (`cones_jax.models.attention.splash_attention`).
    """
    key = (spec, bias_fn, on_step, attention.forced_implementation(), _signature((params, schedule, inputs)))
    hit = sd.compiled.get(key)
    if hit is not None:
        return CompiledSampler(hit, 0.0, True)
    t0, hits = time.perf_counter(), _DISK_HITS[0]
    fn = make_sampler(sd, spec, bias_fn, on_step=on_step).lower(params, schedule, inputs).compile()
    sd.compiled[key] = fn
    return CompiledSampler(fn, time.perf_counter() - t0, False, _DISK_HITS[0] > hits)
