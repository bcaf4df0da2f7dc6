"""A local Stable Diffusion folder (diffusers layout) -> modules, params, tokenizer, scheduler config.

    sd = load_pipeline("/models/stable-diffusion-2-1-base", dtype=jnp.bfloat16)
    sd.unet, sd.vae, sd.text_encoder    # Flax modules
    sd.params["unet"], ...              # their params
    sd.tokenizer, sd.scheduler          # ClipTokenizer, SchedulerConfig

Nothing is downloaded; each component's target shapes come from `jax.eval_shape`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from cones_jax import weights
from cones_jax.convert import flatten
from cones_jax.fileio import CheckpointError
from cones_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer, text_encoder_rename, text_encoder_shapes
from cones_jax.models.unet import UNet2DConditionModel, UNetConfig
from cones_jax.models.vae import AutoencoderKL, VAEConfig, vae_rename
from cones_jax.schedulers import SchedulerConfig
from cones_jax.tokenizer import ClipTokenizer, load_tokenizer

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
          "fp16": jnp.float16, "float16": jnp.float16}


def parse_dtype(name_or_dtype) -> Any:
    if not isinstance(name_or_dtype, str):
        return name_or_dtype
    if name_or_dtype not in DTYPES:
        raise ValueError(f"unknown dtype {name_or_dtype!r}; use one of fp32, bf16, fp16")
    return DTYPES[name_or_dtype]


@dataclasses.dataclass
class StableDiffusion:
    folder: str
    unet: UNet2DConditionModel | None
    vae: AutoencoderKL | None
    text_encoder: CLIPTextTransformer | None
    tokenizer: ClipTokenizer | None
    scheduler: SchedulerConfig | None
    params: dict
    text_encoder_fingerprint: str = ""
    # compiled samplers of this model, filled by `cones_jax.sampling.compile_sampler`
    compiled: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def check_folder(folder: str) -> dict:
    """Returns model_index.json; one-line errors for what makes a folder unusable."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"model folder {folder!r} does not exist; pass --model a local Stable Diffusion "
                              "folder in diffusers layout")
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        if any(f.endswith((".ckpt", ".safetensors")) for f in os.listdir(folder)):
            raise CheckpointError(f"{folder} holds a single-file checkpoint, not a diffusers folder; convert it "
                                  "with diffusers (StableDiffusionPipeline.from_single_file(...).save_pretrained)")
        raise CheckpointError(f"{folder} is not a diffusers checkpoint folder (no model_index.json)")
    return weights.read_json(index)


def _component_dir(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isdir(path):
        raise CheckpointError(f"{folder} has no {name}/ component; a Stable Diffusion folder needs "
                              f"{', '.join(COMPONENTS)}")
    return path


def load_unet(component_dir: str, dtype=jnp.float32, param_dtype=None, variant=None):
    cfg = UNetConfig.from_dict(weights.read_config(component_dir))
    module = UNet2DConditionModel(cfg, dtype=dtype)
    params = weights.load_params(component_dir, module.param_shapes(), dtype=param_dtype or dtype, variant=variant,
                                 component="unet")
    return module, params


def load_vae(component_dir: str, dtype=jnp.float32, param_dtype=None, variant=None):
    cfg = VAEConfig.from_dict(weights.read_config(component_dir))
    module = AutoencoderKL(cfg, dtype=dtype)
    params = weights.load_params(component_dir, module.param_shapes(), rename=vae_rename,
                                 dtype=param_dtype or dtype, variant=variant, component="vae")
    return module, params


def load_text_encoder(component_dir: str, dtype=jnp.float32, param_dtype=jnp.float32, variant=None,
                      remat: bool = False):
    cfg = CLIPTextConfig.from_dict(weights.read_config(component_dir))
    module = CLIPTextTransformer(cfg, dtype=dtype, remat=remat)
    params = weights.load_params(component_dir, text_encoder_shapes(module), rename=text_encoder_rename,
                                 dtype=param_dtype, variant=variant, component="text_encoder")
    return module, params


def fingerprint_params(tree) -> str:
    """A short stable identity of a params tree, to tie artifacts to a base model.

    Hashes every path and shape, and the values of the small tensors (norms, biases, position
    embeddings): enough to tell models apart without hashing gigabytes.
    """
    h = hashlib.sha256()
    for path, leaf in sorted(flatten(tree).items()):
        h.update("/".join(path).encode() + str(tuple(leaf.shape)).encode())
        if leaf.size <= 1 << 20:
            h.update(np.asarray(leaf, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def load_pipeline(folder: str, dtype="fp32", *, param_dtype=None, variant: str | None = None,
                  components: tuple[str, ...] = COMPONENTS) -> StableDiffusion:
    """Loads the named components of a diffusers Stable Diffusion folder.

    `dtype` is the computation dtype of UNet and VAE and, unless `param_dtype` says otherwise,
    their parameter dtype; the text encoder keeps fp32 parameters (it is what Cones 2 trains).
    """
    dtype = parse_dtype(dtype)
    param_dtype = parse_dtype(param_dtype) if param_dtype is not None else None
    check_folder(folder)
    for name in components:
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; choose from {COMPONENTS}")
    params: dict = {}
    unet = vae = text = tok = sched = None
    fingerprint = ""
    if "unet" in components:
        unet, params["unet"] = load_unet(_component_dir(folder, "unet"), dtype, param_dtype, variant)
    if "vae" in components:
        vae, params["vae"] = load_vae(_component_dir(folder, "vae"), dtype, param_dtype, variant)
    if "text_encoder" in components:
        text, params["text_encoder"] = load_text_encoder(_component_dir(folder, "text_encoder"), dtype,
                                                         variant=variant)
        fingerprint = fingerprint_params(params["text_encoder"])
    if "tokenizer" in components:
        tok = load_tokenizer(_component_dir(folder, "tokenizer"))
    if "scheduler" in components:
        sched_dir = _component_dir(folder, "scheduler")
        path = os.path.join(sched_dir, "scheduler_config.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"{sched_dir}: no scheduler_config.json")
        sched = SchedulerConfig.from_json(path)
    if unet is not None and text is not None and unet.config.cross_attention_dim != text.config.hidden_size:
        raise CheckpointError(f"{folder}: the UNet expects {unet.config.cross_attention_dim}-d text embeddings but "
                              f"the text encoder makes {text.config.hidden_size}-d ones")
    return StableDiffusion(folder, unet, vae, text, tok, sched, params, fingerprint)
