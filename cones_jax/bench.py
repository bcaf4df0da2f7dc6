"""Side-by-side speed and agreement benchmark: our Flax UNet against diffusers' PyTorch UNet.

    python -m cones_jax.bench unet --config sd21-base --batch 2 --dtype fp32 --iters 3

Both networks run the SAME random weights: the diffusers model is built (seed 0) and its state
dict is converted into our params with `cones_jax.convert.convert_state_dict`. Our forward is
`jax.jit(module.apply)` compiled ahead of time (compile seconds are reported apart); the timed
calls of the two frameworks are interleaved (jax, torch, jax, torch, ...) so that load from other
processes on the machine hits both alike and the ratio stays meaningful even when the absolute
seconds are noisy.

Needs torch and diffusers (the `test` extra) unless run with `--no-torch`, in which case our
UNet gets random params of its own and no agreement check is made.

    python -m cones_jax.bench demo-step --batch 16 --iters 5

times one training step of the demo base model's UNet (and text encoder) against variants of its
config, in turn, and prints each one's median against the recipe's.

The scripts under benchmarks/ share what is here: the architectures (UNET_CONFIGS, TEXT_CONFIGS,
VAE_CONFIGS), random-weight pipelines (`random_pipeline`: no torch; `torch_models` + `torch_to_jax`:
diffusers' init converted, for side-by-side runs), the residual training step on given models
(`residual_train_step`), interleaved timing and the host/device descriptions and table format.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Optional, Sequence

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


_JAX_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
CONTEXT_LEN = 77
# Pause before each timed call. On a small CPU, the worker threads of the framework that just ran
# keep spinning briefly and the other framework's OpenMP barriers then stall on them (seen as 20x
# slower torch calls on the tiny config); a short sleep lets them park.
_SETTLE_S = 0.5

RESULT_KEYS = (
    "command", "date", "jax_version", "torch_version", "config", "batch", "latent", "dtype", "torch_dtype",
    "torch_dtype_note", "device", "host", "torch_threads", "params", "iters", "warmup", "jax_compile_s",
    "jax_times_s", "jax_median_s", "torch_times_s", "torch_median_s", "ratio_torch_over_jax", "max_abs_diff",
    "max_abs_ref", "rel_diff", "xla_flags", "load_avg")


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


def format_table(rows: Sequence[Sequence[str]], header: Optional[Sequence[str]] = None) -> str:
    """A boxed text table of string cells, one column per cell of a row; `header` above a rule."""
    lines = ([list(header)] if header else []) + [list(r) for r in rows]
    widths = [max(len(r[c]) for r in lines) for c in range(len(lines[0]))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    row = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [rule] + ([row(header), rule] if header else []) + [row(r) for r in rows] + [rule]
    return "\n".join(out)


def fmt(x: Optional[float], spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def timed_rounds(fns: dict, rounds: int) -> dict:
    """Median seconds of each of `fns` (called with no arguments, waited for), timed in interleaved
    rounds so that load from elsewhere on the machine hits them alike."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


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
    from cones_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer, text_encoder_rename, \
        text_encoder_shapes
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


def run_unet(args: argparse.Namespace, command: str) -> dict:
    from cones_jax import convert
    from cones_jax.models.unet import UNet2DConditionModel, UNetConfig

    config = dict(UNET_CONFIGS[args.config])
    latent = args.latent or config["sample_size"]
    jdtype = _JAX_DTYPES[args.dtype]
    cfg = UNetConfig.from_dict(config)
    module = UNet2DConditionModel(cfg, dtype=jdtype)
    shapes = module.param_shapes()
    if args.dtype != "fp32":  # params stored in the compute dtype, as a half-precision checkpoint would load
        shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jdtype), shapes)

    result: dict = {k: None for k in RESULT_KEYS}
    result.update(command=command, date=datetime.datetime.now().isoformat(timespec="seconds"),
                  jax_version=jax.__version__, config=args.config, batch=args.batch, latent=latent,
                  dtype=args.dtype, device=device_description(), host=host_description(), iters=args.iters,
                  warmup=args.warmup, torch_dtype_note="", xla_flags=os.environ.get("XLA_FLAGS", ""))
    load_start = load_avg()

    # ---- inputs (host numpy, shared by both frameworks)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((args.batch, latent, latent, cfg.in_channels), dtype=np.float32)
    t_np = rng.uniform(0, 1000, size=(args.batch,)).astype(np.float32)
    c_np = rng.standard_normal((args.batch, CONTEXT_LEN, cfg.cross_attention_dim), dtype=np.float32)

    # ---- weights: diffusers' random init, converted tensor by tensor into our params
    torch_model = torch_run = None
    if args.torch:
        import diffusers
        import torch

        result["torch_version"] = torch.__version__
        threads = args.threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        result["torch_threads"] = threads
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        tdtype, note = torch_dtype_for(args.dtype, torch_device)
        result["torch_dtype"] = str(tdtype).replace("torch.", "")
        result["torch_dtype_note"] = note
        if note:
            log(note)
        log(f"building diffusers UNet2DConditionModel ({args.config}, seed 0, fp32)")
        torch.manual_seed(0)
        torch_model = diffusers.UNet2DConditionModel(**config).eval()
        result["params"] = int(sum(p.numel() for p in torch_model.parameters()))
        # fp32 tensors -> zero-copy numpy views; each converted array is handed to jax at once
        state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
        log(f"converting {len(state)} tensors ({result['params'] / 1e6:.1f} M params) to Flax params")
        params = convert.convert_state_dict(state, shapes, dtype=None if args.dtype == "fp32" else jdtype,
                                            component="unet", put=jax.device_put)
        del state
        if tdtype != torch.float32:
            torch_model = torch_model.to(dtype=tdtype)
        torch_model = torch_model.to(torch_device)
        gc.collect()

        x_t = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2))).to(torch_device, tdtype)
        t_t = torch.from_numpy(t_np).to(torch_device)
        c_t = torch.from_numpy(c_np).to(torch_device, tdtype)

        def torch_run():
            with torch.inference_mode():
                out = torch_model(x_t, t_t, encoder_hidden_states=c_t, return_dict=False)[0]
                if torch_device == "cuda":
                    torch.cuda.synchronize()
            return out
    else:
        log("--no-torch: random params of our own (no agreement check)")
        params = random_params(shapes)
        result["params"] = int(sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)))

    # ---- our forward, compiled ahead of time
    x_j, t_j, c_j = jax.device_put(x_np), jax.device_put(t_np), jax.device_put(c_np)
    log(f"compiling jax forward (batch {args.batch}, latent {latent}x{latent}, {args.dtype}) on {result['device']}")
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(module.apply).lower({"params": params}, x_j, t_j, c_j).compile()
    except (ValueError, TypeError, jax.errors.JaxRuntimeError) as e:
        raise SystemExit(f"our UNet does not compile in {args.dtype} on {result['device']}: "
                         f"{str(e).splitlines()[0]}") from e
    result["jax_compile_s"] = time.perf_counter() - t0
    log(f"compiled in {result['jax_compile_s']:.1f} s")

    def jax_run():
        return compiled({"params": params}, x_j, t_j, c_j).block_until_ready()

    def timed(fn):
        time.sleep(_SETTLE_S)
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    # ---- warmup, then interleaved timed calls
    out_j = out_t = None
    for i in range(args.warmup):
        log(f"warmup {i + 1}/{args.warmup}")
        out_j = jax_run()
        if torch_run is not None:
            out_t = torch_run()
    jax_times, torch_times = [], []
    for i in range(args.iters):
        out_j, dt = timed(jax_run)
        jax_times.append(dt)
        msg = f"iter {i + 1}/{args.iters}: jax {jax_times[-1]:.3f} s"
        if torch_run is not None:
            out_t, dt = timed(torch_run)
            torch_times.append(dt)
            msg += f", torch {torch_times[-1]:.3f} s"
        log(msg)
    if out_j is None:
        out_j = jax_run()
    result["jax_times_s"] = jax_times
    result["jax_median_s"] = statistics.median(jax_times) if jax_times else None

    if torch_run is not None:
        if out_t is None:
            out_t = torch_run()
        result["torch_times_s"] = torch_times
        result["torch_median_s"] = statistics.median(torch_times) if torch_times else None
        if result["jax_median_s"] and result["torch_median_s"]:
            result["ratio_torch_over_jax"] = result["torch_median_s"] / result["jax_median_s"]
        ref = out_t.float().cpu().numpy().transpose(0, 2, 3, 1)
        ours = np.asarray(out_j, dtype=np.float32)
        result["max_abs_diff"] = float(np.max(np.abs(ours - ref)))
        result["max_abs_ref"] = float(np.max(np.abs(ref)))
        result["rel_diff"] = result["max_abs_diff"] / max(result["max_abs_ref"], 1e-30)
        log(f"agreement: max |ours - diffusers| = {result['max_abs_diff']:.3e}, "
             f"max |diffusers| = {result['max_abs_ref']:.3e}, relative {result['rel_diff']:.3e}")
        del torch_model, torch_run, out_t

    result["load_avg"] = f"{load_start} -> {load_avg()}"
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        log(f"profiling one jax forward into {args.profile} (open with TensorBoard/XProf or Perfetto)")
        with jax.profiler.trace(args.profile):
            jax_run()
    del compiled, params
    gc.collect()
    return result


def summary_table(r: dict) -> str:
    tdt = "n/a" if r["torch_dtype"] is None else r["torch_dtype"] + (" (see note)" if r["torch_dtype_note"] else "")
    rows = [
        ("config", r["config"]), ("batch", str(r["batch"])), ("latent", f"{r['latent']}x{r['latent']}"),
        ("dtype (jax / torch)", f"{r['dtype']} / {tdt}"), ("device", r["device"]), ("host", r["host"]),
        ("params", f"{r['params'] / 1e6:.1f} M"), ("torch threads", str(r["torch_threads"] or "n/a")),
        ("jax compile s", fmt(r["jax_compile_s"], ".1f")),
        ("jax median s/forward", fmt(r["jax_median_s"], ".3f")),
        ("torch median s/forward", fmt(r["torch_median_s"], ".3f")),
        ("ratio torch/jax (>1: jax faster)", fmt(r["ratio_torch_over_jax"], ".2f")),
        ("max abs diff (rel. to max|ref|)",
         "n/a" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e} ({r['rel_diff']:.2e})"),
        ("iters / warmup", f"{r['iters']} / {r['warmup']}"),
        ("host load avg (start -> end)", str(r["load_avg"])),
        ("XLA_FLAGS", r["xla_flags"] or "(none)"),
    ]
    head = [f"command: {r['command']}", f"date: {r['date']}",
            f"jax {r['jax_version']}, torch {r['torch_version'] or 'n/a'}"]
    if r["torch_dtype_note"]:
        head.append(f"note: {r['torch_dtype_note']}")
    return "\n".join(head) + "\n" + format_table(rows)


# The demo recipe beside variants: a UNet with text at every level, as Stable Diffusion puts it at
# its three finest (here also at 32², with self-attention over 1024 positions there), and the
# recipe's UNet with the token grounding loss (its attention probabilities kept for the loss).
DEMO_VARIANTS = {
    "recipe": {},
    "text at 32²": dict(unet=dict(down_block_types=["CrossAttnDownBlock2D"] * 3,
                                  up_block_types=["CrossAttnUpBlock2D"] * 3)),
    "grounding loss": dict(grounding_weight=0.05),
}


def run_demo_step(args: argparse.Namespace, command: str) -> dict:
    """Seconds per UNet training step of the demo recipe and its variants, timed in turn."""
    from cones_jax import training
    from cones_jax.demo import base_model as bm
    from cones_jax.models.unet import UNet2DConditionModel, UNetConfig
    from cones_jax.tokenizer import clip_vocabulary

    text, _ = bm.models(len(clip_vocabulary(bm.vocabulary())[0]))
    side = bm.UNET["sample_size"]
    rng = np.random.default_rng(0)
    batch = {"mean": rng.standard_normal((args.batch, side, side, 4)).astype(np.float32),
             "std": np.full((args.batch, side, side, 4), 0.01, np.float32),
             "ids": rng.integers(0, 50, (args.batch, bm.MAX_LENGTH)).astype(np.int32)}
    opt = bm.optimizer(1e-4, 10, 100)
    mesh = training.make_mesh(args.batch)
    inputs = bm.init_inputs()
    steps, states, params_n, compile_s = {}, {}, {}, {}

    def timed_step(name: str) -> float:
        t0 = time.perf_counter()
        states[name], m = steps[name](states[name], batches[name])
        jax.block_until_ready(m["loss"])
        return time.perf_counter() - t0

    # grounding targets as sparse as real captions' (a few trait words, objects on a tenth of the grid)
    grounded = dict(batch, **{f"ground_{s * s}": (rng.random((args.batch, s * s, bm.MAX_LENGTH)) < 0.01
                                                  ).astype(np.float32) for s in bm.cross_attention_sides(
                                                      UNet2DConditionModel(UNetConfig.from_dict(bm.UNET)))})
    batches = {}
    for name, change in DEMO_VARIANTS.items():
        unet = UNet2DConditionModel(UNetConfig.from_dict(dict(bm.UNET, **change.get("unet", {}))))
        params = {"text_encoder": bm.init_params(text, *inputs["text_encoder"], seed=0),
                  "unet": bm.init_params(unet, *inputs["unet"], seed=1)}
        params_n[name] = sum(x.size for x in jax.tree.leaves(params))
        weight = change.get("grounding_weight", 0.0)
        batches[name] = grounded if weight else batch
        steps[name] = training.make_train_step(bm.make_diffusion_loss(unet, text, 1.0, grounding_weight=weight),
                                               opt, mesh, frozen={})
        states[name] = steps[name].put_state(training.init_state(params, opt, seed=0, ema=True))
        compile_s[name] = timed_step(name)  # the first call compiles
    times = {name: [] for name in DEMO_VARIANTS}
    for _ in range(args.iters):
        for name in DEMO_VARIANTS:  # in turn, so load from elsewhere hits each alike
            time.sleep(_SETTLE_S)
            times[name].append(timed_step(name))
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["recipe"]
    print(f"date: {datetime.datetime.now().isoformat(timespec='minutes')}\n"
          f"host: {host_description()}; XLA_FLAGS: {os.environ.get('XLA_FLAGS') or '(none)'}; batch {args.batch}")
    print(format_table([(name, f"{params_n[name] / 1e6:.2f} M params, compile {compile_s[name]:.0f} s, "
                                f"median {med[name]:.3f} s/step, {med[name] / base:.2f}x the recipe")
                         for name in DEMO_VARIANTS]))
    return {"command": command, "batch": args.batch, "median_s": med, "times_s": times, "params": params_n}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cones_jax.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("unet", help="time our Flax UNet forward against diffusers' PyTorch one")
    u.add_argument("--config", choices=sorted(UNET_CONFIGS), default="sd21-base")
    u.add_argument("--batch", type=int, default=2)
    u.add_argument("--latent", type=int, default=None, help="latent side (default: the config's sample_size)")
    u.add_argument("--dtype", choices=sorted(_JAX_DTYPES), default="fp32")
    u.add_argument("--iters", type=int, default=3)
    u.add_argument("--warmup", type=int, default=1)
    u.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                   help="also run diffusers' PyTorch UNet on the same weights (default on)")
    u.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    u.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    u.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, record one jax forward with jax.profiler into DIR")
    d = sub.add_parser("demo-step", help="time a demo base-model UNet training step against its variants")
    d.add_argument("--batch", type=int, default=16)
    d.add_argument("--iters", type=int, default=5)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # the commands' own CPU defaults, so the figures are what a user gets without typing flags
    # (no compilation cache here: the compile time printed is a real compile)
    from cones_jax.cli import default_xla_flags

    default_xla_flags()
    if args.iters < 1 or getattr(args, "warmup", 0) < 0 or args.batch < 1:
        raise SystemExit("--iters must be >= 1, --warmup >= 0, --batch >= 1")
    command = shlex.join(["python", "-m", "cones_jax.bench", *argv])
    print(f"command: {command}", flush=True)
    if args.command == "demo-step":
        return run_demo_step(args, command)
    result = run_unet(args, command)
    print(summary_table(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        log(f"results written to {args.json}")
    return result


if __name__ == "__main__":
    main()
