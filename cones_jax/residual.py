"""Cones 2 residual token embeddings: fine-tune the text encoder on a subject, keep Δ (Sec. 3.2).

    from cones_jax.residual import train_residual
    res = train_residual("/models/sd21", "photos/my_dog", "dog", "dog.safetensors", preset="official")

Every text-encoder parameter is trained; the UNet and VAE are frozen and live outside the optimised
pytree. Gradients reach the encoder through the UNet's cross-attention keys and values.

Presets (cones_jax/configs/cones2_train_{official,paper}.py):
  official  instance prompt = the bare word; preservation at the start token (λ1, L2 norm) and the
            end + padding tokens (λ2, Frobenius norm) of that same prompt; Δ averaged over the 27
            textual-inversion templates.
  paper     instance prompt "a photo of a {word}"; preservation = summed squared differences over every
            non-subject token of generated sentences containing the word; Δ averaged over the sentences.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from cones_jax import artifacts, subjects, training
from cones_jax.config import load_config
from cones_jax.errors import ConesError, DivergedError, ResidualError
from cones_jax.fileio import check_output_dir
from cones_jax.models.clip_text import CLIPTextTransformer
from cones_jax.models.unet import UNet2DConditionModel
from cones_jax.models.vae import scale_latents
from cones_jax.schedulers import alphas_cumprod

if TYPE_CHECKING:
    from cones_jax.tokenizer import ClipTokenizer

PRESETS = {"official": "cones2_train_official", "paper": "cones2_train_paper"}
CHECKPOINT_KIND = "cones2_residual"


# The 27 "imagenet_templates_small" prompts of textual inversion, over which the official code averages Δ.
TI_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)

# Sentence generator for the paper preset (the paper's 1,000 ChatGPT sentences were not released).
# {a} is the article fitting the word after it; {attr} an attribute, {scene} a place or situation.
SENTENCE_TEMPLATES = (
    "{a} {word} {scene}", "{a} {attr} {word} {scene}", "a photo of {a} {word} {scene}",
    "a photo of {a} {attr} {word} {scene}", "a picture of {a} {word} {scene}", "there is {a} {attr} {word} {scene}",
    "a painting of {a} {word} {scene}", "a close-up photo of {a} {attr} {word} {scene}",
    "an old photograph of {a} {word} {scene}", "a cartoon drawing of {a} {attr} {word} {scene}",
    "a watercolor of {a} {word} {scene}", "a high quality photo of {a} {attr} {word} {scene}",
    "the {word} {scene}", "my {attr} {word} {scene}", "a blurry photo of the {word} {scene}",
    "a 3d render of {a} {attr} {word} {scene}",
)
SCENES = (
    "on the beach", "in the snow", "on a city street", "in a forest", "on a wooden table", "next to a window",
    "under a tree", "in the rain", "at night", "in a living room", "on a mountain top", "in a garden",
    "by a lake", "in the desert", "on a sofa", "in a kitchen", "on the grass", "in front of the eiffel tower",
    "on a busy sidewalk", "in a field of flowers", "at sunset", "in a park", "on a boat", "inside a car",
    "on a bookshelf", "in the jungle", "on a red carpet", "in a classroom", "on a snowy road", "near a river",
    "on a rooftop", "in a museum", "in a bathroom", "on the moon", "underwater", "in a cafe",
    "in an autumn forest", "on a bed", "with a city in the background", "in a studio with soft light",
)
ATTRIBUTES = (
    "small", "big", "cute", "old", "shiny", "colorful", "wet", "happy", "sleepy", "fluffy", "dirty", "clean",
    "tiny", "beautiful", "vintage", "red", "blue", "white", "black", "golden",
)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def _article(next_word: str) -> str:
    return "an" if next_word[:1].lower() in "aeiou" else "a"


def generate_sentences(word: str, num: int, seed: int = 0) -> list[str]:
    """`num` distinct sentences containing `word` (templates × scenes × attributes), deterministic in `seed`."""
    out = set()
    for template, scene, attr in itertools.product(SENTENCE_TEMPLATES, SCENES, ATTRIBUTES):
        follows = attr if "{a} {attr}" in template else word
        out.add(template.format(a=_article(follows), attr=attr, word=word, scene=scene))
    sentences = sorted(out)
    order = np.random.default_rng(seed).permutation(len(sentences))
    return [sentences[i] for i in order[:num]]


def delta_templates(cfg: Any) -> tuple[str, ...]:
    """The templates Δ (Eq. 5) is averaged over: the config's, else textual inversion's; each
    must hold one "{}" for the word."""
    templates = tuple(cfg.get("delta_templates") or TI_TEMPLATES)
    bad = [t for t in templates if not t.count("{}") == t.count("{") == t.count("}") == 1]
    if bad:
        raise ResidualError(f"config delta_templates: {bad[0]!r} must hold exactly one {{}} (the word's place) "
                            "and no other braces")
    return templates


def read_sentences(path: str, word: str, tokenizer: ClipTokenizer) -> list[str]:
    """A user's sentence file (one per line); lines that do not contain the word are dropped with a warning."""
    if not os.path.isfile(path):
        raise ResidualError(f"sentence file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    kept = [s for s in lines if tokenizer.find_word(tokenizer.encode(s)[0], word)]
    if len(kept) < len(lines):
        warnings.warn(f"{path}: {len(lines) - len(kept)} of {len(lines)} sentences do not contain {word!r} "
                      "(as whole tokens, within the token limit) and are ignored", stacklevel=2)
    if not kept:
        raise ResidualError(f"{path}: no sentence contains the word {word!r}")
    return kept


def subject_rows(tokenizer: ClipTokenizer, ids_PxL: np.ndarray, word: str) -> np.ndarray:
    """[P, n] positions of the first occurrence of `word`'s sub-words in each encoded prompt."""
    rows = []
    for _p, row in enumerate(ids_PxL):
        found = tokenizer.find_word(row, word)
        if not found:
            raise ResidualError(f"prompt {tokenizer.decode(row)!r} does not contain {word!r} within the token limit")
        rows.append(found[0])
    return np.asarray(rows, np.int32)


def subject_mask(tokenizer: ClipTokenizer, ids_PxL: np.ndarray, word: str) -> np.ndarray:
    """[P, L] True at every position of every occurrence of `word` (the free positions of Eq. 3)."""
    mask = np.zeros(ids_PxL.shape, bool)
    for p, row in enumerate(ids_PxL):
        for occurrence in tokenizer.find_word(row, word):
            mask[p, occurrence] = True
    return mask


# --------------------------------------------------------------------------------------------
# Equations
# --------------------------------------------------------------------------------------------


def _safe_norm(x: jax.Array, axis: int | tuple[int, ...]) -> jax.Array:
    """L2 norm with gradient 0 (not NaN) at 0 — where every preservation term starts."""
    sq = jnp.sum(jnp.square(x), axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def subject_loss(unet: UNet2DConditionModel, unet_params: Any, cond_BxLxD: jax.Array, latents_BxhxwxC: jax.Array,
                 noise_BxhxwxC: jax.Array, t_B: jax.Array, alphas_cumprod_T: jax.Array,
                 prediction_type: str) -> jax.Array:
    """Cones 2, Eq. 2 (L_sub): denoising MSE of the frozen UNet conditioned on the trained encoder's output.

    Target ε or v per the scheduler's prediction type. Returns the mean over the batch of per-example
    mean squared errors.
    """
    return jnp.mean(training.denoising_errors(unet, unet_params, cond_BxLxD, latents_BxhxwxC, noise_BxhxwxC, t_B,
                                              alphas_cumprod_T, prediction_type))


def preservation_official(tuned_BxLxD: jax.Array, frozen_BxLxD: jax.Array, free_BxL: jax.Array,
                          lambda_start: float, lambda_rest: float) -> jax.Array:
    """Cones 2, Eq. 3 as the released code does it: λ1·‖E′[0]−E[0]‖₂ + λ2·‖E′[rest]−E[rest]‖_F.

    `rest` is every position after the start token except the free (subject) ones: for the bare-word
    prompt that is E[1+n:]. Norms are not squared or averaged; the sum is taken per example and then
    averaged over the batch (the released code slices the wrong axis when batch > 1).
    """
    diff_BxLxD = tuned_BxLxD - frozen_BxLxD
    start_B = _safe_norm(diff_BxLxD[:, 0], axis=-1)
    keep_BxL = jnp.logical_not(free_BxL).at[:, 0].set(False)
    rest_B = _safe_norm(diff_BxLxD * keep_BxL[..., None], axis=(1, 2))
    return jnp.mean(lambda_start * start_B + lambda_rest * rest_B)


def preservation_paper(tuned_SxLxD: jax.Array, frozen_SxLxD: jax.Array, keep_SxL: jax.Array) -> jax.Array:
    """Cones 2, Eq. 3 as the paper writes it: Σ_{p≠s} ‖E′(c)_p − E(c)_p‖₂², expectation over sentences c.

    Returns the unweighted L_reg (mean over the given sentences); Eq. 4 multiplies it by λ.
    """
    sq_SxL = jnp.sum(jnp.square(tuned_SxLxD - frozen_SxLxD), axis=-1)
    return jnp.mean(jnp.sum(sq_SxL * keep_SxL, axis=-1))


def total_loss(l_sub: jax.Array, l_reg: jax.Array, lam: float) -> jax.Array:
    """Cones 2, Eq. 4: L = L_sub + λ·L_reg (official: λ = 1, the λ1/λ2 weights sit inside L_reg)."""
    return l_sub + lam * l_reg


def residual_delta(tuned_PxLxD: jax.Array, frozen_PxLxD: jax.Array, rows_PxN: jax.Array) -> jax.Array:
    """Cones 2, Eq. 5: Δ = mean over prompts of (tuned − frozen) rows at the subject's sub-words -> [n, D]."""
    diff_PxLxD = tuned_PxLxD - frozen_PxLxD
    picked_PxNxD = jnp.take_along_axis(diff_PxLxD, rows_PxN[..., None], axis=1)
    return jnp.mean(picked_PxNxD, axis=0)


# --------------------------------------------------------------------------------------------
# Loss function for the generic train step
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What the loss closes over: modules and static constants (no parameter trees)."""

    text: CLIPTextTransformer
    unet: Any
    vae_config: Any
    alphas_cumprod_T: np.ndarray
    prediction_type: str
    reg: str                    # "official" | "paper"
    lambda_start: float = 0.0   # official λ1
    lambda_rest: float = 0.0    # official λ2
    reg_lambda: float = 1.0     # paper λ (Eq. 4)
    reg_batch: int = 1          # paper: sentences per step


def draw(spec: LossSpec, rng: jax.Array, latent_shape: tuple[int, ...], num_sentences: int | jax.Array) -> dict:
    """The step's randomness: latent sample ε, diffusion noise, timesteps in [0, T), preservation sentences."""
    k_lat, k_noise, k_t, k_reg = jax.random.split(rng, 4)
    b = latent_shape[0]
    return {"latent_eps": jax.random.normal(k_lat, latent_shape, jnp.float32),
            "noise": jax.random.normal(k_noise, latent_shape, jnp.float32),
            "t": jax.random.randint(k_t, (b,), 0, len(spec.alphas_cumprod_T)),
            "reg_idx": jax.random.randint(k_reg, (spec.reg_batch,), 0, _at_least_1(num_sentences))}


def _at_least_1(n: int | jax.Array) -> int | jax.Array:
    return max(n, 1) if isinstance(n, int) else jnp.maximum(n, 1)


def residual_loss(spec: LossSpec, params: dict, frozen: dict, batch: dict, draws: dict) -> tuple[jax.Array, dict]:
    """Eq. 4 for one batch with explicit randomness. params = {"text_encoder": ...}."""
    ac_T = jnp.asarray(spec.alphas_cumprod_T, jnp.float32)
    mean_BxhxwxC = batch["mean"]
    b = mean_BxhxwxC.shape[0]
    latents_BxhxwxC = scale_latents(spec.vae_config, mean_BxhxwxC + batch["std"] * draws["latent_eps"])
    encode = lambda ids: spec.text.apply({"params": params["text_encoder"]}, ids)["last_hidden_state"]
    ids_BxL = jnp.broadcast_to(frozen["instance_ids"], (b, frozen["instance_ids"].shape[-1]))
    cond_BxLxD = encode(ids_BxL)
    l_sub = subject_loss(spec.unet, frozen["unet"], cond_BxLxD, latents_BxhxwxC, draws["noise"], draws["t"], ac_T,
                         spec.prediction_type)
    if spec.reg == "official":
        # The preserved prompt is the instance prompt itself: its forward pass is shared with L_sub.
        target_BxLxD = jnp.broadcast_to(frozen["reg_target"], cond_BxLxD.shape)
        free_BxL = jnp.broadcast_to(frozen["reg_free"], ids_BxL.shape)
        l_reg = preservation_official(cond_BxLxD, target_BxLxD, free_BxL, spec.lambda_start, spec.lambda_rest)
        lam = 1.0
    else:
        idx_R = draws["reg_idx"]
        l_reg = preservation_paper(encode(frozen["reg_ids"][idx_R]), frozen["reg_target"][idx_R],
                                   frozen["reg_keep"][idx_R])
        lam = spec.reg_lambda
    return total_loss(l_sub, l_reg, lam), {"loss_sub": l_sub, "loss_reg": l_reg}


def make_loss_fn(spec: LossSpec) -> training.LossFn:
    """loss_fn(params, frozen, batch, rng) for `training.make_train_step`."""

    def loss_fn(params: Any, frozen: dict, batch: dict, rng: jax.Array):
        # A many-subject run pads each subject's sentences to a common count; "reg_count" is its own.
        n = frozen["reg_count"] if "reg_count" in frozen else frozen["reg_ids"].shape[0] if "reg_ids" in frozen else 1
        return residual_loss(spec, params, frozen, batch, draw(spec, rng, batch["mean"].shape, n))

    return loss_fn


# --------------------------------------------------------------------------------------------
# Text-encoder helpers
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _encoder(text: CLIPTextTransformer) -> Callable:
    """The jitted encoder of a text module, one per module: N subjects' targets share one compile."""
    return jax.jit(lambda p, ids: text.apply({"params": p}, ids)["last_hidden_state"])


def encode_prompts(text: CLIPTextTransformer, params: Any, ids_PxL: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Encoder outputs [P, L, D] in fixed-size chunks (the last one padded), so one compile serves all."""
    fn = _encoder(text)
    out = []
    for i in range(0, len(ids_PxL), chunk):
        part = ids_PxL[i:i + chunk]
        padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)]) if len(part) < chunk else part
        out.append(np.asarray(fn(params, padded))[:len(part)])
    return np.concatenate(out)


def compute_residual(text: CLIPTextTransformer, tuned_params: Any, frozen_params: Any, tokenizer: ClipTokenizer,
                     word: str,
                     prompts: Sequence[str]) -> np.ndarray:
    """Δ for `word` over `prompts` (Eq. 5), [n, D] float32."""
    ids_PxL = tokenizer.encode(list(prompts))
    rows_PxN = subject_rows(tokenizer, ids_PxL, word)
    tuned_PxLxD = encode_prompts(text, tuned_params, ids_PxL)
    frozen_PxLxD = encode_prompts(text, frozen_params, ids_PxL)
    return np.asarray(residual_delta(jnp.asarray(tuned_PxLxD), jnp.asarray(frozen_PxLxD), jnp.asarray(rows_PxN)),
                      np.float32)


# --------------------------------------------------------------------------------------------
# Setup and training
# --------------------------------------------------------------------------------------------


def load_train_config(preset: str | None = "official", config: str | None = None,
                      overrides: dict | None = None) -> dict:
    """A training config: `config` (name or path) if given, else the preset's; then non-None overrides."""
    name = config or PRESETS.get(preset)
    if name is None:
        raise ResidualError(f"unknown preset {preset!r}; use official or paper (or --config FILE)")
    return load_config(name, {k: v for k, v in (overrides or {}).items() if v is not None})


def default_train_config(model_dir: str, preset: str | None, config: str | None,
                         overrides: dict) -> tuple[dict, str | None]:
    """The config when the user may have named none: `config`, else `preset`, else the model's own
    training defaults (`training.model_training_config`: the demo model's recipe, or the official
    preset at the model's native resolution). Returns it and, in the last case, a line saying which."""
    if config or preset:
        return load_train_config(preset or "official", config, overrides), None
    name, resolution, why = training.model_training_config(model_dir, "residual")
    name = name or PRESETS["official"]
    base = {"resolution": resolution} if resolution is not None else {}
    cfg = load_train_config(None, name, {**base, **overrides})
    return cfg, f"config: {name} at {cfg['resolution']} px, from {why} (--config or --preset chooses another)"


@dataclasses.dataclass
class ResidualModel:
    """What every subject of a run shares, loaded once: the tokenizer, the trained text module and its
    original params, the frozen UNet and VAE, the noise schedule."""

    tokenizer: Any
    text: CLIPTextTransformer     # computes in fp32 whatever the frozen UNet/VAE dtype (its grads feed AdamW)
    text_params: Any              # the frozen (original) text-encoder params
    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    latent_factor: int
    alphas_cumprod_T: np.ndarray
    prediction_type: str
    fingerprint: str

    def spec(self, cfg: Any) -> LossSpec:
        """The loss's static constants for a config (its regulariser and weights)."""
        if cfg["reg"] == "official":
            kw = dict(lambda_start=cfg["lambda_start"], lambda_rest=cfg["lambda_rest"])
        elif cfg["reg"] == "paper":
            kw = dict(reg_lambda=cfg["reg_lambda"], reg_batch=cfg["reg_batch"])
        else:
            raise ResidualError(f"config reg must be 'official' or 'paper', got {cfg['reg']!r}")
        return LossSpec(text=self.text, unet=self.unet, vae_config=self.vae.config,
                        alphas_cumprod_T=self.alphas_cumprod_T, prediction_type=self.prediction_type,
                        reg=cfg["reg"], **kw)


def load_residual_model(model_dir: str, *, dtype: str = "fp32", remat: bool = False) -> ResidualModel:
    """Loads the base model once for any number of subjects."""
    from cones_jax.pipeline import load_pipeline

    sd = load_pipeline(model_dir, dtype=dtype)
    text = CLIPTextTransformer(sd.text_encoder.config, dtype=jnp.float32, remat=remat)
    # With remat, the frozen UNet's layers are recomputed in the backward pass into the encoder too:
    # its activations are most of a step's memory.
    unet = UNet2DConditionModel(sd.unet.config, dtype=sd.unet.dtype, remat=True) if remat else sd.unet
    return ResidualModel(sd.tokenizer, text, sd.params["text_encoder"], unet, sd.params["unet"], sd.vae,
                         sd.params["vae"], sd.latent_factor, alphas_cumprod(sd.scheduler).astype(np.float32),
                         sd.scheduler.prediction_type, sd.text_encoder_fingerprint)


@dataclasses.dataclass
class ResidualSetup:
    """Everything a residual run needs, before the step is compiled (usable from a notebook)."""

    cfg: Any
    spec: LossSpec
    tokenizer: Any
    word: str
    token_ids: tuple[int, ...]
    text_params: Any           # the frozen (original) text-encoder params
    fingerprint: str
    frozen: dict               # the step's frozen inputs: UNet params, prompt ids, preservation targets
    latents: training.LatentCache | None  # None where another process trains this subject
    delta_prompts: list[str]
    latent_shape: tuple[int, ...] = ()    # [h, w, C] of one training latent

    def initial_params(self) -> dict:
        # A copy: the train state is donated to the step and must not alias the frozen encoder.
        return {"text_encoder": jax.tree.map(jnp.array, self.text_params)}

    def host_batch(self, step: int) -> dict:
        if self.latents is None:  # only a batch's shape is needed (a padding slot of a many-subject run)
            zeros = np.zeros((self.cfg["batch"], *self.latent_shape), np.float32)
            return {"mean": zeros, "std": zeros}
        idx = training.batch_indices(step, self.cfg["batch"], len(self.latents), self.cfg["seed"])
        return self.latents.batch(idx, training.data_rng(step, self.cfg["seed"]))

    def loss_fn(self) -> training.LossFn:
        return make_loss_fn(self.spec)

    def subject_frozen(self) -> dict:
        """The frozen inputs that are this subject's own (everything but the shared UNet)."""
        return {k: v for k, v in self.frozen.items() if k != "unet"}


def setup_residual(model_dir: str, images_dir: str, word: str, *, cfg: Any, dtype: str = "fp32",
                   remat: bool = False, sentences: str | None = None) -> ResidualSetup:
    """Loads the model, checks the word, encodes the images once, precomputes frozen targets."""
    model = load_residual_model(model_dir, dtype=dtype, remat=remat)
    return setup_subject(model, images_dir, word, cfg=cfg, sentences=sentences)


def instance_prompt_ids(tok: ClipTokenizer, cfg: Any, word: str) -> np.ndarray:
    """The ids [1, L] of the subject's instance prompt, refused where the token limit cuts the word
    off. Needs only the tokenizer, so a many-subject run checks it before the model loads."""
    instance = cfg["instance_prompt"].format(word)
    ids = tok.encode([instance])
    if not tok.find_word(ids[0], word):
        raise ResidualError(f"instance prompt {instance!r} does not contain {word!r} within the token limit")
    return ids


def setup_subject(model: ResidualModel, images_dir: str | None, word: str, *, cfg: Any,
                  sentences: str | None = None) -> ResidualSetup:
    """One subject's part of a run on a loaded model: its token ids, instance prompt, preservation
    targets and Δ prompts, and (unless `images_dir` is None) its photos' cached latents."""
    tok, text, text_params = model.tokenizer, model.text, model.text_params
    word = word.strip()
    token_ids = tuple(tok.word_ids(word))  # raises on a word that tokenises to nothing
    factor = model.latent_factor
    crop_hw = (cfg["resolution"] // factor,) * 2
    latents = None
    if images_dir is not None:
        images = training.load_images(images_dir, cfg["resolution"], crop=cfg["crop"], multiple=factor)
        latents = training.encode_images(model.vae, model.vae_params, images, crop_hw)

    instance_ids = instance_prompt_ids(tok, cfg, word)
    spec = model.spec(cfg)
    frozen: dict = {"unet": model.unet_params, "instance_ids": jnp.asarray(instance_ids[0])}
    if cfg["reg"] == "official":
        frozen["reg_target"] = jnp.asarray(encode_prompts(text, text_params, instance_ids)[0])
        frozen["reg_free"] = jnp.asarray(subject_mask(tok, instance_ids, word)[0])
    else:
        sents = (read_sentences(sentences, word, tok) if sentences
                 else generate_sentences(word, cfg["num_sentences"], cfg["sentence_seed"]))
        reg_ids = tok.encode(sents)
        keep = ~subject_mask(tok, reg_ids, word)
        ok = ~keep.all(axis=1)  # generated sentences whose word tokenises differently in context are dropped
        if not ok.any():
            raise ResidualError(f"no preservation sentence contains {word!r} as whole tokens")
        sents = [s for s, k in zip(sents, ok) if k]
        reg_ids, keep = reg_ids[ok], keep[ok]
        frozen["reg_ids"] = jnp.asarray(reg_ids)
        frozen["reg_target"] = jnp.asarray(encode_prompts(text, text_params, reg_ids))
        frozen["reg_keep"] = jnp.asarray(keep.astype(np.float32))
    if cfg["delta_prompts"] == "templates":
        delta_prompts = [t.format(word) for t in delta_templates(cfg)]
    elif cfg["delta_prompts"] == "sentences":
        delta_prompts = sents if cfg["reg"] == "paper" else generate_sentences(
            word, cfg["num_sentences"], cfg["sentence_seed"])
    else:
        raise ResidualError(f"config delta_prompts must be 'templates' or 'sentences', got {cfg['delta_prompts']!r}")
    latent_shape = (*crop_hw, model.vae.config.latent_channels)
    return ResidualSetup(cfg, spec, tok, word, token_ids, text_params, model.fingerprint, frozen, latents,
                         delta_prompts, latent_shape)


def _check_out(out: str, overwrite: bool) -> None:
    training.check_output(out, overwrite, ".safetensors")


def train_residual(model_dir: str, images_dir: str, word: str, out: str, *, preset: str | None = None,
                   config: str | None = None, steps: int | None = None, batch: int | None = None,
                   lr: float | None = None, resolution: int | None = None, seed: int | None = None,
                   checkpoint_dir: str | None = None, checkpoint_every: int | None = None, resume: bool = False,
                   dtype: str = "fp32", remat: bool = False, sentences: str | None = None,
                   overwrite: bool = False, distributed: bool = False, progress: bool = True,
                   overrides: dict | None = None, history: list | None = None,
                   log: Callable[[str], None] | None = None) -> artifacts.Residual:
    """Trains a Cones 2 residual for `word` from the photos in `images_dir`; writes it to `out` atomically.

    With neither `preset` nor `config`, the model's own training defaults apply (`default_train_config`).
    Every input is checked before the model loads. `history`, if a list, receives each step's metrics
    (loss, loss_sub, loss_reg, grad_norm).
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    training.maybe_initialize_distributed(distributed)
    _check_out(out, overwrite)
    word = training.check_word(word)
    explicit = dict(steps=steps, batch=batch, lr=lr, resolution=resolution, seed=seed,
                    checkpoint_every=checkpoint_every)
    flags = dict(overrides or {}, **{k: v for k, v in explicit.items() if v is not None})
    cfg, chosen = default_train_config(model_dir, preset, config, flags)
    training.check_numbers(cfg)
    delta_templates(cfg)
    training.check_checkpoint_dir(checkpoint_dir, resume)
    training.check_images(images_dir, cfg["resolution"])
    if chosen:
        log(chosen)  # after the checks: a refused run prints its one error line only
    setup = setup_residual(model_dir, images_dir, word, cfg=cfg, dtype=dtype, remat=remat, sentences=sentences)

    checkpointer = None
    state = training.init_state(setup.initial_params(), training.make_optimizer(cfg), cfg["seed"])
    if checkpoint_dir:
        checkpointer = training.Checkpointer(
            checkpoint_dir, every=cfg["checkpoint_every"], keep=cfg["keep_checkpoints"],
            metadata={"kind": CHECKPOINT_KIND, "fingerprint": setup.fingerprint, "word": setup.word,
                      "preset": cfg["preset"]})
        checkpointer.refuse_unless_resuming(resume)
        if resume:
            state = checkpointer.resume_state(state, log)

    mesh = training.make_mesh(cfg["batch"])
    step_fn = training.make_train_step(setup.loss_fn(), training.make_optimizer(cfg), mesh, setup.frozen)
    state = step_fn.put_state(state)
    try:
        state, metrics = training.run_loop(step_fn, state, setup.host_batch, total_steps=cfg["steps"],
                                           checkpointer=checkpointer, progress=progress, log=log)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    if history is not None:
        history.extend(metrics)

    tuned = jax.device_get(state["params"]["text_encoder"])
    delta = compute_residual(setup.spec.text, tuned, setup.text_params, setup.tokenizer, setup.word,
                             setup.delta_prompts)
    if not np.isfinite(delta).all():
        raise DivergedError(f"Δ is not finite after {cfg['steps']} steps; nothing written; lower the learning rate; "
                            f"{training.resume_hint(checkpointer) or 'no checkpoint was saved'}")
    residual = artifacts.Residual(delta, setup.word, setup.token_ids, setup.fingerprint, cfg["preset"], out)
    _check_out(out, overwrite)  # again: the file may have appeared during a long run
    artifacts.save_residual(out, residual, extra={"steps": cfg["steps"], "batch": cfg["batch"], "lr": cfg["lr"]})
    log(f"wrote {out} (Δ of {delta.shape[0]} token(s) × {delta.shape[1]})")
    return residual


# --------------------------------------------------------------------------------------------
# Many subjects in one run
# --------------------------------------------------------------------------------------------

CHECKPOINT_KIND_MANY = "cones2_residuals"
# Config keys a subject's `overrides` may set without leaving the run's group: they change only its
# data order, initial RNG and noise, never a shape or a compiled constant. Subjects that differ in any
# other key train in separate groups, one after another, on the same loaded model.
PER_SUBJECT_KEYS = ("seed",)
_CHECKPOINT_KEYS = ("steps", "checkpoint_every", "keep_checkpoints")  # may change on resume


@dataclasses.dataclass(frozen=True)
class ManyOptions:
    """How `train_residuals` runs, besides the model and subjects (the flags of `train.py residual
    --subjects`). `overrides` apply to every subject, under each subject's own overrides."""

    preset: str | None = None
    config: str | None = None
    overrides: dict = dataclasses.field(default_factory=dict)
    checkpoint_dir: str | None = None
    resume: bool = False
    dtype: str = "fp32"
    remat: bool = False
    overwrite: bool = False
    skip_bad: bool = False
    progress: bool = True


def group_key(cfg: Any) -> str:
    """What subjects of one group share: every config value but the per-subject ones, as JSON."""
    return json.dumps({k: v for k, v in dict(cfg).items() if k not in PER_SUBJECT_KEYS}, sort_keys=True)


def _checkpoint_subdir(key: str) -> str:
    """The folder of a group's checkpoints when a subjects file makes several groups: named by the
    group's config, so a re-run finds it again whatever groups are already done."""
    stable = {k: v for k, v in json.loads(key).items() if k not in _CHECKPOINT_KEYS}
    return "group-" + hashlib.sha1(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:10]


def _subject_config(base: Any, entry: subjects.SubjectEntry) -> Any:
    cfg = base.override(entry.overrides, source="overrides")
    training.check_numbers(cfg)
    return cfg


def train_residuals(model_dir: str, subjects_path: str, out_dir: str, options: ManyOptions | None = None, *,
                    log: Callable[[str], None] | None = None) -> dict[str, artifacts.Residual]:
    """Trains a residual for every subject of `subjects_path` (`subjects.read_subjects`) in one run:
    the model loads once, one jitted step trains all subjects of a config group side by side
    (`subjects.SubjectsStep`), and each Δ is written to `out_dir/<name>.safetensors` exactly as
    `train_residual` writes it. Each subject trains exactly as `train_residual` would train it alone
    with the same config and seed.

    Before the model loads: subjects whose file exists are skipped (unless `overwrite`), and every
    other subject is checked (photos, word, overrides); a bad one refuses the run, or with `skip_bad`
    is dropped. Multi-host (after `training.maybe_initialize_distributed`): each process reads the
    photos of its own subjects only, and process 0 alone writes files and logs. Returns the written
    residuals by name (on process 0; the same Δs, unwritten, elsewhere).
    """
    options = options or ManyOptions()
    log = subjects.writer_log(log)
    check_output_dir(out_dir, "out_dir")
    entries = subjects.read_subjects(subjects_path)
    base, chosen = default_train_config(model_dir, options.preset, options.config, options.overrides)
    training.check_numbers(base)
    training.check_checkpoint_dir(options.checkpoint_dir, options.resume)
    if options.checkpoint_dir:
        # One checkpoint folder per config group, decided from the whole file so a re-run finds it.
        keys = set()
        for e in entries:
            try:
                keys.add(group_key(_subject_config(base, e)))
            except ConesError:
                pass
        several_groups = len(keys) > 1
    resuming = bool(options.resume and options.checkpoint_dir)
    pending = subjects.pending_subjects(entries, out_dir, ".safetensors", overwrite=options.overwrite, log=log,
                                        resuming=resuming)
    if not pending:
        log(f"every subject of {subjects_path} already has its file in {out_dir}; nothing to train")
        return {}
    from cones_jax.pipeline import load_pipeline

    tok = load_pipeline(model_dir, components=("tokenizer",)).tokenizer
    cfgs: dict[str, Any] = {}

    def check_one(e: subjects.SubjectEntry) -> None:
        training.check_word(e.word)
        cfg = _subject_config(base, e)
        instance_prompt_ids(tok, cfg, e.word)
        delta_templates(cfg)
        cfgs[e.name] = cfg

    def check_photos(e: subjects.SubjectEntry) -> None:
        training.check_images(e.images, cfgs[e.name]["resolution"])

    good = subjects.check_subjects(pending, check_one, skip_bad=options.skip_bad, log=log, check_photos=check_photos)
    if chosen:
        log(chosen)
    groups: dict[str, list[subjects.SubjectEntry]] = {}
    for e in good:
        groups.setdefault(group_key(cfgs[e.name]), []).append(e)
    model = load_residual_model(model_dir, dtype=options.dtype, remat=options.remat)
    out: dict[str, artifacts.Residual] = {}
    failed: list[str] = []
    for n, (key, members) in enumerate(groups.items()):
        if len(groups) > 1:
            log(f"group {n + 1} of {len(groups)}: {len(members)} subject(s) sharing one config")
        ckpt = options.checkpoint_dir
        if ckpt and several_groups:
            ckpt = os.path.join(ckpt, _checkpoint_subdir(key))
        try:
            out.update(_train_group(model, members, [cfgs[e.name] for e in members], out_dir, ckpt, options, log,
                                    failed))
        except DivergedError as e:  # every subject of the group diverged: the next group still runs
            log(f"group of {', '.join(repr(m.name) for m in members)}: {e}")
            failed.extend(m.name for m in members)
    if failed:
        raise DivergedError(f"{len(failed)} of {len(good)} subject(s) diverged and got no file "
                            f"({', '.join(map(repr, failed))}); the others are written; re-run with a lower learning "
                            "rate (`lr`, in their `overrides`) to train only those")
    return out


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    """`x` with its first axis filled up to `n` by repeating its last row (finite, and masked out)."""
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), 0)]) if len(x) < n else x


def _stack_frozen(setups: Sequence[ResidualSetup]) -> list[dict]:
    """Each subject's own frozen inputs as host arrays of one common shape: the paper preset's
    sentence sets are padded to the longest (and `reg_count` says how many are real)."""
    trees = [jax.tree.map(np.asarray, s.subject_frozen()) for s in setups]
    if "reg_ids" in trees[0]:
        most = max(len(t["reg_ids"]) for t in trees)
        for t in trees:
            t["reg_count"] = np.int32(len(t["reg_ids"]))
            for k in ("reg_ids", "reg_target", "reg_keep"):
                t[k] = _pad_rows(t[k], most)
    return trees


DELTA_CHUNK = 32  # prompts encoded at a time in the Δ computation (as `encode_prompts` does)


def _delta_inputs(setups: Sequence[ResidualSetup]) -> tuple[list[dict], list[int]]:
    """Per subject, its Δ prompts' ids [P, L], the word's positions [P, N] and a weight per prompt
    (0 for padding), padded to common P (a multiple of DELTA_CHUNK) and N; and each subject's N."""
    ids = [s.tokenizer.encode(list(s.delta_prompts)) for s in setups]
    rows = [subject_rows(s.tokenizer, i, s.word) for s, i in zip(setups, ids)]
    p = -(-max(len(i) for i in ids) // DELTA_CHUNK) * DELTA_CHUNK
    n = max(r.shape[1] for r in rows)
    out = []
    for i, r in zip(ids, rows):
        r = np.concatenate([r, np.repeat(r[:, -1:], n - r.shape[1], 1)], 1)  # extra sub-words: sliced off
        out.append({"ids": _pad_rows(i, p), "rows": _pad_rows(r, p),
                    "weight": (np.arange(p) < len(i)).astype(np.float32)})
    return out, [r.shape[1] for r in rows]


@functools.lru_cache(maxsize=8)
def _delta_fn(text: CLIPTextTransformer) -> Callable:
    """One subject's Δ (Eq. 5) from its tuned encoder: `fn(frozen_params, tuned_params, inputs)`,
    the prompts encoded DELTA_CHUNK at a time; for `SubjectsStep.map_subjects`."""

    def fn(frozen_params: Any, tuned_params: Any, inputs: dict) -> jax.Array:
        def encode(p: Any, ids: jax.Array) -> jax.Array:
            return text.apply({"params": p}, ids)["last_hidden_state"]

        def chunk(args: tuple) -> jax.Array:
            ids_KxL, rows_KxN, w_K = args
            diff_KxLxD = encode(tuned_params, ids_KxL) - encode(frozen_params, ids_KxL)
            picked_KxNxD = jnp.take_along_axis(diff_KxLxD, rows_KxN[..., None], axis=1)
            return jnp.sum(picked_KxNxD * w_K[:, None, None], axis=0)

        split = lambda x: x.reshape(-1, DELTA_CHUNK, *x.shape[1:])
        sums = jax.lax.map(chunk, (split(inputs["ids"]), split(inputs["rows"]), split(inputs["weight"])))
        return jnp.sum(sums, axis=0) / jnp.sum(inputs["weight"])

    return fn


def _train_group(model: ResidualModel, entries: Sequence[subjects.SubjectEntry], cfgs: Sequence[Any], out_dir: str,
                 checkpoint_dir: str | None, options: ManyOptions, log: Callable[[str], None],
                 failed: list[str]) -> dict[str, artifacts.Residual]:
    """One config group: all its subjects in one jitted step, then their Δs, written by process 0;
    the names of subjects that diverged go to `failed`."""
    cfg = cfgs[0]
    num = len(entries)
    mesh = subjects.make_subject_mesh(num, cfg["batch"], model=cfg["model_parallel"])
    local = set(subjects.local_subjects(mesh, num))
    setups = [setup_subject(model, e.images if i in local else None, e.word, cfg=c)
              for i, (e, c) in enumerate(zip(entries, cfgs))]
    optimizer = training.make_optimizer(cfg)
    step = subjects.SubjectsStep(make_loss_fn(model.spec(cfg)), optimizer, mesh, {"unet": model.unet_params},
                                 subjects.stack_subjects(_stack_frozen(setups), mesh), num)
    log(f"training {num} subject(s) on a {dict(mesh.shape)} mesh of {mesh.size} device(s)")
    state = step.init_states({"text_encoder": model.text_params}, optimizer, [c["seed"] for c in cfgs])
    checkpointer = None
    if checkpoint_dir:
        checkpointer = training.Checkpointer(
            checkpoint_dir, every=cfg["checkpoint_every"], keep=cfg["keep_checkpoints"],
            metadata={"kind": CHECKPOINT_KIND_MANY, "fingerprint": model.fingerprint, "preset": cfg["preset"],
                      "subjects": [e.name for e in entries], "words": [e.word for e in entries],
                      "seeds": [int(c["seed"]) for c in cfgs]})
        checkpointer.refuse_unless_resuming(options.resume)
        if options.resume:
            state = checkpointer.resume_state(state, log)
    state = step.put_state(state)
    try:
        state, _ = training.run_loop(step, state, lambda k: (lambda i: setups[i].host_batch(k)),
                                     total_steps=cfg["steps"], checkpointer=checkpointer,
                                     progress=options.progress and subjects.is_writer(), log=log)
    finally:
        if checkpointer is not None:
            checkpointer.close()

    inputs, widths = _delta_inputs(setups)
    deltas = step.map_subjects(_delta_fn(model.text), state["params"]["text_encoder"],
                               step.put_subjects(subjects.stack_subjects(inputs, mesh)), shared=model.text_params)
    # A subject stopped by a non-finite step gets no file; the others are written (and a re-run
    # without --overwrite retrains only the stopped ones).
    stopped = set(step.stopped(state)) | {i for i, d in enumerate(deltas) if not np.isfinite(d).all()}
    for i in sorted(stopped):
        log(f"subject {entries[i].name!r} diverged (its loss or weights became non-finite); nothing written for it")
        failed.append(entries[i].name)
    out = {}
    resuming = bool(options.resume and options.checkpoint_dir)
    for i, (e, c, s, d, n) in enumerate(zip(entries, cfgs, setups, deltas, widths)):
        if i in stopped:
            continue
        path = subjects.artifact_path(out_dir, e, ".safetensors")
        residual = artifacts.Residual(np.asarray(d[:n], np.float32), s.word, s.token_ids, model.fingerprint,
                                      c["preset"], path)
        if subjects.is_writer() and not subjects.keep_existing(path, overwrite=options.overwrite, resuming=resuming):
            _check_out(path, options.overwrite)  # the file may have appeared during a long run
            artifacts.save_residual(path, residual, extra={"steps": c["steps"], "batch": c["batch"], "lr": c["lr"]})
        out[e.name] = residual
    log(f"wrote {len(out)} residual(s) to {out_dir}")
    return out


def import_official(pt_path: str, word: str, out: str, *, model_dir: str, allow_pickle: bool = False,
                    overwrite: bool = False) -> artifacts.Residual:
    """Converts an official Cones-V2 `residual.pt` (a pickled bare tensor) into our safetensors format.

    Unpickles only with `allow_pickle`; the base model supplies the token ids, width and fingerprint.
    """
    from cones_jax.pipeline import load_pipeline

    _check_out(out, overwrite)
    sd = load_pipeline(model_dir, components=("text_encoder", "tokenizer"))
    word = word.strip()
    token_ids = tuple(sd.tokenizer.word_ids(word))
    dim = sd.text_encoder.config.hidden_size
    res = artifacts.load_residual(pt_path, word=word, dim=dim, allow_pickle=allow_pickle)
    delta = res.delta
    if delta.shape[0] != len(token_ids):
        if delta.shape[0] != 1:
            raise artifacts.ArtifactError(f"{pt_path} has {delta.shape[0]} rows but {word!r} has "
                                          f"{len(token_ids)} sub-word tokens")
        # The official code adds its single row at one hand-typed index: the word's first sub-word.
        delta = np.concatenate([delta, np.zeros((len(token_ids) - 1, dim), np.float32)])
    residual = artifacts.Residual(delta, word, token_ids, sd.text_encoder_fingerprint, "imported", out)
    artifacts.save_residual(out, residual, extra={"source": os.path.basename(pt_path)})
    return residual
