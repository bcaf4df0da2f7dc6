"""What the benchmarks share: the base models' architectures, random-weight models of their shapes,
the Cones 2 residual training step on given models, interleaved timing, and the host and table format.

`UNET_CONFIGS`, `TEXT_CONFIGS` and `VAE_CONFIGS` are the diffusers / transformers keyword dicts of
each architecture. `random_pipeline` builds our pipeline with random weights (no torch);
`torch_models` + `torch_to_jax` build diffusers' and transformers' random init and convert it
into ours, for side-by-side runs. PyTorch is imported only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_DOWN3 = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP3 = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

# diffusers `UNet2DConditionModel(**config)` keyword dicts (the architecture keys of each model's
# unet/config.json; everything else is diffusers' default).
UNET_CONFIGS: dict[str, dict] = {
    "tiny": dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=[2, 4],
        cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True),
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=[320, 640, 1280, 1280], down_block_types=_DOWN3, up_block_types=_UP3,
        attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
        downsample_padding=1),
    "sd21-base": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=[320, 640, 1280, 1280], down_block_types=_DOWN3, up_block_types=_UP3,
        attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
        norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1),
    "sd21": dict(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=[320, 640, 1280, 1280], down_block_types=_DOWN3, up_block_types=_UP3,
        attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
        upcast_attention=True, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1),
}

# transformers `CLIPTextConfig` keyword dicts of each base model's text tower (`text_config` adds
# the context length and the start/end ids).
TEXT_CONFIGS: dict[str, dict] = {
    "tiny": dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 hidden_act="quick_gelu"),
    "sd15": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, hidden_act="quick_gelu"),
    "sd21-base": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                      num_hidden_layers=23, hidden_act="gelu"),
    "sd21": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                 num_hidden_layers=23, hidden_act="gelu"),
}
PREDICTION = {"tiny": "epsilon", "sd15": "epsilon", "sd21-base": "epsilon", "sd21": "v_prediction"}

# diffusers `AutoencoderKL(**config)` keyword dicts: SD's VAE (the same in SD 1.x and 2.x) and, for
# "tiny", a narrow one with the same four levels (8x downsampling), so image sizes mean the same.
_SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               norm_num_groups=32)
VAE_CONFIGS: dict[str, dict] = {"tiny": dict(_SD_VAE, block_out_channels=[32, 32, 32, 32]), "sd15": _SD_VAE,
                                "sd21-base": _SD_VAE, "sd21": _SD_VAE}


def text_config(name: str) -> dict:
    """TEXT_CONFIGS[name] with 77 positions and start/end ids at the top of the vocabulary, where
    CLIP's are; read alike by transformers' CLIPTextConfig and ours."""
    vocab = TEXT_CONFIGS[name]["vocab_size"]
    return dict(TEXT_CONFIGS[name], max_position_embeddings=CONTEXT_LEN, bos_token_id=vocab - 2, eos_token_id=vocab - 1)


JAX_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
CONTEXT_LEN = 77
# Pause before each timed call. On a small CPU, the worker threads of the framework that just ran
# keep spinning briefly and the other framework's OpenMP barriers then stall on them (seen as 20x
# slower torch calls on the tiny config); a short sleep lets them park.
SETTLE_S = 0.5


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def host_description() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return f"{model}, {os.cpu_count()} logical cores"


def load_avg() -> str:
    """1-minute load average: other work on the machine skews both timings (torch's more)."""
    with contextlib.suppress(OSError, AttributeError):
        return f"{os.getloadavg()[0]:.2f}"
    return "n/a"


def device_description() -> str:
    d = jax.devices()[0]
    return f"{d.platform}/{d.device_kind} x{jax.device_count()}"


def torch_dtype_for(dtype: str, torch_device: str):
    """The torch dtype used for `dtype`, and a note when it differs from what was asked."""
    import torch

    if dtype == "fp32":
        return torch.float32, ""
    if dtype == "bf16":
        return torch.bfloat16, ""
    if torch_device == "cpu":  # fp16 kernels on CPU are slow fallbacks; not a fair reference
        return torch.float32, "fp16 asked, but torch on CPU has no sensible fp16 path: torch ran fp32"
    return torch.float16, ""


def write_json(path: str | None, result: dict) -> None:
    """A benchmark's result as JSON at `path` (its `--json`), where one is given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    """A boxed text table of string cells, one column per cell of a row; `header` above a rule."""
    lines = ([list(header)] if header else []) + [list(r) for r in rows]
    widths = [max(len(r[c]) for r in lines) for c in range(len(lines[0]))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    row = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [rule] + ([row(header), rule] if header else []) + [row(r) for r in rows] + [rule]
    return "\n".join(out)


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def timed_round_times(fns: dict, rounds: int, settle_s: float = 0.0) -> dict:
    """Seconds of each of `fns` (called with no arguments, waited for) in each of `rounds`
    interleaved rounds, so that load from elsewhere on the machine hits them alike; `settle_s` of
    sleep before each call."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            if settle_s:
                time.sleep(settle_s)
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return times


def timed_rounds(fns: dict, rounds: int) -> dict:
    """Median seconds of each of `fns`, timed by `timed_round_times`."""
    return {k: float(np.median(v)) for k, v in timed_round_times(fns, rounds).items()}


# ---- random-weight models of real shapes (weights do not change speed; shapes do)


def with_dtype(sd, dtype):
    """A copy of the pipeline `sd` whose UNet and VAE compute in `dtype` with params cast to it; the
    text encoder keeps its own (what Cones 2 trains stays fp32)."""
    cast = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(dtype), tree)
    vae = None if sd.vae is None else sd.vae.clone(dtype=dtype)
    return dataclasses.replace(sd, unet=sd.unet.clone(dtype=dtype), vae=vae,
                               params=dict(sd.params, **{k: cast(sd.params[k]) for k in ("unet", "vae")
                                                         if k in sd.params}))


def random_params(shapes, seed: int = 0):
    """A params tree for `shapes` (ShapeDtypeStructs) drawn on the host, N(0, 0.02²) in every tensor:
    nothing to compile, which on a small CPU takes longer than the benchmark itself."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jax.device_put((0.02 * rng.standard_normal(s.shape, dtype=np.float32)).astype(s.dtype)), shapes)


def random_pipeline(name: str, dtype=jnp.float32, *, seed: int = 0, tokenizer=None):
    """Our UNet, VAE and text encoder of architecture `name` (UNET_CONFIGS / VAE_CONFIGS /
    TEXT_CONFIGS) with `random_params`: no torch needed. UNet and VAE compute in `dtype`."""
    from cones_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer, text_encoder_shapes
    from cones_jax.models.unet import UNet2DConditionModel, UNetConfig
    from cones_jax.models.vae import AutoencoderKL, VAEConfig
    from cones_jax.pipeline import StableDiffusion
    from cones_jax.schedulers import SchedulerConfig

    unet = UNet2DConditionModel(UNetConfig.from_dict(UNET_CONFIGS[name]))
    vae = AutoencoderKL(VAEConfig.from_dict(VAE_CONFIGS[name]))
    text = CLIPTextTransformer(CLIPTextConfig.from_dict(text_config(name)))
    params = {"unet": random_params(unet.param_shapes(), seed), "vae": random_params(vae.param_shapes(), seed + 1),
              "text_encoder": random_params(text_encoder_shapes(text), seed + 2)}
    sd = StableDiffusion("<random>", unet, vae, text, tokenizer, SchedulerConfig(), params)
    return with_dtype(sd, dtype)


def torch_models(name: str):
    """diffusers' UNet and transformers' CLIP text model of architecture `name`, their libraries'
    random init under torch seed 0 (fp32, on the CPU)."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIGS[name])
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config(name)))
    return unet, text


def torch_vae(name: str):
    """diffusers' AutoencoderKL of architecture `name`, random init under torch seed 1."""
    import diffusers
    import torch

    torch.manual_seed(1)
    return diffusers.AutoencoderKL(**VAE_CONFIGS[name])


def torch_to_jax(unet_t, text_t, vae_t=None, *, dtype=jnp.float32, remat: bool = False, tokenizer=None):
    """Our pipeline on the torch models' weights, converted tensor by tensor: UNet and VAE compute in
    and store `dtype`, the text encoder fp32; `remat` rematerialises UNet and text-encoder layers."""
    from cones_jax import convert
    from cones_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer, text_encoder_rename, text_encoder_shapes
    from cones_jax.models.unet import UNet2DConditionModel, UNetConfig
    from cones_jax.models.vae import AutoencoderKL, VAEConfig, vae_rename
    from cones_jax.pipeline import StableDiffusion
    from cones_jax.schedulers import SchedulerConfig

    def params(model, shapes, **kw):
        state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        return convert.convert_state_dict(state, shapes, put=jax.device_put, **kw)

    unet = UNet2DConditionModel(UNetConfig.from_dict(dict(unet_t.config)), dtype=dtype, remat=remat)
    text = CLIPTextTransformer(CLIPTextConfig.from_dict(text_t.config.to_dict()), remat=remat)
    tree = {"unet": params(unet_t, unet.param_shapes(), dtype=dtype, component="unet"),
            "text_encoder": params(text_t, text_encoder_shapes(text), rename=text_encoder_rename,
                                   component="text_encoder")}
    vae = None
    if vae_t is not None:
        vae = AutoencoderKL(VAEConfig.from_dict(dict(vae_t.config)), dtype=dtype)
        tree["vae"] = params(vae_t, vae.param_shapes(), rename=vae_rename, dtype=dtype, component="vae")
    return StableDiffusion("<torch>", unet, vae, text, tokenizer, SchedulerConfig(), tree)


# ---- the Cones 2 residual training step on given models


def residual_step_inputs(name: str, resolution: int, batch: int) -> dict:
    """What a residual step needs besides the models, shared by our step and the PyTorch one of
    benchmarks/train_step.py: the bare-word prompt (start, one word token, end, padding) and which
    of its tokens are free, cached latents, the noise schedule and the official training config."""
    from cones_jax.config import load_config
    from cones_jax.schedulers import SchedulerConfig, alphas_cumprod

    ptype = PREDICTION[name]
    sched = SchedulerConfig.from_dict(dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           prediction_type=ptype))
    vocab = TEXT_CONFIGS[name]["vocab_size"]
    ids_L = np.full((CONTEXT_LEN,), vocab - 1, np.int32)
    ids_L[0], ids_L[1] = vocab - 2, 5
    free_L = np.zeros((CONTEXT_LEN,), bool)
    free_L[1] = True
    lat = resolution // 8
    rng = np.random.default_rng(0)
    latents = {"mean": rng.standard_normal((batch, lat, lat, 4), dtype=np.float32),
               "std": np.full((batch, lat, lat, 4), 0.05, np.float32)}
    return dict(cfg=load_config("cones2_train_official"), ptype=ptype,
                ac=alphas_cumprod(sched).astype(np.float32), ids_L=ids_L, free_L=free_L, batch=latents)


def residual_train_step(sd, inp: dict):
    """The project's residual training step (Cones 2: L_sub with a frozen UNet + the official Eq. 3
    preservation terms; AdamW on the whole text encoder) on `sd`'s models, and its initial state.
    Returns (training.TrainStep, state); the step compiles on its first call or `compile`."""
    from cones_jax import residual, training
    from cones_jax.models.vae import VAEConfig

    cfg, text, text_params = inp["cfg"], sd.text_encoder, sd.params["text_encoder"]
    frozen_out = residual.encode_prompts(text, text_params, inp["ids_L"][None], chunk=1)[0]
    frozen = {"unet": sd.params["unet"], "instance_ids": jnp.asarray(inp["ids_L"]),
              "reg_target": jnp.asarray(frozen_out), "reg_free": jnp.asarray(inp["free_L"])}
    spec = residual.LossSpec(text=text, unet=sd.unet, vae_config=VAEConfig(), alphas_cumprod_T=inp["ac"],
                             prediction_type=inp["ptype"], reg="official", lambda_start=cfg["lambda_start"],
                             lambda_rest=cfg["lambda_rest"])
    optimizer = training.make_optimizer(cfg)
    step = training.make_train_step(residual.make_loss_fn(spec), optimizer,
                                    training.make_mesh(inp["batch"]["mean"].shape[0]), frozen)
    # A copy: the state is donated to the step and must not alias the pipeline's encoder params.
    state = step.put_state(training.init_state({"text_encoder": jax.tree.map(jnp.array, text_params)}, optimizer,
                                               seed=0))
    return step, state


class StepRunner:
    """Compiles a `training.TrainStep` ahead of time; each call runs one step on the same batch,
    carries the (donated) state in `self.state` and waits for the loss, as the training loop does."""

    def __init__(self, step, state, batch):
        self.step, self.state, self.batch = step, state, step.put_batch(batch)
        step.compile(state, self.batch)

    def __call__(self) -> float:
        self.state, metrics = self.step(self.state, self.batch)
        return float(metrics["loss"])
