"""Where a demo base model loses shapes: a quick look while it trains.

    python -m cones_jax.demo.diagnose --model examples/demo_model --out /tmp/diagnose.png
    python -m cones_jax.demo.diagnose --model examples/demo_model --images examples/demo_world/subjects/sunny \
        --object-attention "a sks star" "a star"

Prints the single-object gate on one seed per colour x shape (49 samples), how much the model's
denoising loss rises when a caption's shape or colour word is swapped (per noise level; near 0 for
a word the model ignores), how much of a shape or colour word's cross-attention falls on its
object, and writes one PNG grid:
  row 1      renders of a big red star, blue heart, green triangle and yellow square on grey;
  rows 2-6   the model's one-shot x₀ prediction from those latents noised to t = 100 ... 900;
  rows 7-14  DDIM from those noised latents (t = 500, 700, 850, 999; CFG 1, then 5) down to 0.
A model whose x₀ predictions keep a shape at a given t but whose DDIM from that t loses it draws
its fine detail badly at the lower noise levels: errors compound step after step.

With --object-attention it prints only, for each prompt, the share of the cross-attention of the
object's cells and of the background's that goes to each token (`object_attention`), on photos of
one object (--images): which tokens carry what a model draws inside an object.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from cones_jax import training
from cones_jax.demo import detect, evaluate, world
from cones_jax.errors import ConfigError
from cones_jax.models.vae import AutoencoderKL
from cones_jax.schedulers import alphas_cumprod

if TYPE_CHECKING:
    from cones_jax.pipeline import StableDiffusion

PROBES = (("star", "red"), ("heart", "blue"), ("triangle", "green"), ("square", "yellow"))
X0_TIMESTEPS = (100, 300, 500, 700, 900)
DDIM_STARTS = (500, 700, 850, 999)
SENSITIVITY_TIMESTEPS = (500, 650, 750, 850, 920)


def _scaled_latents(sd: StableDiffusion, renders: np.ndarray) -> jax.Array:
    """The VAE's posterior means of uint8 renders, times its scaling factor (what the UNet denoises)."""
    x = jnp.asarray(renders, jnp.float32) / 127.5 - 1.0
    return sd.vae.apply({"params": sd.params["vae"]}, x, method=AutoencoderKL.encode)[0] * sd.vae.config.scaling_factor


def _context(sd: StableDiffusion, prompts: Sequence[str]) -> jax.Array:
    """The text encoder's last hidden states for `prompts` (the UNet's cross-attention context)."""
    ids = jnp.asarray(sd.tokenizer.encode(list(prompts)))
    return sd.text_encoder.apply({"params": sd.params["text_encoder"]}, ids)["last_hidden_state"]


def _attention_at(sd: StableDiffusion, z0: jax.Array, ctx: jax.Array) -> Callable:
    """Jitted `(noise, t) -> ` the cross-attention probabilities of every layer (a tree of [N, Q, K])
    for the latents `z0` noised to level t with `noise`, read against the context `ctx`."""
    ac = jnp.asarray(alphas_cumprod(sd.scheduler), jnp.float32)
    return jax.jit(lambda noise, t: training.denoising_errors(
        sd.unet, sd.params["unet"], ctx, z0, noise, jnp.full((z0.shape[0],), t), ac, sd.scheduler.prediction_type,
        with_attention=True)[1])


def caption_sensitivity(sd: StableDiffusion, timesteps: Sequence[int] = SENSITIVITY_TIMESTEPS,
                        draws: int = 4) -> dict[int, dict[str, float]]:
    """For 49 single big objects on grey (every colour x shape), the relative rise of the mean
    denoising loss at each t when the caption names another shape, or another colour, than the one
    drawn: {t: {"shape": rise, "colour": rise}}. It measures how much the model reads each word,
    and moves long before the gate does."""
    shapes, colours = list(world.SHAPES), list(world.COLOURS)
    rng = np.random.default_rng(0)
    things = [world.Thing(shapes[i % 7], colours[i // 7], size="big") for i in range(49)]
    scenes = [world.Scene(tuple(world.place_things(rng, [t])), "grey", seed=i) for i, t in enumerate(things)]
    z0 = _scaled_latents(sd, np.stack([world.render(s) for s in scenes]))
    # another word three places on, so every swap changes the word and no pair is favoured
    captions = {"right": [f"a {t.colour} {t.shape}" for t in things],
                "shape": [f"a {t.colour} {shapes[(shapes.index(t.shape) + 3) % 7]}" for t in things],
                "colour": [f"a {colours[(colours.index(t.colour) + 3) % 7]} {t.shape}" for t in things]}
    ctx = {k: _context(sd, v) for k, v in captions.items()}
    ac = jnp.asarray(alphas_cumprod(sd.scheduler), jnp.float32)
    loss = jax.jit(lambda c, n, t: jnp.mean(training.denoising_errors(
        sd.unet, sd.params["unet"], c, z0, n, jnp.full((z0.shape[0],), t), ac, sd.scheduler.prediction_type)))
    out = {}
    for t in timesteps:
        noises = [jax.random.normal(jax.random.PRNGKey(k), z0.shape) for k in range(draws)]
        mean = {k: np.mean([float(loss(c, n, t)) for n in noises]) for k, c in ctx.items()}
        out[t] = {k: float(mean[k] / mean["right"] - 1.0) for k in ("shape", "colour")}
    return out


def word_localization(sd: StableDiffusion, timesteps: Sequence[int] = (300, 600, 850),
                      n: int = 32) -> dict[int, dict[str, float]]:
    """How much of a trait word's cross-attention falls on its object: for `n` two-object renders on
    grey captioned "a {colour} {shape} and a {colour} {shape} ...", noised to each t, the share of
    each shape word's and colour word's attention mass (all cross-attention layers) on its object's
    pixels, beside the share of the grid those pixels cover (what attention blind to place gets):
    {t: {"shape": share, "colour": share, "area": share}}. Layout guidance moves a subject by its
    word's attention, so a model whose words do not sit on their objects cannot be steered by it."""
    from cones_jax.demo import base_model

    shapes, colours = list(world.SHAPES), list(world.COLOURS)
    rng = np.random.default_rng(0)
    scenes, captions = [], []
    for i in range(n):
        a = world.Thing(shapes[i % 7], colours[3 * i % 7], size="big")
        b = world.Thing(shapes[(i + 2) % 7], colours[(3 * i + 1) % 7], size="big")
        scenes.append(world.Scene(tuple(world.place_things(rng, [a, b])), "grey", seed=i))
        captions.append(f"a {a.colour} {a.shape} and a {b.colour} {b.shape} on a grey background")
    ids = sd.tokenizer.encode(captions)
    word_ids = base_model.grounded_word_ids(sd.tokenizer)
    kind = {i: "shape" if w in world.SHAPES else "colour" for i, w in word_ids.items()}
    z0 = _scaled_latents(sd, np.stack([world.render(s) for s in scenes]))
    ctx = _context(sd, captions)
    attention = _attention_at(sd, z0, ctx)
    cover = base_model.grounding_targets(scenes, ids, word_ids, base_model.cross_attention_sides(sd.unet))
    grounded = {key: list(zip(*np.nonzero(c.sum(1)))) for key, c in cover.items()}  # (example, token) pairs
    out = {}
    for t in timesteps:
        share = {"shape": [], "colour": [], "area": []}
        for p in jax.tree.leaves(attention(jax.random.normal(jax.random.PRNGKey(t), z0.shape), t)):
            key = f"ground_{p.shape[1]}"
            inside = np.asarray(base_model.attention_share(p, cover[key]))
            for b, k in grounded[key]:
                share[kind[int(ids[b, k])]].append(inside[b, k])
                share["area"].append(cover[key][b, :, k].mean())
        out[t] = {k: float(np.mean(v)) for k, v in share.items()}
    return out


def object_masks(images_NxHxWx3: np.ndarray, threshold: float = 30.0) -> np.ndarray:
    """[N, H, W] bool: the pixels of each image whose colour differs from its top-left pixel's (the
    one-colour background of the demo world's renders and subject photos) by more than `threshold`
    (summed over channels, 0-255 scale)."""
    x = np.asarray(images_NxHxWx3, np.float32)
    return np.abs(x - x[:, :1, :1]).sum(-1) > threshold


def object_attention(sd: StableDiffusion, images_NxHxWx3: np.ndarray, prompt: str,
                     timesteps: Sequence[int] = X0_TIMESTEPS, draws: int = 2) -> dict[str, np.ndarray]:
    """Where an object's cells send their cross-attention: for uint8 images of one object on a
    one-colour background, noised to each t (`draws` noises each), the mean share of an object
    cell's attention (cells at least half covered, `object_masks`) and of a background cell's (cells
    not covered) that goes to each token of `prompt`, averaged over every cross-attention layer:
    {"tokens": [L] str, "object": [L], "background": [L]}. The pixel grounding loss
    (`base_model.pixel_grounding_loss`) trains a shape word's share of its object's cells; a
    method that acts through the prompt's other tokens (an identifier, for concept neurons) acts
    through whatever share they keep."""
    images = np.asarray(images_NxHxWx3)
    n = images.shape[0]
    masks = object_masks(images).astype(np.float32)
    ids = sd.tokenizer.encode([prompt] * n)
    z0 = _scaled_latents(sd, images)
    ctx = _context(sd, [prompt] * n)
    attention = _attention_at(sd, z0, ctx)
    side_px = masks.shape[1]
    inside, outside = [], []
    for t in timesteps:
        for d in range(draws):
            for probs_NxQxK in jax.tree.leaves(attention(jax.random.normal(jax.random.PRNGKey(1000 * d + t), z0.shape),
                                                         t)):
                p = np.asarray(probs_NxQxK, np.float32)
                side = int(round(p.shape[1] ** 0.5))
                cover = masks.reshape(n, side, side_px // side, side, side_px // side).mean(axis=(2, 4)).reshape(n, -1)
                on_object, on_background = cover >= 0.5, cover == 0
                # a grid too coarse to hold a whole cell of the object (or of background) adds nothing
                if on_object.any():
                    inside.append(p[on_object].mean(0))
                if on_background.any():
                    outside.append(p[on_background].mean(0))
    return {"tokens": sd.tokenizer.token_strings(ids[0]), "object": np.mean(inside, 0),
            "background": np.mean(outside, 0)}


def probe_grid(sd: StableDiffusion, ddim_stride: int = 40) -> np.ndarray:
    """The uint8 grid described in the module docstring (v-prediction models only)."""
    if sd.scheduler.prediction_type != "v_prediction":
        raise ConfigError("diagnose reads v-prediction models (the demo recipe's)")
    ac = np.asarray(alphas_cumprod(sd.scheduler), np.float64)
    things = [world.Thing(s, c, box=(18, 18, 46, 46)) for s, c in PROBES]
    renders = np.stack([world.render(world.Scene((t,), "grey", seed=i)) for i, t in enumerate(things)])
    sf = sd.vae.config.scaling_factor
    z0 = _scaled_latents(sd, renders)
    cond = _context(sd, [f"a big {t.colour} {t.shape}" for t in things])
    uncond = _context(sd, [""] * len(things))
    unet = jax.jit(lambda z, t, c: sd.unet.apply({"params": sd.params["unet"]}, z, jnp.full((z.shape[0],), t), c))

    def decode(z: jax.Array):
        x = sd.vae.apply({"params": sd.params["vae"]}, z / sf, method=AutoencoderKL.decode)
        return np.asarray(jnp.clip((x + 1.0) * 127.5, 0, 255)).astype(np.uint8)

    def noised(t: int):
        return np.sqrt(ac[t]) * z0 + np.sqrt(1 - ac[t]) * jax.random.normal(jax.random.PRNGKey(t), z0.shape)

    rows = [renders]
    for t in X0_TIMESTEPS:
        zt = noised(t)
        rows.append(decode(np.sqrt(ac[t]) * zt - np.sqrt(1 - ac[t]) * unet(zt, float(t), cond)))
    for start in DDIM_STARTS:
        for cfg in (1.0, 5.0):
            z, ts = noised(start), list(range(start, -1, -ddim_stride))
            for i, t in enumerate(ts):  # deterministic DDIM in v-parametrisation
                a, a_next = ac[t], (ac[ts[i + 1]] if i + 1 < len(ts) else 1.0)
                v_u = unet(z, float(t), uncond)
                v = v_u + cfg * (unet(z, float(t), cond) - v_u)
                x0, eps = np.sqrt(a) * z - np.sqrt(1 - a) * v, np.sqrt(a) * v + np.sqrt(1 - a) * z
                z = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps
            rows.append(decode(z))
    return np.concatenate([np.concatenate(list(r), 1) for r in rows], 0)


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from cones_jax.generate import save_png
    from cones_jax.pipeline import load_pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--detector", default=os.path.join(evaluate.DEMO_WORLD, "detector.safetensors"))
    p.add_argument("--out", help="PNG of the x₀ / DDIM grid (required unless --object-attention)")
    p.add_argument("--object-attention", nargs="+", metavar="PROMPT",
                   help="print only, for each PROMPT, the share of the attention of --images' object cells "
                        "and background cells that goes to each of its tokens")
    p.add_argument("--images", metavar="DIR", help="photos of one object on a one-colour background "
                                                    "(e.g. examples/demo_world/subjects/sunny)")
    args = p.parse_args(argv)
    if args.object_attention and not args.images:
        p.error("--object-attention needs --images DIR, photos of one object on a one-colour background")
    if not args.object_attention and not args.out:
        p.error("give --out PATH.png for the grid (or --object-attention PROMPT --images DIR)")
    sd = load_pipeline(args.model)
    if args.object_attention:
        side = sd.unet.config.sample_size * sd.latent_factor
        images = training.load_images(args.images, side, crop="center", multiple=sd.latent_factor)
        images = np.stack([np.round((x + 1.0) * 127.5) for x in images]).astype(np.uint8)
        for prompt in args.object_attention:
            share = object_attention(sd, images, prompt)
            eos = share["tokens"].index(sd.tokenizer.eos_token)  # `encode` always writes one
            print(f"{prompt!r}: share of an object cell's / a background cell's attention, by token")
            for k, tok in enumerate(share["tokens"][:eos + 1]):
                print(f"  {tok:>16} {100 * share['object'][k]:5.1f}% {100 * share['background'][k]:5.1f}%")
            print(f"  {'(padding)':>16} {100 * share['object'][eos + 1:].sum():5.1f}% "
                  f"{100 * share['background'][eos + 1:].sum():5.1f}%")
        return 0
    print(f"single-object gate (1 seed): {evaluate.single_object_gate(sd, detect.load_detector(args.detector), [0])}")
    for t, rise in caption_sensitivity(sd).items():
        print(f"t = {t}: loss +{100 * rise['shape']:.1f}% with another shape word, "
              f"+{100 * rise['colour']:.1f}% with another colour word")
    for t, share in word_localization(sd).items():
        print(f"t = {t}: {100 * share['shape']:.0f}% of a shape word's attention and {100 * share['colour']:.0f}% "
              f"of a colour word's on its object, which covers {100 * share['area']:.0f}% of the grid")
    grid = probe_grid(sd)
    save_png(args.out, Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
