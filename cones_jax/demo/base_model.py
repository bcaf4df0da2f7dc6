"""The demo base model: a small Stable Diffusion of the shapes world, trained from scratch here.

Same module classes as Stable Diffusion (CLIP text tower, AutoencoderKL, UNet2DConditionModel) with
small configs (`VAE`, `UNET`, `text_config`, `SCHEDULER`), so every Cones code path (residuals, layout
bias, concept neurons) runs on it unchanged. This module holds the recipe, its losses, the export
and the command line; the Flax -> PyTorch weight conversion is `cones_jax.convert.to_state_dict`.

Training has three stages, each resumable from `workdir`:
  1. render a fixed set of captioned scenes (`world.py`);
  2. train the VAE on 32 px crops (64 px images -> 32x32x4 latents) and cache the latent Gaussians
     of every scene;
  3. train the UNet and the text encoder together on the cached latents: v-prediction on a cosine
     schedule, clipped-v loss weights (`--weighting min_snr` for min-SNR-5), captions with word
     drop-out, 10% empty for classifier-free guidance, EMA weights. Options draw more high-noise
     timesteps (`--timestep-power`), add single-object and crowded batches (`--single-object-fraction`,
     `--multi-object-fraction`) and token and pixel grounding losses (`--grounding-weight`,
     `--grounding-pixel-weight`); `--init-from`
     continues from an exported folder, and `--stop-at N` stops at step N of a schedule that spans
     `--steps` (a later run resumes it).
`export` writes the EMA weights as a diffusers folder that PyTorch diffusers loads, with a record of
the UNet steps they have had.

    python -m cones_jax.demo.base_model --workdir /tmp/demo_run --out examples/demo_model

The shipped model came from a chain of such sittings; `python -m cones_jax.demo.retrain` replays
them (`cones_jax/configs/demo_model_lineage.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cones_jax import convert, training
from cones_jax.config import load_config, parse_overrides
from cones_jax.demo import world
from cones_jax.errors import ConfigError
from cones_jax.fileio import atomic_output, load_safetensors, save_json, save_safetensors
from cones_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from cones_jax.models.unet import UNet2DConditionModel, UNetConfig, cross_attention_resolutions
from cones_jax.models.vae import AutoencoderKL, VAEConfig
from cones_jax.residual import TI_TEMPLATES
from cones_jax.schedulers import SchedulerConfig, alphas_cumprod

if TYPE_CHECKING:
    import flax.linen as nn

    from cones_jax.pipeline import StableDiffusion
    from cones_jax.tokenizer import ClipTokenizer

# The recipe: a typed config (cones_jax/configs/demo_base_model.py); the architecture follows.
RECIPE = load_config("demo_base_model")
MAX_LENGTH = RECIPE.max_length
TEXT_WIDTH = RECIPE.text_width

# Latents at 32² (f = 2): a small object (13-17 px) spans 7-8 latent pixels, so its shape is a spatial
# layout the UNet denoises like any other. At f = 4 it spanned 3-4, and shape lived in sub-pixel latent
# codes: two runs of 7000 and 4500 steps drew the right colour but never a shape (docs/demo_model_training.md).
VAE = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, layers_per_block=1, norm_num_groups=16,
           sample_size=world.IMAGE_SIZE, in_channels=3, out_channels=3, act_fn="silu")
LATENT_FACTOR = RECIPE.latent_factor
# Convolutions only at 32², cross-attention at 16² and 8² (XLA:CPU is slow on attention above 16²).
# 8 GroupNorm groups keep 4-16 channels per group; one channel per group is an instance norm that
# wipes each channel's spatial statistics.
UNET = dict(sample_size=world.IMAGE_SIZE // LATENT_FACTOR, in_channels=4, out_channels=4,
            block_out_channels=[32, 64, 128], layers_per_block=1,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[4, 4, 4],
            cross_attention_dim=TEXT_WIDTH, use_linear_projection=True, norm_num_groups=8)
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02,
                 prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                 timestep_spacing="trailing")


def text_config(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, projection_dim=TEXT_WIDTH, bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, model_type="clip_text_model")


def vocabulary() -> list[str]:
    """Caption words, most frequent first (they become single tokens), then the template words."""
    words = list(world.CAPTION_WORDS)
    for t in TI_TEMPLATES:
        words += t.replace("{}", "").split()
    return words


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Stage 1: data
# --------------------------------------------------------------------------------------------


def render_dataset(path: str, n: int, seed0: int = 0, chunk: int = 2000, sizes: str = "words") -> np.ndarray:
    """Renders scenes seed0 .. seed0+n-1 (`world.random_scene` with `sizes`) into a uint8
    [n, 64, 64, 3] .npy file (resumable by chunks)."""
    if os.path.exists(path):
        return np.load(path, mmap_mode="r")
    parts_dir = path + ".parts"
    os.makedirs(parts_dir, exist_ok=True)
    from tqdm import tqdm

    for start in tqdm(range(0, n, chunk), desc="render", file=sys.stderr):
        part = os.path.join(parts_dir, f"{start:08d}.npy")
        if os.path.exists(part):
            continue
        imgs, _ = world.render_batch(range(seed0 + start, seed0 + min(start + chunk, n)), sizes=sizes)
        with atomic_output(part) as f:
            np.save(f, imgs)
    data = np.concatenate([np.load(os.path.join(parts_dir, f"{s:08d}.npy")) for s in range(0, n, chunk)])
    with atomic_output(path) as f:
        np.save(f, data)
    return np.load(path, mmap_mode="r")


def training_caption(scene: world.Scene, rng: np.random.Generator) -> str:
    """A caption with random word drop-out, sometimes wrapped in a textual-inversion template (so that
    "a photo of a {}" prompts mean the same to the model), and 10% empty for classifier-free guidance."""
    if rng.random() < 0.1:
        return ""
    text = world.caption(scene, rng)
    if rng.random() < 0.25:
        text = TI_TEMPLATES[rng.integers(len(TI_TEMPLATES))].format(text.split(" ", 1)[1])
    return text


# --------------------------------------------------------------------------------------------
# Stage 2: the VAE
# --------------------------------------------------------------------------------------------


def vae_module() -> AutoencoderKL:
    return AutoencoderKL(VAEConfig.from_dict(VAE))


KL_WEIGHT = RECIPE.kl_weight
ARCHITECTURE_KEYS = ("max_length", "text_width", "latent_factor", "kl_weight")  # read at import, not per run


def vae_loss(vae: AutoencoderKL, params: Any, frozen: Any, batch: dict,
             rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L1 + L2 reconstruction of a sampled latent, plus a small KL term (as SD's autoencoder, without
    the perceptual and adversarial terms, which flat-coloured shapes do not need)."""
    del frozen
    x = batch["images"].astype(jnp.float32) / 127.5 - 1.0
    mean, std = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
    z = mean + std * jax.random.normal(rng, mean.shape)
    y = vae.apply({"params": params}, z, method=AutoencoderKL.decode).astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(y - x))
    l2 = jnp.mean(jnp.square(y - x))
    kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.square(std) - 1.0 - 2.0 * jnp.log(std), axis=(1, 2, 3)))
    loss = l1 + l2 + KL_WEIGHT * kl
    return loss, {"l1": l1, "kl": kl}


def optimizer(lr: float, warmup: int, steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=0.1 * lr)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=0.01))


def train_stage(name: str, workdir: str, loss_fn: training.LossFn, params: Any,
                batches: Callable[[int], dict], *, steps: int, lr: float, batch: int,
                ema: bool, seed: int = 0, checkpoint_every: int = 500, export_only: bool = False,
                stop_at: int | None = None) -> dict:
    """Runs one resumable training stage; returns the final state (with `export_only`, the latest
    checkpoint's). `seed` keys the noise and timesteps. With `stop_at`, training stops after that
    step (checkpointed there) while the learning-rate schedule still spans `steps`: the first part
    of a longer run, which a later run with the same `steps` (or more) resumes."""
    opt = optimizer(lr, min(500, steps // 10), steps)
    mesh = training.make_mesh(batch)
    step_fn = training.make_train_step(loss_fn, opt, mesh, frozen={}, ema_decay=0.999)
    state = training.init_state(params, opt, seed=seed, ema=ema)
    ckpt = training.Checkpointer(os.path.join(workdir, f"ckpt_{name}"), every=checkpoint_every, keep=2,
                                 metadata={"kind": f"demo_{name}"})
    restored = ckpt.restore(state)
    if restored is not None:
        state = restored
        _log(f"{name}: resumed at step {int(state['step'])}")
    if export_only:
        ckpt.close()
        return state
    state = step_fn.put_state(state)
    state, history = training.run_loop(step_fn, state, batches, total_steps=steps if stop_at is None else stop_at,
                                       checkpointer=ckpt, log=_log)
    ckpt.close()
    if history:
        last = history[-100:]
        parts = ", ".join(f"{k} {np.mean([h[k] for h in last]):.4f}" for k in last[0] if k != "grad_norm")
        _log(f"{name}: mean of the last {len(last)} steps: {parts}")
    return state


def encode_dataset(vae: AutoencoderKL, params: Any, images: np.ndarray,
                   chunk: int = 50) -> tuple[np.ndarray, np.ndarray]:
    # Small chunks: the mid-block attention's [chunk, 1024, 1024] scores at 500 images were 2 GB and
    # made the encode memory-bound, twice as slow as at 50 (docs/demo_model_training.md).
    enc = jax.jit(lambda p, x: vae.apply({"params": p}, x.astype(jnp.float32) / 127.5 - 1.0,
                                         method=AutoencoderKL.encode))
    from tqdm import tqdm

    means, stds = [], []
    for i in tqdm(range(0, len(images), chunk), desc="encode", file=sys.stderr):
        m, s = enc(params, np.asarray(images[i:i + chunk]))
        means.append(np.asarray(m, np.float16))
        stds.append(np.asarray(s, np.float16))
    return np.concatenate(means), np.concatenate(stds)


# --------------------------------------------------------------------------------------------
# Stage 3: UNet + text encoder
# --------------------------------------------------------------------------------------------


def min_snr_weight(alphas_cumprod_T: jax.Array, t_B: jax.Array, gamma: float = 5.0) -> jax.Array:
    """Min-SNR-γ loss weight for v-prediction: min(SNR, γ) / (SNR + 1) (Hang et al., 2023). At low SNR
    it falls like SNR, so the high-noise steps, where a sample's layout (how many objects, where,
    how big) is decided, get almost no gradient."""
    ac = alphas_cumprod_T[t_B]
    snr = ac / (1.0 - ac)
    return jnp.minimum(snr, gamma) / (snr + 1.0)


def clipped_v_weight(alphas_cumprod_T: jax.Array, t_B: jax.Array, gamma: float = 5.0) -> jax.Array:
    """min(SNR + 1, γ) / (SNR + 1): the plain v loss (weight 1) wherever SNR + 1 <= γ, and min-SNR's
    clamp above. In x₀ terms the v loss weighs SNR + 1; this clips that weight at γ, where min-SNR
    clips SNR itself and so starves the high-noise steps."""
    ac = alphas_cumprod_T[t_B]
    snr = ac / (1.0 - ac)
    return jnp.minimum(snr + 1.0, gamma) / (snr + 1.0)


# Seeds of the UNet stage's three data draws, each offset by the steps the weights had before the sitting.
DATA_SEED = 2
SINGLES_SEED = 7919
MULTIS_SEED = 104729
# A crowded scene, for --multi-object-fraction: the counts at which text alignment and placement fail.
CROWDED = 3


def unet_batch_indices(step: int, batch: int, n_scenes: int, singles: np.ndarray, n_single: int,
                       prior: int, multis: np.ndarray | None = None, n_multi: int = 0) -> np.ndarray:
    """The scenes of UNet batch `step` (sorted): `batch - n_single - n_multi` from all scenes,
    `n_single` more from the single-object ones (`singles`, their indices) and `n_multi` from the
    crowded ones (`multis`), each an endless run of shuffles. With `n_single` and `n_multi` 0 it is
    the draw of every run made before either existed; with `n_multi` 0, that of every run before
    crowded batches."""
    idx = training.batch_indices(step, batch - n_single - n_multi, n_scenes, seed=DATA_SEED + prior)
    if n_single:
        idx += singles[training.batch_indices(step, n_single, len(singles), seed=SINGLES_SEED + prior)].tolist()
    if n_multi:
        idx += multis[training.batch_indices(step, n_multi, len(multis), seed=MULTIS_SEED + prior)].tolist()
    return np.sort(idx)


LOSS_WEIGHTS = {"min_snr": min_snr_weight, "clipped_v": clipped_v_weight}


def sample_timesteps(rng: jax.Array, n: int, num_train_timesteps: int, power: float = 0.0) -> jax.Array:
    """Training timesteps with density ∝ (t / T)^power: uniform at 0, and at 1 twice the share of the
    steps above t = 0.85 T (28% against 15%), the band where, on this schedule, a sample's shape is
    decided: from t = 0.85 T the model keeps the shape it is given (docs/demo_model_training.md)."""
    if power == 0.0:
        return jax.random.randint(rng, (n,), 0, num_train_timesteps)  # the draw of every earlier run
    u = jax.random.uniform(rng, (n,))
    t = jnp.floor(num_train_timesteps * u ** (1.0 / (1.0 + power))).astype(jnp.int32)
    return jnp.minimum(t, num_train_timesteps - 1)


# Caption words that name a trait of one or more objects of the scene (sizes name none: they are relative).
GROUNDED_WORDS = tuple(world.SHAPES) + tuple(world.COLOURS) + tuple(p for p in world.PATTERNS if p != "solid")


def cross_attention_sides(unet: UNet2DConditionModel) -> tuple[int, ...]:
    """The grid sides (h = w) of the UNet's cross-attention layers at its sample size, finest first."""
    side = unet.config.sample_size
    return tuple(h for h, _ in cross_attention_resolutions(unet.config, (side, side)))


def grounded_word_ids(tok: ClipTokenizer) -> dict[int, str]:
    """Token id -> word for GROUNDED_WORDS, each of which the demo tokenizer keeps whole."""
    out = {}
    for word in GROUNDED_WORDS:
        ids = tok.encode([word])[0]
        if ids[2] != tok.eos_id:
            raise ValueError(f"the tokenizer splits {word!r}; grounding needs one token per trait word")
        out[int(ids[1])] = word
    return out


def grounding_targets(scenes: Sequence[world.Scene], ids_BxL: np.ndarray, word_ids: dict[int, str],
                      sides: tuple[int, ...]) -> dict:
    """{f"ground_{s*s}": float32 [B, s*s, L]}: for each caption token that names an object trait
    (`word_ids`: token id -> word), the share of each cell of the s x s grid covered by the objects
    of its scene with that trait (all of them: "red" grounds in every red object); 0 for other tokens."""
    size = world.IMAGE_SIZE
    out = {s: np.zeros((len(scenes), s * s, ids_BxL.shape[1]), np.float32) for s in sides}
    for b, (scene, ids) in enumerate(zip(scenes, ids_BxL)):
        cover: dict[str, np.ndarray] = {}
        for t in scene.things:
            x0, y0, x1, y1 = t.box
            body = world.shape_mask(t.shape, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, size).astype(np.float32)
            for word in (t.shape, t.colour, t.pattern):
                cover[word] = np.maximum(cover.get(word, 0.0), body)
        pooled = {word: {s: m.reshape(s, size // s, s, size // s).mean(axis=(1, 3)).reshape(-1) for s in sides}
                  for word, m in cover.items()}
        for k, tok in enumerate(ids):
            word = word_ids.get(int(tok))
            if word in pooled:
                for s in sides:
                    out[s][b, :, k] = pooled[word][s]
    out = {f"ground_{s * s}": v for s, v in out.items()}
    out["shape_tokens"] = np.isin(ids_BxL, [i for i, w in word_ids.items() if w in world.SHAPES]).astype(np.float32)
    return out


def attention_share(probs_BxQxK: jax.Array, cover_BxQxK: jax.Array) -> jax.Array:
    """[B, K]: the share of each token's attention mass that falls on its cover (`grounding_targets`)."""
    return jnp.sum(probs_BxQxK * cover_BxQxK, axis=1) / (jnp.sum(probs_BxQxK, axis=1) + 1e-8)


def grounding_loss(attention_tree: Any, batch: dict) -> jax.Array:
    """Token grounding (TokenCompose's token loss, Wang et al., 2024): for each caption token that names
    an object trait, (1 - the share of its cross-attention mass that falls on those objects)², averaged
    over such tokens and over every cross-attention layer. It teaches the model what Stable Diffusion
    learns from scale and Cones 2's layout guidance relies on: a word's attention sits on its object."""
    def layer_loss(probs_BxQxK: jax.Array, cover_BxQxK: jax.Array) -> jax.Array:
        grounded_BxK = (jnp.sum(cover_BxQxK, axis=1) > 0).astype(jnp.float32)
        inside_BxK = attention_share(probs_BxQxK, cover_BxQxK)
        return jnp.sum(grounded_BxK * jnp.square(1.0 - inside_BxK)) / jnp.maximum(jnp.sum(grounded_BxK), 1.0)

    return mean_over_layers(layer_loss, attention_tree, batch)


def mean_over_layers(layer_loss: Callable[[jax.Array, jax.Array], jax.Array], attention_tree: Any,
                     batch: dict) -> jax.Array:
    """`layer_loss(probs [B, Q, K], cover [B, Q, K])` averaged over every cross-attention layer, each
    against the `grounding_targets` cover at its resolution."""
    return jnp.mean(jnp.stack([layer_loss(probs_BxQxK, batch[f"ground_{probs_BxQxK.shape[1]}"])
                               for probs_BxQxK in jax.tree.leaves(attention_tree)]))


def pixel_grounding_loss(attention_tree: Any, batch: dict) -> jax.Array:
    """Pixel grounding (TokenCompose's pixel loss, Wang et al., 2024): for each caption token that
    names a shape, the binary cross-entropy between the share of each cell's attention that goes to
    it and the share of the cell its objects cover, averaged over cells, over such tokens and over
    every cross-attention layer. The token loss asks only that a word's attention stay on its object,
    which a small spot inside a big object satisfies; this one asks that the attention cover the
    object, so that where a shape word attends says how far its object extends: the signal that
    Cones 2's layout guidance, which raises a shape word's attention over its box, needs to draw
    the object at the box's size. Shape words only: the layout guides them, and a cell's
    attention to the colour, pattern and shape words of one object sums to at most 1."""
    shape_BxK = batch["shape_tokens"]

    def layer_loss(probs_BxQxK: jax.Array, cover_BxQxK: jax.Array) -> jax.Array:
        p = jnp.clip(probs_BxQxK.astype(jnp.float32), 1e-6, 1.0 - 1e-6)
        bce_BxK = -jnp.mean(cover_BxQxK * jnp.log(p) + (1.0 - cover_BxQxK) * jnp.log1p(-p), axis=1)
        return jnp.sum(shape_BxK * bce_BxK) / jnp.maximum(jnp.sum(shape_BxK), 1.0)

    return mean_over_layers(layer_loss, attention_tree, batch)


def make_diffusion_loss(unet: UNet2DConditionModel, text: CLIPTextTransformer, scaling_factor: float,
                        weighting: str = "clipped_v", timestep_power: float = 0.0,
                        grounding_weight: float = 0.0, grounding_pixel_weight: float = 0.0) -> training.LossFn:
    """The UNet stage's loss; with `grounding_weight` > 0, plus that times `grounding_loss`, and with
    `grounding_pixel_weight` > 0, plus that times `pixel_grounding_loss` (the batch then carries
    `grounding_targets`)."""
    weight = LOSS_WEIGHTS[weighting]
    ac_T = jnp.asarray(alphas_cumprod(SchedulerConfig.from_dict(SCHEDULER)), jnp.float32)
    grounded = grounding_weight > 0.0 or grounding_pixel_weight > 0.0

    def loss_fn(params: Any, frozen: Any, batch: dict, rng: jax.Array):
        del frozen
        k_z, k_t, k_n = jax.random.split(rng, 3)
        mean = batch["mean"].astype(jnp.float32)
        z0 = (mean + batch["std"].astype(jnp.float32) * jax.random.normal(k_z, mean.shape)) * scaling_factor
        b = z0.shape[0]
        t = sample_timesteps(k_t, b, ac_T.shape[0], timestep_power)
        noise = jax.random.normal(k_n, z0.shape)
        ctx = text.apply({"params": params["text_encoder"]}, batch["ids"])["last_hidden_state"]
        out = training.denoising_errors(unet, params["unet"], ctx, z0, noise, t, ac_T,
                                        SCHEDULER["prediction_type"], with_attention=grounded)
        per_example, attention = out if grounded else (out, None)
        loss = jnp.mean(weight(ac_T, t) * per_example)
        parts = {"mse": jnp.mean(per_example)}
        if grounding_weight > 0.0:
            parts["ground"] = grounding_loss(attention, batch)
            loss = loss + grounding_weight * parts["ground"]
        if grounding_pixel_weight > 0.0:
            parts["pixel"] = pixel_grounding_loss(attention, batch)
            loss = loss + grounding_pixel_weight * parts["pixel"]
        return loss, parts

    return loss_fn


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


TRAINING_RECORD = "demo_training.json"  # in an exported folder; diffusers ignores files it does not know


def export(out: str, *, unet_params: Any, text_params: Any, vae_params: Any, scaling_factor: float,
           tokenizer_words: list[str], unet_steps: int = 0) -> None:
    """Writes a diffusers Stable Diffusion folder: model_index.json, five components, and a record of
    how many UNet steps the weights have had over all sittings (`unet_steps`)."""
    from cones_jax.tokenizer import write_clip_tokenizer

    tok = write_clip_tokenizer(os.path.join(out, "tokenizer"), tokenizer_words, max_length=MAX_LENGTH)
    tcfg = text_config(tok.vocab_size)
    os.makedirs(os.path.join(out, "text_encoder"), exist_ok=True)
    save_json(os.path.join(out, "text_encoder", "config.json"),
              dict(tcfg, architectures=["CLIPTextModel"], torch_dtype="float32"))
    save_safetensors(os.path.join(out, "text_encoder", "model.safetensors"),
                     convert.to_state_dict(text_params, "text_model.", component="text_encoder"), {"format": "pt"})
    for name, cfg, params, cls in (("unet", UNET, unet_params, "UNet2DConditionModel"),
                                   ("vae", dict(VAE, scaling_factor=scaling_factor), vae_params, "AutoencoderKL")):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        save_json(os.path.join(out, name, "config.json"), dict(cfg, _class_name=cls))
        save_safetensors(os.path.join(out, name, "diffusion_pytorch_model.safetensors"),
                         convert.to_state_dict(params, component=name), {"format": "pt"})
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    save_json(os.path.join(out, "scheduler", "scheduler_config.json"), dict(SCHEDULER, _class_name="DDIMScheduler"))
    save_json(os.path.join(out, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]})
    save_json(os.path.join(out, TRAINING_RECORD), {"unet_steps": int(unet_steps), "recipe": recipe()})
    # The training configs made for this model, which train.py applies when the user names none.
    save_json(os.path.join(out, training.MODEL_TRAINING_FILE),
              {"residual": "cones2_train_demo", "neurons": "cones1_train_demo"})


# --------------------------------------------------------------------------------------------
# The whole recipe
# --------------------------------------------------------------------------------------------


def models(vocab_size: int) -> tuple[CLIPTextTransformer, UNet2DConditionModel]:
    text = CLIPTextTransformer(CLIPTextConfig.from_dict(text_config(vocab_size)))
    unet = UNet2DConditionModel(UNetConfig.from_dict(UNET))
    return text, unet


def init_params(module: nn.Module, *args: jax.Array, seed: int) -> Any:
    return jax.jit(lambda k: module.init(k, *args)["params"])(jax.random.PRNGKey(seed))


def save_params(path: str, params: Any) -> None:
    """A params tree as one safetensors file keyed by "/"-joined Flax paths (the workdir's VAE)."""
    save_safetensors(path, {"/".join(k): np.asarray(v) for k, v in convert.flatten(jax.device_get(params)).items()})


def warm_start(params: dict, sd: StableDiffusion) -> dict:
    """`params` (a dict of component trees: "text_encoder", "unet", "vae"; arrays or shape structs)
    replaced by those components of a loaded exported folder `sd`, which must have the same trees: a
    folder of another config is an error naming the first odd leaf."""
    got = {name: sd.params[name] for name in params}
    for name in params:
        want_flat, got_flat = convert.flatten(params[name]), convert.flatten(got[name])
        for k in sorted(set(want_flat) | set(got_flat)):
            if k not in got_flat or k not in want_flat or want_flat[k].shape != got_flat[k].shape:
                raise ConfigError(f"--init-from: {name} {'/'.join(k)} differs from this recipe's config; "
                                 "continue only from a folder this recipe exported")
    return jax.tree.map(lambda a, b: np.asarray(b, a.dtype), params, got)


def init_inputs() -> dict[str, tuple]:
    """Example inputs that initialise each of the recipe's three trees."""
    side = UNET["sample_size"]
    return {"text_encoder": (jnp.zeros((1, MAX_LENGTH), jnp.int32),),
            "unet": (jnp.zeros((1, side, side, 4)), jnp.zeros((1,)), jnp.zeros((1, MAX_LENGTH, TEXT_WIDTH))),
            "vae": (jnp.zeros((1, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)),)}


def param_shapes(vocab_size: int) -> dict:
    """Shape structs of the recipe's three trees (no initialisation runs)."""
    text, unet = models(vocab_size)
    modules = {"text_encoder": text, "unet": unet, "vae": vae_module()}
    return {name: jax.eval_shape(lambda k, m=modules[name], a=args: m.init(k, *a)["params"], jax.random.PRNGKey(0))
            for name, args in init_inputs().items()}


def recipe(scene_sizes: str = "words") -> dict:
    """What a workdir's scenes, VAE, latents and checkpoints depend on (the scene sizes only when not
    the default, so that workdirs made before the option still match)."""
    out = {"vae": VAE, "unet": UNET, "scheduler": SCHEDULER, "kl_weight": KL_WEIGHT, "text": text_config(0)}
    if scene_sizes != "words":
        out["scene_sizes"] = scene_sizes
    return out


def sitting_offset(workdir: str, init_from: str | None) -> int:
    """UNet steps the weights had before this workdir's sitting: 0 from scratch, else what the
    --init-from folder's record says. Kept in the workdir, so a resumed sitting keeps its seeds even
    after its --out (often the same folder as --init-from) was rewritten. The noise and the data
    order are keyed by it: each sitting draws new ones instead of replaying the first sitting's."""
    path = os.path.join(workdir, "sitting.json")
    source = os.path.abspath(init_from) if init_from else None
    if os.path.exists(path):
        with open(path) as f:
            sitting = json.load(f)
        if sitting["init_from"] != source:
            # its checkpoints would be restored over the --init-from weights without a word
            raise ConfigError(f"--workdir {workdir} holds a sitting that started from "
                             f"{sitting['init_from'] or 'scratch'}, not {source or 'scratch'}; resume it with the "
                             "same --init-from, or give a fresh --workdir")
        return int(sitting["prior_unet_steps"])
    prior = 0
    record = os.path.join(init_from, TRAINING_RECORD) if init_from else None
    if record and os.path.exists(record):
        with open(record) as f:
            prior = int(json.load(f)["unet_steps"])
    save_json(path, {"init_from": source, "prior_unet_steps": prior})
    return prior


def check_workdir_recipe(workdir: str, scene_sizes: str = "words") -> None:
    """Records the recipe in a new workdir; a workdir another recipe made is an error (its checkpoints
    would not restore into this recipe's trees, and its latents would be another VAE's)."""
    path = os.path.join(workdir, "recipe.json")
    want = json.loads(json.dumps(recipe(scene_sizes)))
    if os.path.exists(path):
        with open(path) as f:
            got = json.load(f)
        odd = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        if odd:
            raise ConfigError(f"--workdir {workdir} was made by another recipe ({', '.join(odd)} differ); "
                             "give a fresh --workdir (or --init-from an exported folder of this recipe)")
    elif any(os.path.exists(os.path.join(workdir, n)) for n in ("vae.safetensors", "ckpt_unet")):
        return  # made before workdirs recorded their recipe: nothing to compare against
    else:
        save_json(path, want)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="data, checkpoints and caches (resumable)")
    p.add_argument("--out", default="examples/demo_model")
    # Each recipe flag is the same as --set of its key; defaults from RECIPE.
    p.add_argument("--scenes", type=int)
    p.add_argument("--vae-steps", type=int)
    p.add_argument("--vae-batch", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--single-object-fraction", type=float, metavar="F",
                   help="share of each UNet batch drawn from the single-object scenes alone, the rest from all scenes "
                        "(default 0: all from all scenes, of which 35%% hold one object); a one-object caption "
                        "binds its shape word to one shape without ambiguity")
    p.add_argument("--multi-object-fraction", type=float, metavar="F",
                   help=f"share of each UNet batch drawn from the scenes of {CROWDED} or more objects alone "
                        "(default 0; 35%% of all scenes hold that many), where a model learns to draw every object "
                        "a crowded caption names")
    p.add_argument("--scene-sizes", choices=world.SCENE_SIZES,
                   help="object sides of the rendered scenes: 'words' (default), the two size words' ranges "
                        "(small 13-17 px, big 23-29 px at 64 px); 'continuous', uniform over 11-32 px, the span of "
                        "the layouts' boxes, each named by the nearer size word")
    p.add_argument("--weighting", choices=sorted(LOSS_WEIGHTS),
                   help="per-timestep loss weight of the UNet stage")
    p.add_argument("--timestep-power", type=float, metavar="K",
                   help="draw UNet training timesteps with density proportional to (t/T)^K (default 0: uniform); "
                        "K > 0 trains more on the high-noise steps, where a sample's layout and shapes are decided")
    p.add_argument("--grounding-weight", type=float, metavar="W",
                   help="add W times a token grounding loss (each shape, colour and pattern word's cross-attention "
                        "on its objects, from the renderer's masks; default 0: none)")
    p.add_argument("--grounding-pixel-weight", type=float, metavar="W",
                   help="add W times a pixel grounding loss (each shape word's per-pixel cross-attention against "
                        "its objects' masks, so that the attention covers the object; default 0: none)")
    p.add_argument("--init-from", metavar="DIR",
                   help="an exported demo folder to continue from: its VAE is kept and its UNet and text encoder "
                        "(EMA weights) start the UNet stage, with a fresh optimizer (a run longer than one sitting)")
    p.add_argument("--stop-at", type=int, metavar="N",
                   help="stop the UNet stage after step N (1 <= N <= --steps) while its learning-rate schedule "
                        "still spans --steps; the export records the steps taken, and a later run in the same "
                        "workdir resumes from step N")
    p.add_argument("--export-only", action="store_true",
                   help="write --out from the latest UNet checkpoint's EMA weights without training further")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the recipe (cones_jax/configs/demo_base_model.py), type-checked")
    args = p.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        fixed = [k for k in overrides if k in ARCHITECTURE_KEYS]
        if fixed:
            raise ConfigError(f"--set {fixed[0]}: fixed when this module is imported (the model's shapes); "
                             "edit cones_jax/configs/demo_base_model.py instead")
        recipe = RECIPE.override(overrides).override({k: v for k, v in vars(args).items()
                                                      if k in RECIPE and v is not None})
    except ValueError as e:
        p.error(str(e))
    vars(args).update({k: v for k, v in recipe.items() if k in vars(args)})
    args.vae_lr = recipe.vae_lr  # no flag of its own; --set vae_lr=X sets it
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        p.error(f"--stop-at {args.stop_at} is not in [1, --steps {args.steps}]")
    if not 0.0 <= args.single_object_fraction <= 1.0:
        p.error(f"--single-object-fraction {args.single_object_fraction} is not in [0, 1]")
    if not 0.0 <= args.multi_object_fraction <= 1.0 - args.single_object_fraction:
        p.error(f"--multi-object-fraction {args.multi_object_fraction} is not in [0, 1 - --single-object-fraction "
                f"{args.single_object_fraction}]")
    if args.timestep_power < 0.0:
        p.error(f"--timestep-power {args.timestep_power} is negative; use 0 for uniform timesteps")
    for flag in ("grounding_weight", "grounding_pixel_weight"):
        if getattr(args, flag) < 0.0:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} is negative; use 0 for no grounding loss")
    return args


def vae_stage(args: argparse.Namespace, images: np.ndarray, warm_params: dict | None) -> tuple[AutoencoderKL, dict]:
    """Stage 2: the VAE and its params, trained (or kept from --init-from) once per workdir."""
    vae = vae_module()
    vae_path = os.path.join(args.workdir, "vae.safetensors")
    if warm_params is not None and not os.path.exists(vae_path):
        save_params(vae_path, warm_params["vae"])
    if not os.path.exists(vae_path):
        params = init_params(vae, *init_inputs()["vae"], seed=1)

        def vae_batches(step: int):
            # 32 px crops: the VAE is fully convolutional, and a quarter of the pixels is a quarter of the cost.
            idx = np.sort(training.batch_indices(step, args.vae_batch, len(images), seed=1))
            rng = training.data_rng(step, seed=1)
            y, x = rng.integers(0, world.IMAGE_SIZE // 2 // 4 + 1, size=2) * 4
            return {"images": np.asarray(images[idx, y:y + world.IMAGE_SIZE // 2, x:x + world.IMAGE_SIZE // 2])}

        state = train_stage("vae", args.workdir, lambda *a: vae_loss(vae, *a), params, vae_batches,
                            steps=args.vae_steps, lr=args.vae_lr, batch=args.vae_batch, ema=False)
        save_params(vae_path, state["params"])
    return vae, convert.unflatten({tuple(k.split("/")): v for k, v in load_safetensors(vae_path)[0].items()})


def cached_latents(workdir: str, vae: AutoencoderKL, vae_params: Any, images: np.ndarray,
                   warm: StableDiffusion | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Stage 2's cache: every scene's latent mean and std, and the scaling factor (--init-from's, or
    1 / the std of the means)."""
    lat_path = os.path.join(workdir, "latents.npz")
    if not os.path.exists(lat_path):
        mean, std = encode_dataset(vae, vae_params, images)
        scaling = (float(warm.vae.config.scaling_factor) if warm is not None
                   else float(1.0 / np.std(mean.astype(np.float32))))
        with atomic_output(lat_path) as f:
            np.savez(f, mean=mean, std=std, scaling=np.float32(scaling))
    lat = np.load(lat_path)
    return lat["mean"], lat["std"], float(lat["scaling"])


def unet_stage(args: argparse.Namespace, tok: ClipTokenizer, scenes: Sequence[world.Scene],
               latents: tuple[np.ndarray, np.ndarray, float], warm_params: dict | None, prior: int) -> dict:
    """Stage 3: the UNet and text encoder trained together; returns the final train state."""
    mean, std, scaling = latents
    text, unet = models(tok.vocab_size)
    if warm_params is not None:
        params = {"text_encoder": warm_params["text_encoder"], "unet": warm_params["unet"]}
        _log(f"UNet and text encoder start from {args.init_from}")
    else:
        inputs = init_inputs()
        params = {"text_encoder": init_params(text, *inputs["text_encoder"], seed=2),
                  "unet": init_params(unet, *inputs["unet"], seed=3)}
    n_params = sum(x.size for x in jax.tree.leaves(params))
    _log(f"text encoder + UNet: {n_params / 1e6:.2f}M parameters")

    singles = np.flatnonzero([len(s.things) == 1 for s in scenes])
    n_single = round(args.single_object_fraction * args.batch)
    multis = np.flatnonzero([len(s.things) >= CROWDED for s in scenes])
    n_multi = round(args.multi_object_fraction * args.batch)

    sides = cross_attention_sides(unet)
    word_ids = grounded_word_ids(tok)

    def batches(step: int):
        idx = unet_batch_indices(step, args.batch, len(mean), singles, n_single, prior, multis, n_multi)
        rng = training.data_rng(step, seed=DATA_SEED + prior)
        ids = tok.encode([training_caption(scenes[i], rng) for i in idx])
        batch = {"mean": mean[idx], "std": std[idx], "ids": ids}
        if args.grounding_weight or args.grounding_pixel_weight:
            batch.update(grounding_targets([scenes[i] for i in idx], np.asarray(ids), word_ids, sides))
        return batch

    loss_fn = make_diffusion_loss(unet, text, scaling, args.weighting, args.timestep_power, args.grounding_weight,
                                  args.grounding_pixel_weight)
    return train_stage("unet", args.workdir, loss_fn, params, batches, steps=args.steps, lr=args.lr,
                       batch=args.batch, ema=True, seed=prior, export_only=args.export_only, stop_at=args.stop_at)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    from cones_jax.tokenizer import write_clip_tokenizer

    t_start = time.time()
    tok = write_clip_tokenizer(os.path.join(args.workdir, "tokenizer"), vocabulary(), max_length=MAX_LENGTH)
    warm = warm_params = None
    try:  # all checked before any work, and --init-from before the workdir records its sitting
        if args.init_from:
            from cones_jax.pipeline import load_pipeline

            warm = load_pipeline(args.init_from)
            warm_params = warm_start(param_shapes(tok.vocab_size), warm)
        check_workdir_recipe(args.workdir, args.scene_sizes)
        prior = sitting_offset(args.workdir, args.init_from)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    images = render_dataset(os.path.join(args.workdir, "images.npy"), args.scenes, sizes=args.scene_sizes)
    scenes = [world.random_scene(i, sizes=args.scene_sizes) for i in range(args.scenes)]
    _log(f"{len(images)} scenes ready")

    vae, vae_params = vae_stage(args, images, warm_params)
    latents = cached_latents(args.workdir, vae, vae_params, images, warm)
    _log(f"latents {latents[0].shape}, scaling factor {latents[2]:.4f}")
    state = unet_stage(args, tok, scenes, latents, warm_params, prior)
    ema = jax.device_get(state["ema"])
    export(args.out, unet_params=ema["unet"], text_params=ema["text_encoder"], vae_params=vae_params,
           scaling_factor=latents[2], tokenizer_words=vocabulary(), unet_steps=prior + int(state["step"]))
    _log(f"wrote {args.out} ({(time.time() - t_start) / 60:.1f} min in this run)")
    return 0

if __name__ == "__main__":
    sys.exit(main())
