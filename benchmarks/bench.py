"""Side-by-side speed and agreement benchmark: our Flax UNet against diffusers' PyTorch UNet.

    python -m benchmarks.bench unet --config sd21-base --batch 2 --dtype fp32 --iters 3

Both networks run the SAME random weights: the diffusers model is built (seed 0) and its state
dict is converted into our params with `cones_jax.convert.convert_state_dict`. Our forward is
`jax.jit(module.apply)` compiled ahead of time (compile seconds are reported apart); the timed
calls of the two frameworks are interleaved (jax, torch, jax, torch, ...) so that load from other
processes on the machine hits both alike and the ratio stays meaningful even when the absolute
seconds are noisy.

Needs torch and diffusers (the `test` extra) unless run with `--no-torch`, in which case our
UNet gets random params of its own and no agreement check is made.

    python -m benchmarks.bench demo-step --batch 16 --iters 5

times one training step of the demo base model's UNet (and text encoder) against variants of its
config, in turn, and prints each one's median against the recipe's.

    python -m benchmarks.bench demo-encode --images 1000 --chunks 500 50 20

times base_model's encode of rendered scenes into latents (a sitting's stage 2) at each chunk size,
in turn, and prints each one's median against the first's.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from benchmarks.common import (
    CONTEXT_LEN,
    JAX_DTYPES,
    SETTLE_S,
    UNET_CONFIGS,
    device_description,
    fmt,
    format_table,
    host_description,
    load_avg,
    log,
    random_params,
    timed_round_times,
    torch_dtype_for,
    write_json,
)

RESULT_KEYS = (
    "command", "date", "jax_version", "torch_version", "config", "batch", "latent", "dtype", "torch_dtype",
    "torch_dtype_note", "device", "host", "torch_threads", "params", "iters", "warmup", "jax_compile_s",
    "jax_times_s", "jax_median_s", "torch_times_s", "torch_median_s", "ratio_torch_over_jax", "max_abs_diff",
    "max_abs_ref", "rel_diff", "xla_flags", "load_avg")




def run_unet(args: argparse.Namespace, command: str) -> dict:
    from cones_jax import convert
    from cones_jax.models.unet import UNet2DConditionModel, UNetConfig

    config = dict(UNET_CONFIGS[args.config])
    latent = args.latent or config["sample_size"]
    jdtype = JAX_DTYPES[args.dtype]
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
        time.sleep(SETTLE_S)
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
# its three finest (here also at 32², with self-attention over 1024 positions there), the recipe's
# UNet with the token grounding loss (its attention probabilities kept for the loss), and the
# recipe's UNet on 128 px images (`latent_scale` 2: latents at 64², its attention at 32² and 16²),
# which is what a 128 px demo model would cost a step.
DEMO_VARIANTS = {
    "recipe": {},
    "text at 32²": dict(unet=dict(down_block_types=["CrossAttnDownBlock2D"] * 3,
                                  up_block_types=["CrossAttnUpBlock2D"] * 3)),
    "grounding loss": dict(grounding_weight=0.05),
    "128 px": dict(latent_scale=2),
}


def print_demo_header(detail: str) -> None:
    """The date, host and XLA flags above a demo benchmark's table."""
    print(f"date: {datetime.datetime.now().isoformat(timespec='minutes')}\n"
          f"host: {host_description()}; XLA_FLAGS: {os.environ.get('XLA_FLAGS') or '(none)'}; {detail}")


def run_demo_step(args: argparse.Namespace, command: str) -> dict:
    """Seconds per UNet training step of the demo recipe and its variants, timed in turn."""
    from cones_jax import training
    from cones_jax.demo import base_model as bm
    from cones_jax.models.clip_text import text_encoder_shapes
    from cones_jax.models.unet import UNet2DConditionModel, UNetConfig
    from cones_jax.tokenizer import clip_vocabulary

    text, _ = bm.models(len(clip_vocabulary(bm.vocabulary())[0]))
    rng = np.random.default_rng(0)
    opt = bm.optimizer(1e-4, 10, 100)
    mesh = training.make_mesh(args.batch)
    steps, states, params_n, compile_s, batches = {}, {}, {}, {}, {}

    def one_step(name: str) -> jax.Array:
        states[name], m = steps[name](states[name], batches[name])
        return m["loss"]

    for name, change in DEMO_VARIANTS.items():
        side = bm.UNET["sample_size"] * change.get("latent_scale", 1)
        unet = UNet2DConditionModel(UNetConfig.from_dict(dict(bm.UNET, sample_size=side, **change.get("unet", {}))))
        batch = {"mean": rng.standard_normal((args.batch, side, side, 4)).astype(np.float32),
                 "std": np.full((args.batch, side, side, 4), 0.01, np.float32),
                 "ids": rng.integers(0, 50, (args.batch, bm.MAX_LENGTH)).astype(np.int32)}
        weight = change.get("grounding_weight", 0.0)
        if weight:
            # grounding targets as sparse as real captions' (a few trait words, objects on a tenth of the grid)
            batch.update({f"ground_{s * s}": (rng.random((args.batch, s * s, bm.MAX_LENGTH)) < 0.01).astype(np.float32)
                          for s in bm.cross_attention_sides(unet)})
        batches[name] = batch
        # random weights drawn on the host: the step's speed does not depend on their values, and
        # compiling each module's init would cost as much as the step itself on a small CPU
        params = {"text_encoder": random_params(text_encoder_shapes(text), seed=0),
                  "unet": random_params(unet.param_shapes(), seed=1)}
        params_n[name] = sum(x.size for x in jax.tree.leaves(params))
        steps[name] = training.make_train_step(bm.make_diffusion_loss(unet, text, 1.0, grounding_weight=weight),
                                               opt, mesh, frozen={})
        states[name] = steps[name].put_state(training.init_state(params, opt, seed=0, ema=True))
        # the first call compiles
        compile_s[name] = timed_round_times({name: functools.partial(one_step, name)}, 1)[name][0]
    times = timed_round_times({name: functools.partial(one_step, name) for name in DEMO_VARIANTS}, args.iters,
                              SETTLE_S)
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["recipe"]
    print_demo_header(f"batch {args.batch}")
    print(format_table([(name, f"{params_n[name] / 1e6:.2f} M params, compile {compile_s[name]:.0f} s, "
                                f"median {med[name]:.3f} s/step, {med[name] / base:.2f}x the recipe")
                         for name in DEMO_VARIANTS]))
    return {"command": command, "batch": args.batch, "median_s": med, "times_s": times, "params": params_n}


def run_demo_encode(args: argparse.Namespace, command: str) -> dict:
    """Seconds to encode `args.images` rendered scenes with the demo VAE at each chunk size, in turn."""
    from cones_jax.demo import base_model as bm
    from cones_jax.demo import world

    images, _ = world.render_batch(range(args.images))
    vae = bm.vae_module()
    params = random_params(vae.param_shapes(), seed=0)  # the encode's speed does not depend on the values
    # the first call of a chunk size compiles
    compile_s = {c: timed_round_times({c: lambda c=c: bm.encode_dataset(vae, params, images[:c], chunk=c)}, 1)[c][0]
                 for c in args.chunks}
    times = timed_round_times({c: lambda c=c: bm.encode_dataset(vae, params, images, chunk=c) for c in args.chunks},
                              args.iters, SETTLE_S)
    med = {c: statistics.median(v) for c, v in times.items()}
    base = med[args.chunks[0]]
    print_demo_header(f"{args.images} scenes")
    print(format_table([(f"chunk {c}", f"first call {compile_s[c]:.1f} s, median {med[c]:.2f} s, "
                                       f"{1e3 * med[c] / args.images:.1f} ms a scene, {med[c] / base:.2f}x chunk "
                                       f"{args.chunks[0]}") for c in args.chunks]))
    return {"command": command, "images": args.images, "median_s": med, "times_s": times}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("unet", help="time our Flax UNet forward against diffusers' PyTorch one")
    u.add_argument("--config", choices=sorted(UNET_CONFIGS), default="sd21-base")
    u.add_argument("--batch", type=int, default=2)
    u.add_argument("--latent", type=int, default=None, help="latent side (default: the config's sample_size)")
    u.add_argument("--dtype", choices=sorted(JAX_DTYPES), default="fp32")
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
    e = sub.add_parser("demo-encode", help="time a sitting's encode of its scenes at several chunk sizes")
    e.add_argument("--images", type=int, default=1000)
    e.add_argument("--chunks", type=int, nargs="+", default=[500, 50])
    e.add_argument("--iters", type=int, default=3)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # the commands' own CPU defaults, so the figures are what a user gets without typing flags
    # (no compilation cache here: the compile time printed is a real compile)
    from cones_jax.cli import default_xla_flags

    default_xla_flags()
    if args.iters < 1 or getattr(args, "warmup", 0) < 0 or getattr(args, "batch", 1) < 1:
        raise SystemExit("--iters must be >= 1, --warmup >= 0, --batch >= 1")
    if args.command == "demo-encode" and (args.images < 1 or min(args.chunks) < 1):
        raise SystemExit("--images and every --chunks value must be >= 1")
    command = shlex.join(["python", "-m", "benchmarks.bench", *argv])
    print(f"command: {command}", flush=True)
    if args.command == "demo-step":
        return run_demo_step(args, command)
    if args.command == "demo-encode":
        return run_demo_encode(args, command)
    result = run_unet(args, command)
    print(summary_table(result), flush=True)
    write_json(args.json, result)
    if args.json:
        log(f"results written to {args.json}")
    return result


if __name__ == "__main__":
    main()
