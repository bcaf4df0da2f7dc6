"""Cost of Cones 2 layout guidance, measured side by side in one run.

    python -m benchmarks.layout_guidance --config sd21-base --resolution 512 --steps 4

Two measurements on random weights of the chosen architecture (SD UNet, VAE and text-tower
configs from `benchmarks.common`):
  1. one UNet call on a CFG batch (2 x batch) without and with the Eq. 7 bias on every
     cross-attention layer: the per-call overhead of guidance (target <= 1.05);
  2. the whole jitted sampler (text encoding, loop, VAE decode) per image: unguided, guided with
     the paper preset (no self-recurrence) and guided with the official preset (self-recurrence
     doubles the UNet calls of guided steps by design).
Variants are timed in interleaved rounds so that machine load hits them alike; medians printed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import UNET_CONFIGS, random_pipeline, timed_rounds  # noqa: E402
from cones_jax import guidance, sampling, schedulers  # noqa: E402
from cones_jax import sampler as sampler_lib  # noqa: E402
from cones_jax.models.unet import cross_attention_resolutions  # noqa: E402
from cones_jax.pipeline import parse_dtype  # noqa: E402


def layout_maps(sd, batch, lat):
    """Two subjects in the left and right halves, tokens 2 and 5, official γ values."""
    maps = {}
    for h, _ in cross_attention_resolutions(sd.unet.config, (lat, lat)):
        m = np.zeros((batch, h * h, 77), np.float32)
        left = (np.arange(h * h) % h) < h // 2
        m[:, :, 2] = np.where(left, 2.5, -1e8)
        m[:, :, 5] = np.where(~left, 2.5, -1e8)
        maps[f"{h}x{h}"] = jnp.asarray(m)
    return maps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="sd21-base", choices=sorted(UNET_CONFIGS))
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="images per call (the UNet batch is twice this)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--skip-sampler", action="store_true")
    args = p.parse_args(argv)
    dtype = parse_dtype(args.dtype)
    print(f"command: python -m benchmarks.layout_guidance {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}; jax {jax.__version__}; "
          f"device {jax.devices()[0].platform}/{jax.devices()[0].device_kind}; "
          f"host {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    sd = random_pipeline(args.config, dtype)
    factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
    lat, b = args.resolution // factor, args.batch
    g = guidance.LayoutGuidance(maps=layout_maps(sd, b, lat), weight=jnp.full((b,), 0.08),
                                sigmas=jnp.full((args.steps,), 3.0))
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(2 * b, lat, lat, 4), dtype)
    t = jnp.full((2 * b,), 500.0)
    ctx = jnp.asarray(rs.randn(2 * b, 77, sd.text_encoder.config.hidden_size), jnp.float32)

    plain = jax.jit(lambda p, x, t, c: sd.unet.apply({"params": p}, x, t, c))
    biased = jax.jit(lambda p, x, t, c, g: sd.unet.apply(
        {"params": p}, x, t, c, cross_attn_bias=lambda s, hw: guidance.layout_bias(s, hw, 0, g)))
    t0 = time.perf_counter()
    plain_c = plain.lower(sd.params["unet"], x, t, ctx).compile()
    cp = time.perf_counter() - t0
    t0 = time.perf_counter()
    biased_c = biased.lower(sd.params["unet"], x, t, ctx, g).compile()
    cb = time.perf_counter() - t0
    print(f"UNet compile: unguided {cp:.1f} s, guided {cb:.1f} s")
    med = timed_rounds({"unguided": lambda: plain_c(sd.params["unet"], x, t, ctx),
                        "guided": lambda: biased_c(sd.params["unet"], x, t, ctx, g)}, args.rounds)
    print(f"UNet call, batch {2 * b} at {lat}x{lat} latents, {args.dtype}: unguided {med['unguided']:.3f} s, "
          f"guided {med['guided']:.3f} s, ratio guided/unguided {med['guided'] / med['unguided']:.3f}")
    if args.skip_sampler:
        return
    ids = jnp.asarray(np.tile(np.arange(77, dtype=np.int32) % 500, (b, 1)))
    width = sd.text_encoder.config.hidden_size
    common = dict(prompt_ids=ids, negative_ids=ids, token_residuals=jnp.zeros((b, 77, width)),
                  noise=jnp.asarray(rs.randn(b, lat, lat, 4), jnp.float32), cfg_scale=jnp.float32(7.5),
                  renoise_keys=sampler_lib.renoise_keys(range(b)))
    guided = sampling.SampleInputs(**common, guidance=g, guided_steps=jnp.int32(args.steps))
    variants = {
        "unguided (ddim)": ("ddim", False, sampling.SampleInputs(**common)),
        "guided, paper (ddim)": ("ddim", False, guided),
        "guided, official (euler + self-recurrence)": ("euler", True, guided),
    }
    fns = {}
    for name, (kind, recur, inputs) in variants.items():
        fn = sampling.make_sampler(sd, sampling.SamplerSpec(scheduler=kind, steps=args.steps, self_recurrence=recur),
                                   guidance.layout_bias)
        sched = schedulers.make_schedule(kind, sd.scheduler, args.steps)
        t0 = time.perf_counter()
        compiled = fn.lower(sd.params, sched, inputs).compile()
        print(f"sampler compile, {name}: {time.perf_counter() - t0:.1f} s")
        fns[name] = (lambda c=compiled, s=sched, i=inputs: c(sd.params, s, i))
    med = timed_rounds(fns, args.rounds)
    base = med["unguided (ddim)"]
    for name, sec in med.items():
        print(f"sampler, {args.steps} steps, {args.resolution}px, batch {b}: {name}: {sec / b:.3f} s per image "
              f"(x{sec / base:.3f} of unguided)")


if __name__ == "__main__":
    main()
