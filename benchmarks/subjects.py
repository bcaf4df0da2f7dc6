#!/usr/bin/env python
"""Many subjects in one run: throughput measured side by side, and the FLOPs and memory a pod projection needs.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.subjects throughput --subjects 8
    python -m benchmarks.subjects cost --config sd21 --resolution 768         # official preset, per step

`throughput`: N subjects' residual training as N sequential single-subject runs (each on the mesh a
single run gets: batch 1 -> one device) and as one many-subject run (`cones_jax.subjects`, a
subject axis over every device), in the same process, on the same random weights, at a small
config; it prints subjects per hour of both and their ratio. Compile time is reported apart (a
sequential run compiles once: the step is the same for every subject).

`cost`: the residual train step (Cones 2: frozen UNet, official L_reg, AdamW on the whole text
encoder) of a real architecture, lowered from shapes alone (`jax.eval_shape`: no weights are made):
XLA's FLOP count of one step, with the plain-XLA attention (a blocked CPU kernel is a loop, whose
body XLA counts once); with `--memory`, also compiled for this machine's memory plan of one
subject's step. It prints the per-subject figures of BENCHMARKS.md's projection.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    CONTEXT_LEN,
    PREDICTION,
    TEXT_CONFIGS,
    random_pipeline,
    residual_step_inputs,
    write_json,
)
from cones_jax import residual, subjects, training
from cones_jax.models.vae import VAEConfig


def _log(msg: str) -> None:
    print(f"[subjects {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _spec(sd, inp: dict) -> residual.LossSpec:
    cfg = inp["cfg"]
    return residual.LossSpec(text=sd.text_encoder, unet=sd.unet, vae_config=VAEConfig(), alphas_cumprod_T=inp["ac"],
                             prediction_type=inp["ptype"], reg="official", lambda_start=cfg["lambda_start"],
                             lambda_rest=cfg["lambda_rest"])


def _subject_data(sd, inp: dict, n: int, steps: int, batch: int) -> list[dict]:
    """Per subject: its own word id (so its frozen target differs), and one host batch per step."""
    rng = np.random.default_rng(1)
    out = []
    lat = inp["batch"]["mean"].shape[1]
    for i in range(n):
        ids = inp["ids_L"].copy()
        ids[1] = 5 + i
        target = residual.encode_prompts(sd.text_encoder, sd.params["text_encoder"], ids[None], chunk=1)[0]
        batches = [{"mean": rng.standard_normal((batch, lat, lat, 4), dtype=np.float32),
                    "std": np.full((batch, lat, lat, 4), 0.05, np.float32)} for _ in range(steps)]
        out.append({"frozen": {"instance_ids": ids, "reg_target": target, "reg_free": inp["free_L"]},
                    "batches": batches})
    return out


def throughput(args: argparse.Namespace) -> dict:
    sd = random_pipeline(args.config)
    inp = residual_step_inputs(args.config, args.resolution, args.batch)
    cfg, spec = inp["cfg"], _spec(sd, inp)
    optimizer = training.make_optimizer(cfg)
    loss_fn = residual.make_loss_fn(spec)
    data = _subject_data(sd, inp, args.subjects, args.steps, args.batch)
    text_params = sd.params["text_encoder"]

    # N sequential single-subject runs: what `train.py residual` does once per subject.
    mesh = training.make_mesh(args.batch)
    single = training.make_train_step(loss_fn, optimizer, mesh, {"unet": sd.params["unet"], **data[0]["frozen"]})
    seq_compile = seq_run = 0.0
    for i, d in enumerate(data):
        single.frozen = jax.device_put({"unet": sd.params["unet"], **d["frozen"]}, training.replicated(mesh))
        state = single.put_state(training.init_state(jax.tree.map(jnp.array, {"text_encoder": text_params}),
                                                     optimizer, seed=i))
        first = single.put_batch(d["batches"][0])
        if single._compiled is None:
            single.compile(state, first)
            seq_compile = single.compile_seconds
        t0 = time.perf_counter()
        for k in range(args.steps):
            state, metrics = single(state, first if k == 0 else single.put_batch(d["batches"][k]))
        float(metrics["loss"])
        seq_run += time.perf_counter() - t0

    # One many-subject run.
    mesh = subjects.make_subject_mesh(args.subjects, args.batch)
    per = subjects.stack_subjects([d["frozen"] for d in data], mesh)
    many = subjects.SubjectsStep(loss_fn, optimizer, mesh, {"unet": sd.params["unet"]}, per, args.subjects)
    state = many.init_states({"text_encoder": text_params}, optimizer, list(range(args.subjects)))
    first = many.put_batch(lambda i: data[i]["batches"][0])
    many.compile(state, first)
    t0 = time.perf_counter()
    for k in range(args.steps):
        state, metrics = many(state, first if k == 0 else many.put_batch(lambda i, k=k: data[i]["batches"][k]))
    float(metrics["loss"])
    many_run = time.perf_counter() - t0

    per_hour = lambda seconds: 3600.0 * args.subjects / seconds  # each subject trained args.steps steps
    result = {"devices": jax.device_count(), "mesh": dict(mesh.shape), "subjects": args.subjects,
              "steps": args.steps, "config": args.config, "resolution": args.resolution, "batch": args.batch,
              "sequential_s": seq_run, "many_s": many_run, "sequential_compile_s": seq_compile,
              "many_compile_s": many.compile_seconds,
              "sequential_subjects_per_hour": per_hour(seq_run), "many_subjects_per_hour": per_hour(many_run),
              "ratio": seq_run / many_run}
    print(f"{args.subjects} subjects × {args.steps} steps, {args.config} @ {args.resolution} px, batch {args.batch}, "
          f"{result['devices']} {jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}")
    print(f"  sequential runs : {seq_run:8.2f} s  {result['sequential_subjects_per_hour']:10.1f} subjects/h "
          f"(compile {seq_compile:.1f} s, once)")
    print(f"  one run         : {many_run:8.2f} s  {result['many_subjects_per_hour']:10.1f} subjects/h "
          f"(compile {many.compile_seconds:.1f} s)")
    print(f"  ratio (one run / sequential subjects per hour): {result['ratio']:.2f}×")
    return result


def cost(args: argparse.Namespace) -> dict:
    """One residual step of architecture `args.config` at `args.resolution`, from shapes only."""
    from benchmarks.common import UNET_CONFIGS, text_config
    from cones_jax.models.attention import use_implementation
    from cones_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer, text_encoder_shapes
    from cones_jax.models.unet import UNet2DConditionModel, UNetConfig
    from cones_jax.schedulers import SchedulerConfig, alphas_cumprod

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
    unet = UNet2DConditionModel(UNetConfig.from_dict(UNET_CONFIGS[args.config]), dtype=dtype, remat=args.remat)
    text = CLIPTextTransformer(CLIPTextConfig.from_dict(text_config(args.config)), remat=args.remat)
    unet_shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), unet.param_shapes())
    text_shapes = text_encoder_shapes(text)
    ac = alphas_cumprod(SchedulerConfig.from_dict(dict(beta_start=0.00085, beta_end=0.012,
                                                       beta_schedule="scaled_linear"))).astype(np.float32)
    from cones_jax.config import load_config

    width = TEXT_CONFIGS[args.config]["hidden_size"]
    sds = jax.ShapeDtypeStruct
    frozen = {"unet": unet_shapes, "instance_ids": sds((CONTEXT_LEN,), jnp.int32)}
    if args.preset == "official":
        cfg = load_config("cones2_train_official")
        spec_kw = dict(lambda_start=cfg["lambda_start"], lambda_rest=cfg["lambda_rest"])
        frozen.update(reg_target=sds((CONTEXT_LEN, width), jnp.float32), reg_free=sds((CONTEXT_LEN,), jnp.bool_))
    else:  # the paper's L_reg: reg_batch preservation sentences through the tuned encoder per step
        cfg = load_config("cones2_train_paper")
        spec_kw = dict(reg_lambda=cfg["reg_lambda"], reg_batch=cfg["reg_batch"])
        n = cfg["num_sentences"]
        frozen.update(reg_ids=sds((n, CONTEXT_LEN), jnp.int32), reg_target=sds((n, CONTEXT_LEN, width), jnp.float32),
                      reg_keep=sds((n, CONTEXT_LEN), jnp.float32))
    spec = residual.LossSpec(text=text, unet=unet, vae_config=VAEConfig(), alphas_cumprod_T=ac,
                             prediction_type=PREDICTION[args.config], reg=args.preset, **spec_kw)
    optimizer = training.make_optimizer(cfg)
    lat = args.resolution // 8
    batch = {k: jax.ShapeDtypeStruct((args.batch, lat, lat, 4), jnp.float32) for k in ("mean", "std")}
    state = jax.eval_shape(lambda p: training.init_state(p, optimizer, 0), {"text_encoder": text_shapes})
    step = jax.jit(training.train_step_fn(residual.make_loss_fn(spec), optimizer))
    with use_implementation("xla"):
        lowered = step.lower(state, frozen, batch)
    analysis = lowered.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    flops = float(analysis["flops"])
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    n_text, n_unet = count(text_shapes), count(unet_shapes)
    result = {"config": args.config, "preset": args.preset, "remat": args.remat, "resolution": args.resolution,
              "batch": args.batch, "dtype": args.dtype, "steps_per_subject": cfg["steps"],
              "flops_per_step": flops, "text_encoder_params": n_text, "unet_params": n_unet,
              # what each subject owns: fp32 encoder + its gradient + AdamW's two moments
              "trainable_state_gib": n_text * 4 * 4 / 2**30,
              "frozen_unet_gib": n_unet * jnp.dtype(dtype).itemsize / 2**30}
    if args.memory:
        _log("compiling for the memory plan (minutes on a small CPU)")
        with use_implementation("xla"):
            compiled = lowered.compile()
        mem = compiled.memory_analysis()
        result["temp_gib"] = mem.temp_size_in_bytes / 2**30
        result["argument_gib"] = mem.argument_size_in_bytes / 2**30
    for k, v in result.items():
        print(f"  {k:22s} {v:.4g}" if isinstance(v, float) else f"  {k:22s} {v}")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput", help="N subjects in one run vs N sequential runs, side by side")
    t.add_argument("--config", default="tiny", choices=sorted(TEXT_CONFIGS))
    t.add_argument("--subjects", type=int, default=8)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--resolution", type=int, default=64)
    c = sub.add_parser("cost", help="FLOPs (and memory) of one residual step of a real architecture")
    c.add_argument("--config", default="sd21", choices=sorted(TEXT_CONFIGS))
    c.add_argument("--resolution", type=int, default=768)
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--preset", default="official", choices=["official", "paper"], help="which L_reg (Eq. 3)")
    c.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="frozen UNet dtype")
    c.add_argument("--remat", action="store_true", help="rematerialise UNet and encoder layers (train.py --remat)")
    c.add_argument("--memory", action="store_true", help="also compile for the memory plan (slow on CPU)")
    for q in (t, c):
        q.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    result = throughput(args) if args.what == "throughput" else cost(args)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
