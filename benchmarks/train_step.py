#!/usr/bin/env python
"""Cones 2 residual training step: ours (JAX, jitted, AOT-compiled) against the same step in PyTorch.

    python -m benchmarks.train_step --config sd21 --batch 1 --resolution 768 --iters 20   # official setting
    python -m benchmarks.train_step --config tiny --resolution 64 --iters 3               # smoke test (CPU)
    python -m benchmarks.train_step --config sd21-base --resolution 512 --separate        # one framework at a time

Both frameworks run the same random weights (diffusers UNet2DConditionModel + transformers CLIPTextModel,
seed 0, converted tensor by tensor into our params), the same config (AdamW lr 5e-6, betas (0.9, 0.999),
eps 1e-8, weight decay 1e-2, global-norm clip 1.0), batch and resolution, and the same loss: L_sub
(Eq. 2, frozen UNet, the trained encoder's output for the bare word) + the official preservation terms
(Eq. 3). The UNet is frozen (no grads for its weights in either framework); the whole text encoder is
trained. Timed calls alternate (jax, torch, jax, ...) so load from other processes hits both alike
(`--separate`: each framework alone in a child process, one after the other, with its peak memory);
the printed ratio is torch seconds / jax seconds (>1: ours is faster). Compile time is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Both frameworks share one accelerator: JAX must not grab most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import SETTLE_S, TEXT_CONFIGS, residual_step_inputs, residual_train_step, torch_to_jax  # noqa: E402
from benchmarks.common import StepRunner as JaxRunner
from benchmarks.common import torch_models as build_models
from cones_jax.models.vae import VAEConfig  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `python -m benchmarks.x` runs


def _log(msg: str) -> None:
    print(f"[train_step {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seconds(fn, settle: float = 0.0) -> float:
    """Wall time of one call of `fn`, after sleeping `settle` seconds."""
    time.sleep(settle)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(jax_run, torch_run, warmup: int, iters: int) -> tuple[list[float], list[float]]:
    """Seconds of each timed call, the two frameworks alternating (after `warmup` untimed rounds)."""
    for _ in range(warmup):
        jax_run()
        torch_run()
    jt, tt = [], []
    for _ in range(iters):
        jt.append(seconds(jax_run, SETTLE_S))
        tt.append(seconds(torch_run, SETTLE_S))
    return jt, tt


def torch_noised(mean_t, std_t, ac_t, prediction_type: str):
    """The PyTorch side's draw: latent sample, noise, timesteps; returns (noisy latents, t, target)."""
    import torch

    latents = (mean_t + std_t * torch.randn_like(mean_t)) * VAEConfig().scaling_factor
    noise = torch.randn_like(latents)
    t = torch.randint(0, len(ac_t), (latents.shape[0],), device=latents.device)
    a = ac_t[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    return noisy, t, target


def common_inputs(args):
    """What both sides share (see `benchmarks.common.residual_step_inputs`)."""
    return residual_step_inputs(args.config, args.resolution, args.batch)


def jax_side(args, unet_t, text_t, inp):
    """Our step, AOT-compiled; returns (runner, compile seconds). Frees nothing of the caller's."""
    jdtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
    step, state = residual_train_step(torch_to_jax(unet_t, text_t, dtype=jdtype, remat=args.remat), inp)
    runner = JaxRunner(step, state, inp["batch"])
    _log(f"jax step compiled in {step.compile_seconds:.1f} s on {jax.devices()[0].device_kind}")
    mem = step.memory_gib()
    if mem:
        _log("jax step buffers (XLA's plan, per device): " + ", ".join(f"{k} {v:.2f} GiB" for k, v in mem.items()))
    return runner, step.compile_seconds


def torch_side(args, unet_t, text_t, inp):
    """The same step as the official trainer does it (frozen UNet, AdamW on the whole encoder);
    returns (runner, device). Moves the caller's modules."""
    import torch

    cfg, ptype, free_L = inp["cfg"], inp["ptype"], inp["free_L"]
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tdev = "cuda" if torch.cuda.is_available() else "cpu"
    unet_t = unet_t.to(tdev).eval().requires_grad_(False)
    if tdtype != torch.float32:
        unet_t = unet_t.to(dtype=tdtype)
    text_t = text_t.to(tdev).train()
    if args.remat:
        unet_t.enable_gradient_checkpointing()
        (getattr(text_t, "activation_checkpointing_enable", None) or text_t.gradient_checkpointing_enable)()
    opt = torch.optim.AdamW(text_t.parameters(), lr=cfg["lr"], betas=(cfg["adam_beta1"], cfg["adam_beta2"]),
                            eps=cfg["adam_eps"], weight_decay=cfg["weight_decay"])
    ids_t = torch.from_numpy(inp["ids_L"].astype(np.int64))[None].repeat(args.batch, 1).to(tdev)
    keep_t = torch.from_numpy(~free_L).to(tdev)
    keep_t[0] = False
    with torch.no_grad():  # the frozen encoder's output: the encoder before its first update
        target_t = text_t(ids_t[:1])[0][0].detach().clone()
    ac_t = torch.from_numpy(inp["ac"]).to(tdev)
    mean_t = torch.from_numpy(inp["batch"]["mean"].transpose(0, 3, 1, 2).copy()).to(tdev)
    std_t = torch.from_numpy(inp["batch"]["std"].transpose(0, 3, 1, 2).copy()).to(tdev)

    def torch_run():
        noisy, t, target = torch_noised(mean_t, std_t, ac_t, ptype)
        cond = text_t(ids_t)[0]
        pred = unet_t(noisy.to(tdtype), t, encoder_hidden_states=cond.to(tdtype)).sample.float()
        diff = cond - target_t
        reg = (cfg["lambda_start"] * diff[:, 0].norm(dim=-1)
               + cfg["lambda_rest"] * (diff * keep_t[:, None]).flatten(1).norm(dim=-1)).mean()
        loss = torch.nn.functional.mse_loss(pred, target) + reg
        loss.backward()
        torch.nn.utils.clip_grad_norm_(text_t.parameters(), cfg["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())  # synchronises, as the jax side's float() does

    return torch_run, tdev


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_phase(args) -> dict:
    """One framework alone in this process (`--phase`); returns its timings and peak memory."""
    import gc

    import torch

    inp = common_inputs(args)
    unet_t, text_t = build_models(args.config)
    out = dict(phase=args.phase)
    if args.phase == "jax":
        runner, out["compile_s"] = jax_side(args, unet_t, text_t, inp)
        del unet_t, text_t
        gc.collect()
    else:
        runner, out["torch_device"] = torch_side(args, unet_t, text_t, inp)
    for _ in range(args.warmup):
        runner()
    out["times"] = [seconds(runner) for _ in range(args.iters)]
    out["peak_rss_gb"] = peak_rss_gb()
    if args.phase == "torch" and out["torch_device"] == "cuda":
        out["peak_device_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run_separately(args, argv) -> dict:
    """Each framework in its own child process, one after the other: for sizes where both side by
    side do not fit in memory. Also reports each one's peak resident memory."""
    import subprocess
    import tempfile

    phases = {}
    for phase in ("jax", "torch"):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "phase.json")
            child = [a for a in argv if a != "--separate"] + ["--phase", phase, "--json", path]
            _log(f"{phase} alone in a child process")
            subprocess.run([sys.executable, "-m", "benchmarks.train_step"] + child, check=True, cwd=_ROOT)
            with open(path) as f:
                phases[phase] = json.load(f)
    return phases


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--config", default="tiny", choices=sorted(TEXT_CONFIGS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=768, help="pixels; latents are resolution/8")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="frozen UNet dtype (both frameworks)")
    p.add_argument("--remat", action="store_true",
                   help="rematerialise UNet and text-encoder layers (ours) / gradient checkpointing (PyTorch)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--separate", action="store_true",
                   help="run each framework alone in a child process, one after the other (not alternating), "
                        "and report each one's peak memory: for sizes where both do not fit together")
    p.add_argument("--phase", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the result here")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if args.phase:
        out = run_phase(args)
        with open(args.json, "w") as f:
            json.dump(out, f)
        return out

    result = dict(config=args.config, batch=args.batch, resolution=args.resolution, dtype=args.dtype,
                  remat=args.remat, device=f"{jax.devices()[0].platform}/{jax.devices()[0].device_kind}",
                  iters=args.iters, jax_version=jax.__version__, torch_version=torch.__version__)
    if args.separate:
        phases = run_separately(args, argv)
        jt, tt = phases["jax"]["times"], phases["torch"]["times"]
        result.update(jax_compile_s=round(phases["jax"]["compile_s"], 2), torch_device=phases["torch"]["torch_device"],
                      jax_peak_rss_gb=round(phases["jax"]["peak_rss_gb"], 2),
                      torch_peak_rss_gb=round(phases["torch"]["peak_rss_gb"], 2), timing="separate")
        print(f"peak resident memory: jax {result['jax_peak_rss_gb']:.1f} GiB, "
              f"torch {result['torch_peak_rss_gb']:.1f} GiB")
    else:
        _log(f"building {args.config} UNet + text encoder (seed 0) and converting them")
        inp = common_inputs(args)
        unet_t, text_t = build_models(args.config)
        jax_run, compile_s = jax_side(args, unet_t, text_t, inp)
        torch_run, tdev = torch_side(args, unet_t, text_t, inp)
        jt, tt = alternate(jax_run, torch_run, args.warmup, args.iters)
        result.update(jax_compile_s=round(compile_s, 2), torch_device=tdev, timing="alternating")
    result.update(jax_median_s=statistics.median(jt), torch_median_s=statistics.median(tt))
    return report(result, f"{args.config}, batch {args.batch}, {args.resolution} px, {args.dtype}"
                          f"{', remat' if args.remat else ''}, {result['device']}, {result['timing']}", args.json)


def report(result: dict, label: str, json_path: str | None) -> dict:
    """Adds the torch/jax ratio, prints the two medians and the ratio, and writes `json_path` if given."""
    result["ratio_torch_over_jax"] = result["torch_median_s"] / result["jax_median_s"]
    print(f"jax   {result['jax_median_s'] * 1e3:9.1f} ms/step (compile {result['jax_compile_s']:.1f} s)")
    print(f"torch {result['torch_median_s'] * 1e3:9.1f} ms/step")
    print(f"ratio torch/jax {result['ratio_torch_over_jax']:.2f}  ({label})")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
