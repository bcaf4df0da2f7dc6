"""Generic training infrastructure: image folders, cached VAE latents, mesh, a pure jitted train step,
orbax checkpoints of the trainable state only, and a progress loop.

Nothing here knows about Cones 2; `cones_jax.residual` (and later the concept-neuron trainer) plug a
loss function into it:

    mesh = make_mesh(batch)
    step = make_train_step(loss_fn, optimizer, mesh, frozen)   # loss_fn(params, frozen, batch, rng)
    state = init_state(params, optimizer, seed)
    state, metrics = step(state, batch)                         # pure; `state` is donated

The train state is a plain dict {"params", "opt_state", "step", "rng"}. Frozen trees (the UNet,
precomputed targets) are an argument of the compiled step, never part of the optimised pytree, so
they are neither copied nor given optimiser slots.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import DTypeLike
from PIL import Image, ImageOps, UnidentifiedImageError

from cones_jax.errors import ConfigError, DataError, DivergedError, TrainingStopped
from cones_jax.fileio import CheckpointError, check_output_dir
from cones_jax.schedulers import add_noise, training_target

if TYPE_CHECKING:
    from cones_jax.models.unet import UNet2DConditionModel
    from cones_jax.models.vae import AutoencoderKL

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MIN_IMAGE_SIDE = 32  # px: below this a photo holds too little of the subject to learn from
DATA_AXIS = "data"


# --------------------------------------------------------------------------------------------
# Checks before work: everything that can fail before the model loads fails then
# --------------------------------------------------------------------------------------------

MODEL_TRAINING_FILE = "cones_jax_training.json"  # in a model folder: {"residual": preset, "neurons": preset}


def check_output(out: str, overwrite: bool, suffix: str, param: str = "out") -> None:
    """`out` can be written: a file name ending in `suffix`, not a folder, not an existing file unless
    `overwrite`, below a writable folder (`fileio.check_output_dir`)."""
    if os.path.isdir(out):
        raise ConfigError(f"`{param}` {out} is a folder; give a file name such as "
                          f"{os.path.join(out, 'subject' + suffix)}")
    if not out.endswith(suffix):
        raise ConfigError(f"`{param}` {out!r} must end with {suffix}")
    if os.path.lexists(out) and not overwrite:
        raise ConfigError(f"{out} exists; pass `overwrite` to replace it")
    check_output_dir(os.path.dirname(os.path.abspath(out)), param)


def check_checkpoint_dir(checkpoint_dir: str | None, resume: bool) -> None:
    if resume and not checkpoint_dir:
        raise ConfigError("`resume` needs `checkpoint_dir` (where the checkpoints are)")
    if checkpoint_dir is not None:
        check_output_dir(checkpoint_dir, "checkpoint_dir")


def check_numbers(cfg: Any, *, lr_key: str = "lr") -> None:
    """The config values training counts with: whole numbers of at least 1, a finite positive rate."""
    for key in ("steps", "batch", "checkpoint_every", "keep_checkpoints"):
        if key in cfg and cfg[key] < 1:
            raise ConfigError(f"`{key}` must be at least 1, got {cfg[key]}")
    if cfg.get("resolution") is not None and cfg["resolution"] < MIN_IMAGE_SIDE:
        raise ConfigError(f"`resolution` must be at least {MIN_IMAGE_SIDE} px, got {cfg['resolution']}")
    rate = cfg[lr_key]
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"`{lr_key}` must be a finite number above 0, got {rate}")


def check_word(word: str, param: str = "word") -> str:
    """A subject word of letters, digits and spaces: CLIP splits punctuation into tokens of its own
    (`star!` is `star` + `!`), which would be trained as part of the subject."""
    word = word.strip()
    if not word:
        raise ConfigError(f"`{param}` is empty; give the subject's category word, e.g. dog")
    odd = sorted({c for c in word if not (c.isalnum() or c == " ")})
    if odd:
        raise ConfigError(f"`{param}` {word!r} holds {' '.join(odd)!r}, which the tokenizer reads as token(s) of "
                          "their own; give the bare word, e.g. "
                          f"{''.join(c for c in word if c.isalnum() or c == ' ').strip() or 'dog'!r}")
    return word


def model_training_config(model_dir: str, kind: str) -> tuple[str | None, int | None, str]:
    """A model's own training defaults when the user names no config: (preset name or None, resolution
    or None, why, for one stderr line).

    A model folder may ship `MODEL_TRAINING_FILE` naming a preset of `cones_jax/configs` per `kind`
    ("residual", "neurons"); the bundled demo model does. Only preset names count, never a .py path:
    a downloaded model folder must not run code. Otherwise the resolution is the model's native one,
    the UNet's sample_size × the VAE's downsampling factor (2 per VAE block after the first).
    """
    path = os.path.join(model_dir, MODEL_TRAINING_FILE)
    if os.path.isfile(path):
        from cones_jax.config import preset_names

        try:
            with open(path, encoding="utf-8") as f:
                name = json.load(f).get(kind)
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"{path} is not a JSON object of preset names ({e}); fix or delete it") from None
        if name is not None and (not isinstance(name, str) or name.endswith(".py") or name not in preset_names()):
            raise ConfigError(f"{path}: {kind!r} names {name!r}, which is not a preset of cones_jax/configs")
        if name is not None:
            return name, None, f"the model's {MODEL_TRAINING_FILE}"
    try:
        with open(os.path.join(model_dir, "unet", "config.json"), encoding="utf-8") as f:
            sample_size = int(json.load(f)["sample_size"])
        with open(os.path.join(model_dir, "vae", "config.json"), encoding="utf-8") as f:
            blocks = len(json.load(f)["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None, "the preset (the model's config does not say its resolution)"
    factor = 2 ** (blocks - 1)
    return None, sample_size * factor, f"the model's UNet sample_size {sample_size} × VAE factor {factor}"


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def list_images(folder: str, *, announce: bool = True) -> list[str]:
    """Image files of a folder, sorted by name; the other files are named in one warning line (with
    `announce`)."""
    if os.path.isfile(folder):
        raise DataError(f"image folder {folder} is a file, not a folder; pass the folder that holds the photos")
    if not os.path.isdir(folder):
        raise DataError(f"image folder {folder!r} does not exist")
    paths, skipped = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue  # hidden files (.DS_Store) and sub-folders are never training data
        (paths if name.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(name)
    if not paths:
        raise DataError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                        "put 3-5 photos of the subject there")
    if skipped and announce:
        # One line for the folder: a warning per file (with its source line) buries the run's output.
        print(f"warning: skipping {len(skipped)} file(s) of {folder} that are not images: "
              f"{', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}", file=sys.stderr)
    return [os.path.join(folder, name) for name in paths]


def check_images(folder: str, resolution: int | None = None, *, announce: bool = True,
                 min_side: int = MIN_IMAGE_SIDE) -> list[str]:
    """The images of `folder`, each decoded once and at least `min_side` px on its short side, before
    any model loads; one warning line names those smaller than the training `resolution` (they are
    upscaled)."""
    paths, small = list_images(folder, announce=announce), []
    for path in paths:
        side = min(read_image(path).size)
        if side < min_side:
            raise DataError(f"image {path} is {side} px on its short side; training needs at least "
                            f"{min_side} px (use a larger photo or remove it)")
        if resolution is not None and side < resolution:
            small.append(os.path.basename(path))
    if small:
        print(f"warning: {len(small)} image(s) of {folder} are smaller than the training resolution "
              f"{resolution} px and are upscaled: {', '.join(small[:3])}{', ...' if len(small) > 3 else ''}",
              file=sys.stderr)
    return paths


def _from_16_bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) greyscale as 8-bit: PIL's own conversion clips every value above
    255, so a 16-bit PNG would turn all white."""
    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L")


def read_image(path: str) -> Image.Image:
    """An RGB image with its EXIF orientation applied (phone photos are often stored rotated)."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit greyscale PNG or TIFF
                img = _from_16_bit(img)
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                # Transparent pixels become white rather than whatever colour they happen to hold.
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {' '.join(str(e).split()) or type(e).__name__}") from None


def resize_shorter_side(img: Image.Image, resolution: int, multiple: int) -> Image.Image:
    """Resizes so the shorter side is `resolution`; the longer side is centre-trimmed to a multiple of
    `multiple` (the VAE's downsampling factor) so a latent crop maps to whole pixels."""
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((new_w, new_h), Image.BILINEAR)
    trim_w, trim_h = new_w - new_w % multiple, new_h - new_h % multiple
    left, top = (new_w - trim_w) // 2, (new_h - trim_h) // 2
    return img.crop((left, top, left + trim_w, top + trim_h))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_array(img: Image.Image) -> np.ndarray:
    """[H, W, 3] float32 in [-1, 1]."""
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def load_images(folder: str, resolution: int, *, crop: str, multiple: int) -> list[np.ndarray]:
    """Every image of `folder`, resized (shorter side = resolution) and, for crop="center", centre-cropped.

    With crop="random" the whole resized image is kept: the random crop is taken per step in latent
    space (see `LatentCache`), so each image is encoded once.
    """
    if crop not in ("random", "center"):
        raise ConfigError(f"crop must be 'random' or 'center', got {crop!r}")
    if resolution % multiple:
        raise ConfigError(f"resolution {resolution} must be a multiple of {multiple} for this VAE")
    out = []
    # The trainers check the user's photos (and warn) before loading a model; class images are the
    # model's own samples, as small as its native size.
    for path in check_images(folder, announce=False, min_side=1):
        img = resize_shorter_side(read_image(path), resolution, multiple)
        if crop == "center":
            img = center_crop(img, resolution)
        out.append(to_array(img))
    return out


# --------------------------------------------------------------------------------------------
# Latent cache
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LatentCache:
    """Per image, the VAE's latent Gaussian (unscaled mean and std, [h, w, C] each, sizes may differ).

    A training latent is `mean + std * eps`, drawn inside the step; `crop_hw` is the latent size the
    step sees.
    """

    means: list[np.ndarray]
    stds: list[np.ndarray]
    crop_hw: tuple[int, int]

    def __len__(self) -> int:
        return len(self.means)

    def batch(self, indices: Sequence[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """{"mean", "std"}: [B, h, w, C] random crops (the same window for mean and std)."""
        ch, cw = self.crop_hw
        means, stds = [], []
        for i in indices:
            h, w = self.means[i].shape[:2]
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            means.append(self.means[i][top:top + ch, left:left + cw])
            stds.append(self.stds[i][top:top + ch, left:left + cw])
        return {"mean": np.stack(means), "std": np.stack(stds)}


def encode_images(vae: AutoencoderKL, vae_params: Any, images: Sequence[np.ndarray],
                  crop_hw: tuple[int, int]) -> LatentCache:
    """Encodes each image once (one compile per distinct image size, shared by every subject of a run)."""
    encode = _vae_encoder(vae)
    means, stds = [], []
    for img_HxWx3 in images:
        mean, std = encode(vae_params, jnp.asarray(img_HxWx3)[None])
        means.append(np.asarray(mean[0], np.float32))
        stds.append(np.asarray(std[0], np.float32))
    return LatentCache(means, stds, crop_hw)


@functools.lru_cache(maxsize=4)
def _vae_encoder(vae: AutoencoderKL) -> Callable:
    return jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))


def batch_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """Images for `step`: consecutive slots of an endless sequence of per-epoch shuffles.

    A pure function of (step, seed), so a resumed run sees exactly the images it would have seen.
    """
    out = []
    for slot in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(slot, n)
        out.append(int(_epoch_order(seed, epoch, n)[pos]))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def data_rng(step: int, seed: int) -> np.random.Generator:
    """Host-side randomness (crop windows) for `step`, also a pure function of (step, seed)."""
    return np.random.default_rng([seed, 1 << 20, step])


# --------------------------------------------------------------------------------------------
# Mesh and the train step
# --------------------------------------------------------------------------------------------


def maybe_initialize_distributed(enabled: bool, coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
    """Multi-host runs call `jax.distributed.initialize()` before anything touches a device.

    Each of `coordinator` (HOST:PORT of process 0), `num_processes` and `process_id` not given is
    read from $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID, else left to jax (which
    finds all three itself on TPU VMs, Slurm and the other clusters it knows)."""
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if not enabled:
        named = [k for k, v in given.items() if v is not None]
        if named:
            raise ConfigError(f"`{named[0]}` is for multi-host runs; pass `distributed` too")
        return
    if jax.distributed.is_initialized():
        return
    env = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
           "process_id": "JAX_PROCESS_ID"}
    kw: dict[str, Any] = {}
    for key, var in env.items():
        value = given[key] if given[key] is not None else os.environ.get(var) or None
        if value is not None and key != "coordinator":
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"${var} must be a whole number, got {value!r}") from None
            if value < (1 if key == "num_processes" else 0):
                raise ConfigError(f"`{key}` must be at least {1 if key == 'num_processes' else 0}, got {value}")
        if value is not None:
            kw["coordinator_address" if key == "coordinator" else key] = value
    jax.distributed.initialize(**kw)


def make_mesh(batch: int, devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D data-parallel mesh over as many devices as evenly split the global batch.

    Batch 1 (the Cones 2 default) runs on one device; batch 8 on 8 devices shards one example each.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = max(d for d in range(1, len(devices) + 1) if batch % d == 0)
    return Mesh(np.array(devices[:n]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int, *, ema: bool = False) -> dict:
    """The train state: a plain dict of the trainable params, optimiser state, step and RNG key (and,
    with `ema`, an exponential moving average of the params)."""
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(seed)}
    if ema:
        state["ema"] = jax.tree.map(jnp.array, params)
    return state


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """EMA with the usual warm-up, decay_t = min(decay, (1 + t) / (10 + t)), so early averages are not
    dominated by the random initialisation."""
    t = step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p: e + (1.0 - d) * (p.astype(e.dtype) - e), ema, params)


LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


def denoising_errors(unet: UNet2DConditionModel, unet_params: Any, cond_BxLxD: jax.Array, latents_BxhxwxC: jax.Array,
                     noise_BxhxwxC: jax.Array, t_B: jax.Array, alphas_cumprod_T: jax.Array,
                     prediction_type: str, *, with_attention: bool = False) -> jax.Array | tuple[jax.Array, Any]:
    """Per-example mean squared error [B] of the UNet's ε or v prediction for latents noised to level t:
    the denoising loss every trainer here builds on. With `with_attention`, also the cross-attention
    probabilities of every layer (the UNet's sown "intermediates", each [B, Q, K], head-averaged)."""
    noisy_BxhxwxC = add_noise(alphas_cumprod_T, latents_BxhxwxC, noise_BxhxwxC, t_B)
    out = unet.apply({"params": unet_params}, noisy_BxhxwxC, t_B, cond_BxLxD, sow_attention=with_attention,
                     mutable=["intermediates"] if with_attention else False)
    pred_BxhxwxC, sown = out if with_attention else (out, None)
    target_BxhxwxC = training_target(prediction_type, alphas_cumprod_T, latents_BxhxwxC, noise_BxhxwxC, t_B)
    errors_B = jnp.mean(jnp.square(pred_BxhxwxC.astype(jnp.float32) - target_BxhxwxC), axis=(1, 2, 3))
    return (errors_B, sown["intermediates"]) if with_attention else errors_B


def train_step_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                  ema_decay: float = 0.999) -> Callable[[dict, Any, dict], tuple[dict, dict]]:
    """The pure step `(state, frozen, batch) -> (state, metrics)` before jit. A state holding "ema" also
    gets its moving average updated with `ema_decay`."""

    def train_step(state: dict, frozen: Any, batch: dict) -> tuple[dict, dict]:
        # The step number is folded in here, so the randomness of step k does not depend on how the
        # run got there (a resumed run draws the same noise).
        rng = jax.random.fold_in(state["rng"], state["step"])
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], frozen, batch, rng)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # Checked on the host with the loss (`run_loop`): no non-finite state is ever checkpointed.
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "params_finite": finite, **parts}
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        if "ema" in state:
            new_state["ema"] = ema_update(state["ema"], params, state["step"], ema_decay)
        return new_state, metrics

    return train_step


class TrainStep:
    """A jitted train step with explicit shardings: state and frozen trees replicated, the batch split
    along the mesh's data axis; the state argument is donated. Call as `step(state, batch)`."""

    def __init__(self, loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh, frozen: Any,
                 ema_decay: float = 0.999) -> None:
        self.mesh = mesh
        rep = replicated(mesh)
        self.frozen = jax.device_put(frozen, rep)
        self._jitted = jax.jit(train_step_fn(loss_fn, optimizer, ema_decay),
                               in_shardings=(rep, rep, data_sharded(mesh)),
                               out_shardings=(rep, rep), donate_argnums=0)
        self._compiled = None
        self.compile_seconds = 0.0

    def put_state(self, state: dict) -> dict:
        return jax.device_put(state, replicated(self.mesh))

    def put_batch(self, batch: dict) -> dict:
        sharding = data_sharded(self.mesh)
        if jax.process_count() == 1:
            return jax.device_put(batch, sharding)
        # Multi-host: every process builds the same global batch (it is a pure function of the step)
        # and hands each of its devices that device's slice.
        return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), batch)

    def compile(self, state: dict, batch: dict) -> None:
        """Ahead-of-time compile (timed apart from training)."""
        t0 = time.perf_counter()
        self._compiled = self._jitted.lower(state, self.frozen, batch).compile()
        self.compile_seconds = time.perf_counter() - t0

    def memory_gib(self) -> dict[str, float] | None:
        """The compiled step's buffers per device, in GiB, as XLA planned them: arguments (state,
        frozen models, batch), outputs, and temporaries (activations kept for the backward pass,
        gradients); None where the backend does not say."""
        return step_memory_gib(self._compiled) if self._compiled is not None else None

    def flops(self) -> float | None:
        """FLOPs of one compiled step per device, as XLA counts them (`step_flops`); None before the
        step is compiled or where the backend does not say."""
        return step_flops(self._compiled) if self._compiled is not None else None

    def __call__(self, state: dict, batch: dict) -> tuple[dict, dict]:
        if self._compiled is None:
            self.compile(state, batch)
        return self._compiled(state, self.frozen, batch)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh, frozen: Any,
                    ema_decay: float = 0.999) -> TrainStep:
    return TrainStep(loss_fn, optimizer, mesh, frozen, ema_decay)


def make_optimizer(cfg: dict) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW at a constant learning rate (config keys lr, adam_*, weight_decay,
    max_grad_norm)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg["max_grad_norm"]),
        optax.adamw(optax.constant_schedule(cfg["lr"]), b1=cfg["adam_beta1"], b2=cfg["adam_beta2"],
                    eps=cfg["adam_eps"], weight_decay=cfg["weight_decay"]))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


class Checkpointer:
    """Orbax checkpoints of the train state only (trainable params, optimiser state, step, RNG) plus
    JSON metadata naming the base model; a checkpoint of another base model is refused."""

    def __init__(self, directory: str, *, every: int, keep: int, metadata: dict) -> None:
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.metadata = dict(metadata)
        if every < 1:
            raise ConfigError(f"checkpoint_every must be at least 1, got {every}")
        self.every = int(every)
        # Which steps are saved is decided here (`due`): orbax's own interval also saves the
        # first step it sees.
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict) -> bool:
        ocp = self._ocp
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(self.metadata)), force=True)

    def due(self, step: int, *, final: bool = False) -> bool:
        """Whether the state after `step` steps is saved: every `every` steps and at the last step."""
        return step % self.every == 0 or final

    def check_metadata(self, step: int) -> None:
        """Refuses a checkpoint of another base model, task or subject: every metadata key this run
        has (fingerprint, kind, word, ...) must match. An unreadable metadata item raises whatever
        orbax raises; `resume_state` skips that step."""
        meta = self.manager.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict):
            raise ValueError(f"metadata of step {step} is not a JSON object")
        for key, want in self.metadata.items():
            if meta.get(key) != want:
                raise CheckpointError(
                    f"checkpoint {self.directory} (step {step}) has {key} {meta.get(key)!r} but this run has "
                    f"{want!r}: it belongs to another base model, task or subject; use another "
                    "--checkpoint-dir or drop --resume")

    def restore(self, state_like: dict, step: int | None = None) -> dict | None:
        """The state at `step` (default: the latest), laid out like `state_like`; None if there is none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        self.check_metadata(step)
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]

    def refuse_unless_resuming(self, resume: bool) -> None:
        """A fresh run must not mix its checkpoints with an older run's."""
        latest = self.latest_step()
        if latest is not None and not resume:
            raise CheckpointError(f"{self.directory} already holds checkpoints (latest step {latest}); pass "
                                  "--resume to continue from it or choose another --checkpoint-dir")

    def resume_state(self, state: dict, log: Callable[[str], None]) -> dict:
        """The newest checkpointed state that restores, or `state` itself when none does.

        A step that fails to restore (a truncated array file, a missing item or metadata: a run killed
        while writing) is skipped with one warning line and moved aside to `damaged-step-N`, so that
        this run can save that step again; the step before it is tried next. A checkpoint of another
        model or subject is refused (`CheckpointError`), not skipped: it is not this run's.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.restore(state, step)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged step
                log(f"warning: skipping checkpoint step {step} in {self.directory}: it does not restore "
                    f"({type(e).__name__}: {' '.join(str(e).split())[:120]}); trying the one before")
                self._set_aside(step)
                continue
            log(f"resumed from step {int(restored['step'])} in {self.directory}")
            return restored
        log(f"no usable checkpoint in {self.directory}; starting from step 0")
        return state

    def _set_aside(self, step: int) -> None:
        damaged = os.path.join(self.directory, f"damaged-step-{step}")
        if os.path.exists(damaged):
            shutil.rmtree(damaged)
        os.replace(os.path.join(self.directory, str(step)), damaged)
        self.manager.reload()  # the manager caches its list of steps

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------

# Dense peak TFLOP/s of one device (no sparsity), by `jax.Device.device_kind` (a regex, the first match
# wins, so the PCIe H100 comes before the SXM one) and matmul arithmetic: bf16 (fp16 is as fast on all
# of these), "fast" fp32 (what JAX's default precision gives fp32 inputs: TF32 tensor cores on NVIDIA,
# one bf16 pass on TPU) and strict fp32 (precision "highest": CUDA cores on NVIDIA; a TPU's six bf16
# passes have no published figure).
PEAK_TFLOPS: tuple[tuple[str, float, float, float | None], ...] = (
    # (device_kind, bf16, fp32 fast, fp32 strict)
    # NVIDIA H100 datasheet, PCIe: BF16 1,513 and TF32 756 with sparsity, halved; FP32 51
    (r"H100 PCIe", 756.0, 378.0, 51.0),
    # NVIDIA H100 datasheet, SXM: BF16 1,979 and TF32 989 with sparsity, halved; FP32 67
    (r"H100", 989.0, 494.5, 67.0),
    (r"H200", 989.0, 494.5, 67.0),          # NVIDIA H200 datasheet (SXM): the H100 SXM's compute figures
    (r"A100", 312.0, 156.0, 19.5),          # NVIDIA A100 datasheet: BF16 312, TF32 156 dense; FP32 19.5
    (r"^TPU v4$", 275.0, 275.0, None),      # Cloud TPU docs, system architecture, TPU v4: 275 bf16 per chip
    (r"^TPU v5( lite|e)$", 197.0, 197.0, None),  # Cloud TPU docs, TPU v5e: 197 bf16 per chip
    (r"^TPU v5p?$", 459.0, 459.0, None),    # Cloud TPU docs, TPU v5p: 459 bf16 per chip
    (r"^TPU v6( lite|e)$", 918.0, 918.0, None),  # Cloud TPU docs, TPU v6e (Trillium): 918 bf16 per chip
)
# `jax_default_matmul_precision` values (lowercased) under which fp32 matmuls run at the "fast" and at
# the strict rate; the others mean different arithmetic on GPU and TPU ("tensorfloat32" is three bf16
# passes on a TPU) and have no peak here.
_FAST_FP32 = (None, "default", "fastest")
_STRICT_FP32 = ("highest", "float32", "f32_f32_f32")


def peak_tflops(device_kind: str, dtype: DTypeLike, matmul_precision: str | None = None) -> float | None:
    """Dense peak TFLOP/s of one `device_kind` device for matmuls in `dtype` (under `matmul_precision`,
    jax's default matmul precision, for fp32) from `PEAK_TFLOPS`; None for a device, dtype or
    precision without a figure (a CPU, say)."""
    dtype = jnp.dtype(dtype)
    for pattern, bf16, fp32_fast, fp32_strict in PEAK_TFLOPS:
        if not re.search(pattern, device_kind, re.IGNORECASE):
            continue
        if dtype in (jnp.bfloat16, jnp.float16):
            return bf16
        precision = matmul_precision.lower() if isinstance(matmul_precision, str) else matmul_precision
        if dtype == jnp.float32 and precision in _FAST_FP32:
            return fp32_fast
        if dtype == jnp.float32 and precision in _STRICT_FP32:
            return fp32_strict
        return None
    return None


def matmul_dtype(*trees: Any) -> Any:
    """The floating dtype holding most parameters of `trees`: the frozen UNet's in every trainer here,
    whose matmuls are most of a step's FLOPs, so it picks the peak that MFU is measured against."""
    counts: dict[Any, int] = {}
    for leaf in jax.tree.leaves(trees):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            counts[jnp.dtype(leaf.dtype)] = counts.get(jnp.dtype(leaf.dtype), 0) + int(np.prod(leaf.shape))
    return max(counts, key=counts.get) if counts else jnp.dtype(jnp.float32)


def step_memory_gib(compiled: jax.stages.Compiled) -> dict[str, float] | None:
    """A compiled step's buffers per device in GiB, as XLA planned them (argument, output, temp);
    None where the backend does not say."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return {k: getattr(analysis, f"{k}_size_in_bytes") / 2**30 for k in ("argument", "output", "temp")}


def step_flops(compiled: jax.stages.Compiled) -> float | None:
    """FLOPs of one run of a compiled executable on one device, from XLA's `cost_analysis()`; None where
    the backend does not count them.

    For an SPMD executable XLA counts the per-device program (a matmul split over 8 devices reports an
    eighth of its FLOPs; tests/test_training.py checks it), so this is already per device and needs no
    division by the mesh size. Rematerialised forward passes count too: MFU from it is what the hardware
    did, not what the model needs. jax returns a dict, or in older versions a list of one dict per HLO
    module; the modules' FLOPs add up.
    """
    analysis = compiled.cost_analysis()
    if analysis is None:
        return None
    parts = [analysis] if isinstance(analysis, dict) else list(analysis)
    flops = [float(p["flops"]) for p in parts if p and p.get("flops") is not None]
    return sum(flops) if flops else None


def throughput(flops_per_step: float | None, steps: int, seconds: float,
               peak: float | None) -> tuple[float | None, float | None]:
    """(TFLOP/s per device, MFU as a fraction of the `peak` TFLOP/s) of `steps` steps in `seconds`;
    None for what the inputs leave unknown."""
    if flops_per_step is None or seconds <= 0:
        return None, None
    tflops = flops_per_step * steps / seconds / 1e12
    return tflops, (tflops / peak if peak else None)


def throughput_fields(tflops: float | None, mfu: float | None) -> dict[str, str]:
    """What the bar and the closing log line show of `throughput`: each figure only when known."""
    fields = {}
    if tflops is not None:
        fields["TFLOP/s"] = f"{tflops:.3g}"
    if mfu is not None:
        fields["MFU"] = f"{100 * mfu:.1f}%"
    return fields


# --------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------


def progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows of a step's metrics: the loss first, then each of its parts (the
    loss alone hides which term moves when a recipe adds one); not the gradient norm."""
    keys = ["loss"] + [k for k in metrics if k not in ("loss", "grad_norm")]
    return {k: f"{metrics[k]:.4f}" for k in keys}


class StopSignals:
    """SIGINT and SIGTERM during a training loop: remembered, then acted on between two steps, so a
    checkpoint is never cut in half. A second signal stops at once (KeyboardInterrupt)."""

    NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.NAMES}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stopped(self, steps_done: int, total_steps: int, checkpointer: Checkpointer | None) -> TrainingStopped:
        """The error that ends the run: what stopped it and where it resumes (exit 128 + signal)."""
        where = (f"step {steps_done} is saved in {checkpointer.directory}; continue with `resume`"
                 if checkpointer is not None else "nothing was saved (pass `checkpoint_dir` to make a run resumable)")
        return TrainingStopped(f"stopped by {self.NAMES[self.signum]} after step {steps_done} of {total_steps}; "
                               f"{where}", exit_code=128 + int(self.signum))


def resume_hint(checkpointer: Checkpointer | None) -> str:
    """Where a diverged run can go back to: its newest checkpoint (all saved states are finite);
    "" without checkpoints."""
    if checkpointer is None:
        return ""
    checkpointer.manager.wait_until_finished()
    latest = checkpointer.latest_step()
    if latest is None:
        return f"no checkpoint was saved in {checkpointer.directory}"
    return f"the last good checkpoint is step {latest} in {checkpointer.directory} (continue with `resume`)"


def run_loop(step_fn: TrainStep, state: dict, batches: Callable[[int], dict], *, total_steps: int,
             checkpointer: Checkpointer | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> tuple[dict, list[dict]]:
    """Runs `step_fn` from `state["step"]` to `total_steps`; `batches(step)` gives the host batch.

    SIGINT / SIGTERM stop the loop after the current step: its state is checkpointed (with a
    `checkpointer`) and `TrainingStopped` says where to resume. A non-finite loss or parameter raises
    `DivergedError` naming the newest checkpoint, none of which holds a non-finite value.
    See `_loop` for the rest.
    """
    with StopSignals() as stop:
        try:
            return _loop(step_fn, state, batches, total_steps, checkpointer, progress, log, stop)
        except DivergedError as e:
            hint = resume_hint(checkpointer)
            raise DivergedError(f"{e}; {hint}" if hint else str(e)) from None


def _loop(step_fn: TrainStep, state: dict, batches: Callable[[int], dict], total_steps: int,
          checkpointer: Checkpointer | None, progress: bool, log: Callable[[str], None] | None,
          stop: StopSignals) -> tuple[dict, list[dict]]:
    """Runs `step_fn` from `state["step"]` to `total_steps`; `batches(step)` gives the host batch.

    Prints compile time apart from the steps; a tqdm bar shows the loss, its parts, steps/s, TFLOP/s
    per device and MFU (where the device's peak is known). Returns the final state and the per-step
    metrics (as Python floats).

    The host never waits for a step before queueing the next: step k's metrics are read once step k+1
    is launched, so a non-finite loss raises FloatingPointError one step late (naming its step). A step
    whose state is checkpointed is the exception: saving copies the state to the host, which waits for
    the step anyway, and its loss is checked first so that no non-finite state is saved.
    """
    from tqdm import tqdm

    log = log or (lambda s: print(s, file=sys.stderr))
    start = int(state["step"])
    history: list[dict] = []
    if start >= total_steps:
        return state, history
    first = step_fn.put_batch(batches(start))
    if step_fn._compiled is None:
        step_fn.compile(state, first)
        log(f"compiled the train step in {step_fn.compile_seconds:.1f} s")
    flops = step_fn.flops()
    peak = peak_tflops(jax.devices()[0].device_kind, matmul_dtype(step_fn.frozen, state["params"]),
                       jax.config.jax_default_matmul_precision)
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=not progress,
               unit="step", dynamic_ncols=True, file=sys.stderr)

    def record(step: int, metrics: dict) -> None:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(values["loss"]):
            raise DivergedError(f"loss became {values['loss']} at step {step}; lower the learning rate")
        if not values.pop("params_finite", 1.0):
            raise DivergedError(f"the parameters became non-finite at step {step}; lower the learning rate")
        history.append(values)
        rates = throughput_fields(*throughput(flops, len(history), time.perf_counter() - t0, peak))
        bar.set_postfix({**progress_fields(values), **rates}, refresh=False)

    pending = None  # (step, its metrics still on the device): the step launched last
    t0 = time.perf_counter()
    for step in bar:
        batch = first if step == start else step_fn.put_batch(batches(step))
        # `state` is donated to the step: the loop keeps no other reference to it.
        state, metrics = step_fn(state, batch)
        if pending is not None:
            record(*pending)
        pending = (step, metrics)
        stopping = stop.signum is not None
        if checkpointer is not None and (stopping or checkpointer.due(step + 1, final=step + 1 == total_steps)):
            record(*pending)
            pending = None
            checkpointer.save(step + 1, state)
        if stopping:
            if pending is not None:
                record(*pending)
            if checkpointer is not None:
                checkpointer.manager.wait_until_finished()
            bar.close()
            raise stop.stopped(step + 1, total_steps, checkpointer)
    if pending is not None:
        record(*pending)
    seconds = time.perf_counter() - t0
    steps = total_steps - start
    rates = throughput_fields(*throughput(flops, steps, seconds, peak))
    log(f"{steps} steps in {seconds:.1f} s ({steps / max(seconds, 1e-9):.2f} steps/s"
        + "".join(f", {v} {k}" for k, v in rates.items()) + ")")
    if checkpointer is not None:
        checkpointer.manager.wait_until_finished()
    return state, history
