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
import itertools
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from cones_jax import artifacts, training
from cones_jax.config import load_config
from cones_jax.errors import DivergedError, ResidualError
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


def draw(spec: LossSpec, rng: jax.Array, latent_shape: tuple[int, ...], num_sentences: int) -> dict:
    """The step's randomness: latent sample ε, diffusion noise, timesteps in [0, T), preservation sentences."""
    k_lat, k_noise, k_t, k_reg = jax.random.split(rng, 4)
    b = latent_shape[0]
    return {"latent_eps": jax.random.normal(k_lat, latent_shape, jnp.float32),
            "noise": jax.random.normal(k_noise, latent_shape, jnp.float32),
            "t": jax.random.randint(k_t, (b,), 0, len(spec.alphas_cumprod_T)),
            "reg_idx": jax.random.randint(k_reg, (spec.reg_batch,), 0, max(num_sentences, 1))}


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
        n = frozen["reg_ids"].shape[0] if "reg_ids" in frozen else 1
        return residual_loss(spec, params, frozen, batch, draw(spec, rng, batch["mean"].shape, n))

    return loss_fn


# --------------------------------------------------------------------------------------------
# Text-encoder helpers
# --------------------------------------------------------------------------------------------


def encode_prompts(text: CLIPTextTransformer, params: Any, ids_PxL: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Encoder outputs [P, L, D] in fixed-size chunks (the last one padded), so one compile serves all."""
    fn = jax.jit(lambda p, ids: text.apply({"params": p}, ids)["last_hidden_state"])
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
class ResidualSetup:
    """Everything a residual run needs, before the step is compiled (usable from a notebook)."""

    cfg: dict
    spec: LossSpec
    tokenizer: Any
    word: str
    token_ids: tuple[int, ...]
    text_params: Any           # the frozen (original) text-encoder params
    fingerprint: str
    frozen: dict               # the step's frozen inputs: UNet params, prompt ids, preservation targets
    latents: training.LatentCache
    delta_prompts: list[str]

    def initial_params(self) -> dict:
        # A copy: the train state is donated to the step and must not alias the frozen encoder.
        return {"text_encoder": jax.tree.map(jnp.array, self.text_params)}

    def host_batch(self, step: int) -> dict:
        idx = training.batch_indices(step, self.cfg["batch"], len(self.latents), self.cfg["seed"])
        return self.latents.batch(idx, training.data_rng(step, self.cfg["seed"]))

    def loss_fn(self) -> training.LossFn:
        return make_loss_fn(self.spec)


def setup_residual(model_dir: str, images_dir: str, word: str, *, cfg: dict, dtype: str = "fp32",
                   remat: bool = False, sentences: str | None = None) -> ResidualSetup:
    """Loads the model, checks the word, encodes the images once, precomputes frozen targets."""
    from cones_jax.pipeline import load_pipeline

    sd = load_pipeline(model_dir, dtype=dtype)
    tok = sd.tokenizer
    word = word.strip()
    token_ids = tuple(tok.word_ids(word))  # raises on a word that tokenises to nothing
    # The trained encoder computes in fp32 whatever the frozen UNet/VAE dtype (its grads feed AdamW).
    text = CLIPTextTransformer(sd.text_encoder.config, dtype=jnp.float32, remat=remat)
    text_params = sd.params["text_encoder"]

    factor = sd.latent_factor
    images = training.load_images(images_dir, cfg["resolution"], crop=cfg["crop"], multiple=factor)
    crop_hw = (cfg["resolution"] // factor,) * 2
    latents = training.encode_images(sd.vae, sd.params["vae"], images, crop_hw)

    instance = cfg["instance_prompt"].format(word)
    instance_ids = tok.encode([instance])
    if not tok.find_word(instance_ids[0], word):
        raise ResidualError(f"instance prompt {instance!r} does not contain {word!r} within the token limit")
    frozen: dict = {"unet": sd.params["unet"], "instance_ids": jnp.asarray(instance_ids[0])}
    if cfg["reg"] == "official":
        frozen["reg_target"] = jnp.asarray(encode_prompts(text, text_params, instance_ids)[0])
        frozen["reg_free"] = jnp.asarray(subject_mask(tok, instance_ids, word)[0])
        spec_kw = dict(lambda_start=cfg["lambda_start"], lambda_rest=cfg["lambda_rest"])
    elif cfg["reg"] == "paper":
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
        spec_kw = dict(reg_lambda=cfg["reg_lambda"], reg_batch=cfg["reg_batch"])
    else:
        raise ResidualError(f"config reg must be 'official' or 'paper', got {cfg['reg']!r}")
    if cfg["delta_prompts"] == "templates":
        delta_prompts = [t.format(word) for t in TI_TEMPLATES]
    elif cfg["delta_prompts"] == "sentences":
        delta_prompts = sents if cfg["reg"] == "paper" else generate_sentences(
            word, cfg["num_sentences"], cfg["sentence_seed"])
    else:
        raise ResidualError(f"config delta_prompts must be 'templates' or 'sentences', got {cfg['delta_prompts']!r}")
    # With remat, the frozen UNet's layers are recomputed in the backward pass into the encoder too:
    # its activations are most of a step's memory.
    unet = UNet2DConditionModel(sd.unet.config, dtype=sd.unet.dtype, remat=True) if remat else sd.unet
    spec = LossSpec(text=text, unet=unet, vae_config=sd.vae.config,
                    alphas_cumprod_T=alphas_cumprod(sd.scheduler).astype(np.float32),
                    prediction_type=sd.scheduler.prediction_type, reg=cfg["reg"], **spec_kw)
    return ResidualSetup(cfg, spec, tok, word, token_ids, text_params, sd.text_encoder_fingerprint, frozen,
                         latents, delta_prompts)


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
