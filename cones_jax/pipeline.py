"""A local Stable Diffusion folder (diffusers layout) -> modules, params, tokenizer, scheduler config.

    sd = load_pipeline("/models/stable-diffusion-2-1-base", dtype=jnp.bfloat16)
    sd.unet, sd.vae, sd.text_encoder    # Flax modules
    sd.params["unet"], ...              # their params
    sd.tokenizer, sd.scheduler          # ClipTokenizer, SchedulerConfig
    sd.unet_fingerprint                 # identity of the UNet as stored, whatever `dtype`

Nothing is downloaded; each component's target shapes come from `jax.eval_shape`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, TypeVar

import jax.numpy as jnp
from jax.typing import DTypeLike

from cones_jax import weights
from cones_jax.convert import Fingerprint, flatten
from cones_jax.errors import ConfigError
from cones_jax.fileio import CheckpointError
from cones_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer, text_encoder_rename, text_encoder_shapes
from cones_jax.models.unet import UNet2DConditionModel, UNetConfig
from cones_jax.models.vae import AutoencoderKL, VAEConfig, vae_rename
from cones_jax.schedulers import SchedulerConfig
from cones_jax.tokenizer import ClipTokenizer, load_tokenizer

_ConfigT = TypeVar("_ConfigT", UNetConfig, VAEConfig, CLIPTextConfig)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
          "fp16": jnp.float16, "float16": jnp.float16}


def parse_dtype(name_or_dtype: str | DTypeLike) -> Any:
    if not isinstance(name_or_dtype, str):
        return name_or_dtype
    if name_or_dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {name_or_dtype!r}; use one of fp32, bf16, fp16")
    return DTYPES[name_or_dtype]


@dataclasses.dataclass
class StableDiffusion:
    """A loaded folder's modules and params. The fingerprints (`convert.Fingerprint`) tie artifacts to
    the base model: residuals to the text encoder, concept neurons to the UNet; they are computed from
    the weights as stored, so a model loaded in bf16 has the fingerprints of the same model in fp32
    ("" for a component not loaded)."""

    folder: str
    unet: UNet2DConditionModel | None
    vae: AutoencoderKL | None
    text_encoder: CLIPTextTransformer | None
    tokenizer: ClipTokenizer | None
    scheduler: SchedulerConfig | None
    params: dict
    text_encoder_fingerprint: str = ""
    unet_fingerprint: str = ""
    # compiled samplers of this model, filled by `cones_jax.sampling.compile_sampler`
    compiled: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def size_multiple(vae_config: VAEConfig, unet_config: UNetConfig) -> int:
    """Image sides must be multiples of this: the VAE's downsampling times the UNet's (each level
    after the first halves the latents)."""
    return 2 ** (len(vae_config.block_out_channels) - 1 + len(unet_config.block_out_channels) - 1)


def check_folder(folder: str) -> dict:
    """Returns model_index.json; one-line errors for what makes a folder unusable."""
    if os.path.isfile(folder):
        raise CheckpointError(f"{folder} is a file, not a model folder; pass --model a local Stable Diffusion folder "
                              "in diffusers layout (convert a single-file checkpoint with diffusers' "
                              "StableDiffusionPipeline.from_single_file(...).save_pretrained)")
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


def component_config(cls: type[_ConfigT], component_dir: str) -> _ConfigT:
    """A component's config.json as `cls`; a value our modules do not implement is the folder's fault."""
    try:
        return cls.from_dict(weights.read_config(component_dir))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{component_dir}/config.json: {e}") from None


def load_unet(component_dir: str, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike | None = None,
              variant: str | None = None,
              fingerprint: Fingerprint | None = None) -> tuple[UNet2DConditionModel, dict]:
    """(module, params); a `fingerprint` is fed the weights as stored (`weights.load_params`)."""
    cfg = component_config(UNetConfig, component_dir)
    module = UNet2DConditionModel(cfg, dtype=dtype)
    params = weights.load_params(component_dir, module.param_shapes(), dtype=param_dtype or dtype, variant=variant,
                                 component="unet", fingerprint=fingerprint)
    return module, params


def load_vae(component_dir: str, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike | None = None,
             variant: str | None = None) -> tuple[AutoencoderKL, dict]:
    cfg = component_config(VAEConfig, component_dir)
    module = AutoencoderKL(cfg, dtype=dtype)
    params = weights.load_params(component_dir, module.param_shapes(), rename=vae_rename,
                                 dtype=param_dtype or dtype, variant=variant, component="vae")
    return module, params


def load_text_encoder(component_dir: str, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike = jnp.float32,
                      variant: str | None = None, remat: bool = False,
                      fingerprint: Fingerprint | None = None) -> tuple[CLIPTextTransformer, dict]:
    """(module, params); a `fingerprint` is fed the weights as stored (`weights.load_params`)."""
    cfg = component_config(CLIPTextConfig, component_dir)
    module = CLIPTextTransformer(cfg, dtype=dtype, remat=remat)
    params = weights.load_params(component_dir, text_encoder_shapes(module), rename=text_encoder_rename,
                                 dtype=param_dtype, variant=variant, component="text_encoder",
                                 fingerprint=fingerprint)
    return module, params


def fingerprint_params(tree: Mapping) -> str:
    """The `convert.Fingerprint` of a params tree as it is in memory, i.e. after any dtype cast; a loaded
    model's own identity is the one computed from its file (`StableDiffusion.unet_fingerprint`,
    `.text_encoder_fingerprint`), equal to this for fp32 weights stored in fp32."""
    fingerprint = Fingerprint()
    for path, leaf in sorted(flatten(tree).items()):
        fingerprint.update(path, leaf)
    return fingerprint.hexdigest()


def check_model_folder(folder: str) -> dict[str, Any]:
    """What can be known of a model folder without reading its weights, checked the way loading
    would: model_index.json, each component's folder and config, a safetensors weights file for
    each network, the scheduler config, and that the UNet takes the text encoder's width. Returns
    the configs {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}, so that
    artifacts can be checked against the model before the minutes spent loading and compiling it."""
    check_folder(folder)
    configs = {}
    for name, cls in (("unet", UNetConfig), ("vae", VAEConfig), ("text_encoder", CLIPTextConfig)):
        component = _component_dir(folder, name)
        configs[name] = component_config(cls, component)
        weights.find_weights_file(component)
    _component_dir(folder, "tokenizer")
    path = os.path.join(_component_dir(folder, "scheduler"), "scheduler_config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{os.path.dirname(path)}: no scheduler_config.json")
    if configs["unet"].cross_attention_dim != configs["text_encoder"].hidden_size:
        raise CheckpointError(f"{folder}: the UNet expects {configs['unet'].cross_attention_dim}-d text embeddings "
                              f"but the text encoder makes {configs['text_encoder'].hidden_size}-d ones")
    return configs


def load_pipeline(folder: str, dtype: str | DTypeLike = "fp32", *, param_dtype: str | DTypeLike | None = None,
                  variant: str | None = None,
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
    unet_fp = text_fp = ""
    if "unet" in components:
        fingerprint = Fingerprint()
        unet, params["unet"] = load_unet(_component_dir(folder, "unet"), dtype, param_dtype, variant, fingerprint)
        unet_fp = fingerprint.hexdigest()
    if "vae" in components:
        vae, params["vae"] = load_vae(_component_dir(folder, "vae"), dtype, param_dtype, variant)
    if "text_encoder" in components:
        fingerprint = Fingerprint()
        text, params["text_encoder"] = load_text_encoder(_component_dir(folder, "text_encoder"), dtype,
                                                         variant=variant, fingerprint=fingerprint)
        text_fp = fingerprint.hexdigest()
    if "tokenizer" in components:
        tok = load_tokenizer(_component_dir(folder, "tokenizer"))
    if "scheduler" in components:
        sched_dir = _component_dir(folder, "scheduler")
        path = os.path.join(sched_dir, "scheduler_config.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"{sched_dir}: no scheduler_config.json")
        try:
            sched = SchedulerConfig.from_json(path)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    if unet is not None and text is not None and unet.config.cross_attention_dim != text.config.hidden_size:
        raise CheckpointError(f"{folder}: the UNet expects {unet.config.cross_attention_dim}-d text embeddings but "
                              f"the text encoder makes {text.config.hidden_size}-d ones")
    return StableDiffusion(folder, unet, vae, text, tok, sched, params, text_fp, unet_fp)
