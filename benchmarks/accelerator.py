"""One accelerator benchmark: Cones 2 sampling, the UNet forward, residual training and diffusers, in one table.

    python -m benchmarks.accelerator --json accelerator.json          # GPU/TPU: SD 2.1 shapes, full sizes
    python -m benchmarks.accelerator --config tiny --dtype fp32 --resolution 64 --official-resolution 64 \\
        --batches 1 2 --steps 2 --unet-batch 2 --train-resolutions 64 32 --iters 3 --train-steps 3 --torch-cpu
                                                    # CPU smoke test (fp32: XLA:CPU compiles bf16 slowly)

Run from the repository root, as every benchmark. It measures on whatever backend JAX has (one device),
on random weights of one architecture (`--config`, default `sd21`: SD 2.1's UNet, VAE and
OpenCLIP-H text tower, `benchmarks.common`), UNet and VAE in `--dtype` (default bf16), text encoder fp32:

  paper_b{B}      Cones 2 paper preset (cones_jax/configs/cones2_paper.py: DDIM, `--steps` 50, every step layout-guided)
                  at `--resolution` 512 px for each batch B of `--batches` (1 8): seconds per image of the
                  whole jitted sampler (text encoding, loop, VAE decode) on a two-subject box layout, its inputs
                  built by the sampler core (sampler.LayoutSampler) as sample.py builds them.
  official        official preset (cones_jax/configs/cones2_official.py: Euler + self-recurrence, guidance_steps 50) at
                  `--official-resolution` 768 px, batch 1, s/img.
  t2i_jax         plain text-to-image (DDIM, CFG 7.5, no guidance) at `--resolution`, batch 1: the paper preset's
                  sampler built without the layout bias (every attention takes the backend's fused kernel),
                  beside
  t2i_diffusers   diffusers' StableDiffusionPipeline (fp16, SDPA attention, eager) on the same weights, prompt,
                  size, scheduler and steps, s/img.
  unet_bf16/fp32  one UNet forward on a CFG batch of `--unet-batch` (16: the CFG batch of 8 images) at
                  `--resolution`: seconds, TFLOP/s and MFU. FLOPs are XLA's count for the compiled
                  executable (`cost_analysis()`; XLA counts a loop body once, so on CPU, where our attention
                  runs in query blocks in a loop, the figure undercounts); the details also hold the count
                  before optimisation, which should agree on GPU. Peaks: PEAK_TFLOPS; MFU is n/a elsewhere.
  unet_diffusers  diffusers' UNet, fp16, SDPA, the same call (TFLOP/s and MFU from our FLOP count).
  unet_speedup    diffusers fp16 seconds / ours bf16 seconds for that call.
  train_{R}px     Cones 2 residual training (the project's step: benchmarks.common.residual_train_step, the
                  official recipe, batch 1, frozen UNet in `--dtype`, AdamW on the fp32 text encoder) at each
                  of `--train-resolutions` (768 512): steps per second, each step waited for as the training
                  loop does.

Compile time is reported apart from run time; run times are medians of `--iters` calls (`--train-steps`
steps for training) after `--warmup`, the rows of a group timed in interleaved rounds. On a GPU with SD 2.1
shapes at the stated sizes, the `met` column checks the project's goals (GOALS).

diffusers rows need torch with CUDA (or `--torch-cpu`: fp32 on the CPU, to exercise the code) and diffusers;
otherwise they say n/a and why. On an offline machine without diffusers, carry a wheel: on a networked one,
`pip download diffusers --no-deps -d wheels/` (pure Python; its other needs, huggingface_hub, safetensors,
regex, Pillow, come with transformers), bring `wheels/` along (with the device runner, an ignored path named
in `carry`), then `pip install --no-index --no-deps wheels/diffusers-*.whl` before running this.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

# Both frameworks share one accelerator: JAX must not grab most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from cones_jax import layout as layout_lib  # noqa: E402
from cones_jax import sampler as sampler_lib  # noqa: E402
from cones_jax import sampling  # noqa: E402
from cones_jax.config import load_config  # noqa: E402
from cones_jax.pipeline import parse_dtype  # noqa: E402
from cones_jax.tokenizer import write_clip_tokenizer  # noqa: E402

PROMPT = "a photo of a dog and a cat"
LAYOUT = {"prompt": PROMPT, "subjects": [{"word": "dog", "box": [0.0, 0.0, 0.5, 1.0]},
                                         {"word": "cat", "box": [0.5, 0.0, 1.0, 1.0]}]}

# Dense peak TFLOP/s per device (16-bit, fp32) from the vendors' datasheets (no sparsity); the first
# entry whose text is in jax's device_kind wins. fp32 is what XLA runs fp32 matmuls and convolutions as
# at default precision: TF32 on NVIDIA Ampere and later (jax-ml/jax#18934), one bf16 pass on TPU.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0), ("H100 NVL", 835.0, 417.5), ("H100", 989.4, 494.7), ("H200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
    ("TPU v6 lite", 918.0, 918.0), ("TPU v5 lite", 197.0, 197.0), ("TPU v5", 459.0, 459.0), ("TPU v4", 275.0, 275.0),
)
GOAL_CONFIGS = ("sd21", "sd21-base")  # the goals are stated for SD 2.1 shapes


@dataclasses.dataclass(frozen=True)
class Goal:
    text: str
    sizes: dict  # the row sizes the goal is stated at
    reached: Callable[[Row], bool]


GOALS = {
    "paper_b8": Goal("≤ 0.30 s/img", dict(resolution=512, batch=8, steps=50), lambda r: r.value <= 0.30),
    "official": Goal("≤ 1.2 s/img", dict(resolution=768, batch=1, steps=50), lambda r: r.value <= 1.2),
    "unet_bf16": Goal("MFU ≥ 40%", {}, lambda r: r.details.get("mfu") is not None and r.details["mfu"] >= 0.40),
    "unet_speedup": Goal("≥ 1.5x diffusers fp16", {}, lambda r: r.value >= 1.5),
    "train_768px": Goal("4000 steps ≤ 3 min (≥ 22.2 steps/s)", dict(resolution=768, batch=1),
                        lambda r: 4000 / r.value <= 180),
}


@dataclasses.dataclass
class Row:
    key: str
    label: str
    unit: str
    value: float | None = None  # None: not measured, see `reason`
    compile_s: float | None = None
    sizes: dict = dataclasses.field(default_factory=dict)
    details: dict = dataclasses.field(default_factory=dict)
    reason: str = ""
    goal: str = ""
    met: bool | None = None
    met_note: str = ""


def peak_tflops(device_kind: str, half: bool) -> float | None:
    for name, h, f in PEAK_TFLOPS:
        if name in device_kind:
            return h if half else f
    return None


def flop_count(stage) -> float | None:
    """XLA's FLOP count of a lowered or compiled computation (jax returns a dict, or a list of one
    dict per program), or None where the backend gives none."""
    analysis = stage.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def torch_target(args) -> tuple[str | None, str]:
    """(torch device for the diffusers rows, or None and why not)."""
    if not args.torch:
        return None, "skipped (--no-torch)"
    if not {"sampling", "unet"} & set(args.parts):
        return None, "no diffusers row in --parts"
    try:
        import torch
    except ImportError as e:
        return None, f"torch is not importable ({e})"
    try:
        import diffusers  # noqa: F401
    except Exception as e:  # a missing or broken install: the row says so instead of the run failing
        return None, f"diffusers is not importable ({e}); the module docstring says how to carry a wheel"
    platform = jax.devices()[0].platform
    if platform == "gpu" and torch.cuda.is_available():
        return "cuda", ""
    if args.torch_cpu:
        return "cpu", ""
    return None, (f"a GPU-to-GPU comparison: jax runs on {platform}, torch has "
                  f"{'a' if torch.cuda.is_available() else 'no'} CUDA device (--torch-cpu runs it on the CPU)")


def median_rows(fns: dict, rows: dict, warmup: int, rounds: int, per: dict | None = None) -> None:
    """Warms up and times `fns` in interleaved rounds; a row's value is its median seconds per call
    divided by `per[key]` (images per call), or their inverse for a steps/s row."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    for key, seconds in common.timed_rounds(fns, rounds).items():
        row = rows[key]
        row.details["median_s"] = seconds
        row.value = 1.0 / seconds if row.unit == "steps/s" else seconds / (per or {}).get(key, 1)


@dataclasses.dataclass
class Sampler:
    """A compiled sampler with what it is called on."""

    compiled: Callable
    params: dict
    schedule: Any
    inputs: sampling.SampleInputs
    cfg: dict
    compile_s: float

    def call_with(self, inputs) -> Callable:
        return lambda: self.compiled(self.params, self.schedule, inputs)

    @property
    def call(self) -> Callable:
        return self.call_with(self.inputs)


class Benchmark:
    def __init__(self, args, tmp: str):
        self.args = args
        self.dtype = parse_dtype(args.dtype)
        self.rows: dict[str, Row] = {}
        self.tdev, self.torch_reason = torch_target(args)
        self.torch_dtype = self.torch_note = None
        tok = write_clip_tokenizer(os.path.join(tmp, "tokenizer"), PROMPT.split(), pad_token="!")
        if self.tdev:
            import torch
            import transformers
            from diffusers.models.attention_processor import AttnProcessor2_0

            torch.set_num_threads(os.cpu_count() or 1)
            self.torch_dtype, self.torch_note = common.torch_dtype_for("fp16", self.tdev)
            common.log(f"building diffusers/transformers {args.config} models (seed 0) and converting them")
            unet_t, text_t = common.torch_models(args.config)
            vae_t = common.torch_vae(args.config)
            self.sd32 = common.torch_to_jax(unet_t, text_t, vae_t, tokenizer=tok)
            for m in (unet_t, vae_t):
                m.set_attn_processor(AttnProcessor2_0())  # SDPA, whatever the diffusers default
            self.torch_models = {k: m.to(self.tdev, self.torch_dtype).eval()
                                 for k, m in (("unet", unet_t), ("text_encoder", text_t), ("vae", vae_t))}
            self.torch_tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer"),
                                                                              local_files_only=True)
        else:
            common.log(f"random {args.config} weights drawn on the host (diffusers rows: {self.torch_reason})")
            self.sd32 = common.random_pipeline(args.config, tokenizer=tok)
        self.sd = common.with_dtype(self.sd32, self.dtype)
        self.layout = layout_lib.parse_layout(LAYOUT, ".", "<benchmark layout>")

    def add(self, row: Row) -> Row:
        self.rows[row.key] = row
        return row

    def na(self, key: str, label: str, unit: str, reason: str, sizes: dict) -> None:
        self.add(Row(key, label, unit, sizes=sizes, reason=reason))

    # ---- sampling

    def sampler(self, preset: str, resolution: int, batch: int, *, guided: bool = True) -> Sampler:
        """The preset's sampler at one size (layout-guided, or plain text-to-image), compiled, with its inputs."""
        sd, steps = self.sd, self.args.steps
        cfg = load_config(preset, {"steps": steps})
        core = sampler_lib.LayoutSampler(sd, cfg, guided=guided)
        prep = sampler_lib.prepare_layout(sd, self.layout, cfg, height=resolution, width=resolution)
        schedule, inputs = core.schedule, core.inputs([prep] * batch, list(range(batch)))
        fn = sampling.make_sampler(sd, core.spec, core.bias_fn)
        t0 = time.perf_counter()
        compiled = fn.lower(sd.params, schedule, inputs).compile()
        return Sampler(compiled, sd.params, schedule, inputs, cfg, time.perf_counter() - t0)

    def diffusers_t2i(self, resolution: int, cfg: dict):
        import diffusers
        import torch

        s = self.sd.scheduler
        scheduler = diffusers.DDIMScheduler(
            num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
            beta_schedule=s.beta_schedule, prediction_type=s.prediction_type, timestep_spacing=s.timestep_spacing,
            steps_offset=s.steps_offset, set_alpha_to_one=s.set_alpha_to_one, clip_sample=False)
        pipe = diffusers.StableDiffusionPipeline(
            tokenizer=self.torch_tokenizer, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **self.torch_models)
        pipe.set_progress_bar_config(disable=True)

        def run():
            with torch.inference_mode():
                images = pipe(prompt=[PROMPT], negative_prompt=[""], height=resolution, width=resolution,
                              num_inference_steps=self.args.steps, guidance_scale=cfg["cfg_scale"], output_type="pt",
                              generator=torch.Generator(self.tdev).manual_seed(0)).images
            if self.tdev == "cuda":
                torch.cuda.synchronize()
            return images

        return run

    def sampling_rows(self) -> None:
        a = self.args
        samplers, fns, per = {}, {}, {}
        todo = [(f"paper_b{b}", "paper", a.resolution, b) for b in a.batches]
        todo.append(("official", "official", a.official_resolution, 1))
        labels = {"paper": "Cones 2 paper preset (DDIM, all steps guided)",
                  "official": "Cones 2 official preset (Euler + self-recurrence)"}
        for key, preset, res, b in todo:
            common.log(f"compiling the sampler: {key} ({res} px, batch {b}, {a.steps} steps, {a.dtype})")
            samplers[key] = self.sampler(preset, res, b)
            fns[key], per[key] = samplers[key].call, b
            self.add(Row(key, f"{labels[preset]}, {a.steps} steps, {res} px, batch {b}", "s/img",
                         compile_s=samplers[key].compile_s, sizes=dict(resolution=res, batch=b, steps=a.steps)))
        # Plain text-to-image, as diffusers runs it: no bias hook, so no attention needs its scores.
        common.log(f"compiling the sampler: t2i_jax ({a.resolution} px, batch 1, {a.steps} steps, {a.dtype})")
        t2i = self.sampler("paper", a.resolution, 1, guided=False)
        fns["t2i_jax"], per["t2i_jax"] = t2i.call, 1
        sizes = dict(resolution=a.resolution, batch=1, steps=a.steps)
        self.add(Row("t2i_jax", f"ours, text-to-image (DDIM, no guidance), {a.steps} steps, {a.resolution} px, batch 1",
                     "s/img", compile_s=t2i.compile_s, sizes=sizes))
        label = f"diffusers text-to-image (DDIM, SDPA), {a.steps} steps, {a.resolution} px, batch 1"
        if self.tdev:
            fns["t2i_diffusers"] = self.diffusers_t2i(a.resolution, t2i.cfg)
            self.add(Row("t2i_diffusers", label + f", {self.torch_label()}", "s/img", sizes=sizes,
                         details={"torch_dtype_note": self.torch_note}))
        else:
            self.na("t2i_diffusers", label, "s/img", self.torch_reason, sizes)
        common.log(f"timing {len(fns)} samplers: {a.warmup} warmup + {a.iters} timed round(s)")
        median_rows(fns, self.rows, a.warmup, a.iters, per)

    def torch_label(self) -> str:
        return f"torch {str(self.torch_dtype).replace('torch.', '')} on {self.tdev}"

    # ---- the UNet forward

    def unet_rows(self) -> None:
        a, sd32 = self.args, self.sd32
        n, lat = a.unet_batch, a.resolution // sd32.latent_factor
        rng = np.random.default_rng(0)
        x_np = rng.standard_normal((n, lat, lat, sd32.unet.config.in_channels), dtype=np.float32)
        t_np = rng.uniform(0, 1000, size=(n,)).astype(np.float32)
        c_np = rng.standard_normal((n, common.CONTEXT_LEN, sd32.unet.config.cross_attention_dim), dtype=np.float32)
        x, t, c = jax.device_put(x_np), jax.device_put(t_np), jax.device_put(c_np)
        sizes = dict(resolution=a.resolution, batch=n)
        kind = jax.devices()[0].device_kind
        fns, flops = {}, {}
        for name, dtype in (("bf16", jnp.bfloat16), ("fp32", jnp.float32)):
            key, unet = f"unet_{name}", sd32.unet.clone(dtype=dtype)
            params = {"params": jax.tree_util.tree_map(lambda p, d=dtype: p.astype(d), sd32.params["unet"])}
            common.log(f"compiling the UNet forward ({name}, batch {n}, {lat}x{lat} latents)")
            lowered = jax.jit(unet.apply).lower(params, x, t, c)
            t0 = time.perf_counter()
            compiled = lowered.compile()
            row = self.add(Row(key, f"UNet forward, {name}, CFG batch {n}, {a.resolution} px", "s/call",
                               compile_s=time.perf_counter() - t0, sizes=sizes))
            flops[key] = flop_count(compiled)
            row.details.update(flops=flops[key], flops_before_optimisation=flop_count(lowered),
                               peak_tflops=peak_tflops(kind, half=name == "bf16"))
            fns[key] = lambda compiled=compiled, params=params: compiled(params, x, t, c)
        label = f"diffusers UNet forward (SDPA), CFG batch {n}, {a.resolution} px"
        if self.tdev:
            import torch

            unet_t, tdt = self.torch_models["unet"], self.torch_dtype
            x_t = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2))).to(self.tdev, tdt)
            t_t, c_t = torch.from_numpy(t_np).to(self.tdev), torch.from_numpy(c_np).to(self.tdev, tdt)

            def torch_run():
                with torch.inference_mode():
                    out = unet_t(x_t, t_t, encoder_hidden_states=c_t, return_dict=False)[0]
                if self.tdev == "cuda":
                    torch.cuda.synchronize()
                return out

            fns["unet_diffusers"] = torch_run
            # the same network at the same shapes; fp32's count has no dtype conversions in it
            flops["unet_diffusers"] = flops["unet_fp32"]
            self.add(Row("unet_diffusers", f"{label}, {self.torch_label()}", "s/call", sizes=sizes,
                         details=dict(flops=flops["unet_fp32"], torch_dtype_note=self.torch_note,
                                      peak_tflops=peak_tflops(kind, half=self.torch_dtype != torch.float32))))
        else:
            self.na("unet_diffusers", label, "s/call", self.torch_reason, sizes)
        common.log(f"timing {len(fns)} UNet calls: {a.warmup} warmup + {a.iters} timed round(s)")
        median_rows(fns, self.rows, a.warmup, a.iters)
        for key in fns:
            d = self.rows[key].details
            d["tflops"] = flops[key] / self.rows[key].value / 1e12 if flops[key] else None
            d["mfu"] = d["tflops"] / d["peak_tflops"] if d["tflops"] and d["peak_tflops"] else None
        speed = Row("unet_speedup", f"UNet forward speed-up, ours bf16 over diffusers"
                    f"{' ' + self.torch_label() if self.tdev else ''}, CFG batch {n}", "x", sizes=sizes)
        if "unet_diffusers" in fns:
            speed.value = self.rows["unet_diffusers"].value / self.rows["unet_bf16"].value
        else:
            speed.reason = self.torch_reason
        self.add(speed)

    # ---- residual training

    def train_rows(self) -> None:
        a = self.args
        fns = {}
        for res in a.train_resolutions:
            key = f"train_{res}px"
            common.log(f"compiling the residual training step ({res} px, batch 1, frozen UNet {a.dtype})")
            inp = common.residual_step_inputs(a.config, res, 1)
            step, state = common.residual_train_step(self.sd, inp)
            fns[key] = common.StepRunner(step, state, inp["batch"])
            self.add(Row(key, f"Cones 2 residual training, {res} px, batch 1, frozen UNet {a.dtype}", "steps/s",
                         compile_s=step.compile_seconds, sizes=dict(resolution=res, batch=1)))
        common.log(f"timing {len(fns)} training steps: {a.warmup} warmup + {a.train_steps} timed round(s)")
        median_rows(fns, self.rows, a.warmup, a.train_steps)
        for key in fns:
            self.rows[key].details["minutes_for_4000_steps"] = 4000 / self.rows[key].value / 60

    def judge(self, platform: str) -> None:
        """Fills each row's goal and whether it is met, where the goal applies."""
        for key, goal in GOALS.items():
            row = self.rows.get(key)
            if row is None:
                continue
            row.goal, row.met = goal.text, None
            if row.value is None:
                row.met_note = "not measured"
            elif platform != "gpu":
                row.met_note = f"goals are for a GPU (this is {platform})"
            elif self.args.config not in GOAL_CONFIGS:
                row.met_note = "goals are for SD 2.1 shapes (--config sd21)"
            elif any(row.sizes.get(k) != v for k, v in goal.sizes.items()):
                row.met_note = "sizes differ from the goal's " + ", ".join(f"{k} {v}" for k, v in goal.sizes.items())
            else:
                row.met = bool(goal.reached(row))


def measured_text(row: Row) -> str:
    if row.value is None:
        return f"n/a: {row.reason}"
    text = f"{row.value:.4g} {row.unit}"
    d = row.details
    if "tflops" in d:
        text += ", " + ("n/a TFLOP/s" if d["tflops"] is None else f"{d['tflops']:.3g} TFLOP/s")
        text += ", MFU " + ("n/a" if d.get("mfu") is None else f"{d['mfu']:.0%}")
    if "minutes_for_4000_steps" in d:
        text += f" (4000 steps: {d['minutes_for_4000_steps']:.1f} min)"
    return text


def met_text(row: Row) -> str:
    if not row.goal:
        return ""
    return "n/a" if row.met is None else "yes" if row.met else "NO"


def table(rows: Sequence[Row]) -> str:
    return common.format_table([(r.key, r.label, measured_text(r), common.fmt(r.compile_s, ".1f"), r.goal,
                                met_text(r)) for r in rows],
                              header=("row", "what", "measured", "compile s", "goal", "met"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accelerator", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="sd21", choices=sorted(common.UNET_CONFIGS),
                   help="architecture of the random weights (default sd21; tiny for a CPU smoke test)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="UNet and VAE dtype of the sampler and training rows")
    p.add_argument("--resolution", type=int, default=512, help="paper preset, text-to-image and UNet rows (px)")
    p.add_argument("--official-resolution", type=int, default=768, help="official preset row (px)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="paper preset batches (images)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (all guided)")
    p.add_argument("--unet-batch", type=int, default=16, help="UNet forward batch (CFG: 2 x images)")
    p.add_argument("--train-resolutions", type=int, nargs="+", default=[768, 512], help="residual training (px)")
    p.add_argument("--iters", type=int, default=3, help="timed calls per sampler / UNet row (median)")
    p.add_argument("--train-steps", type=int, default=20, help="timed steps per training row (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    p.add_argument("--parts", nargs="+", choices=["sampling", "unet", "train"], default=["sampling", "unet", "train"])
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                   help="the diffusers rows (default on where torch with CUDA and diffusers import)")
    p.add_argument("--torch-cpu", action="store_true",
                   help="run the diffusers rows on the CPU (fp32) when there is no GPU: tests the code, not speed")
    p.add_argument("--json", metavar="PATH", help="also write the table and the details here")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if min(args.batches + [args.steps, args.unet_batch, args.iters, args.train_steps]) < 1 or args.warmup < 0:
        raise SystemExit("--batches, --steps, --unet-batch, --iters and --train-steps must be >= 1, --warmup >= 0")
    if len(set(args.batches)) != len(args.batches) or len(set(args.train_resolutions)) != len(args.train_resolutions):
        raise SystemExit("--batches and --train-resolutions must not repeat a value (each names a row)")
    command = shlex.join(["python", "-m", "benchmarks.accelerator", *argv])
    device = jax.devices()[0]
    load_start = common.load_avg()
    print(f"command: {command}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        b = Benchmark(args, tmp)
        for part in ("sampling", "unet", "train"):  # a fixed order, whatever the flag's
            if part in args.parts:
                getattr(b, f"{part}_rows")()
    b.judge(device.platform)
    rows = list(b.rows.values())
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    result = dict(
        command=command, date=datetime.datetime.now().isoformat(timespec="seconds"), jax_version=jax.__version__,
        torch_version=torch_version, platform=device.platform, device=common.device_description(),
        device_kind=device.device_kind, host=common.host_description(), load_avg=f"{load_start} -> {common.load_avg()}",
        xla_flags=os.environ.get("XLA_FLAGS", ""), config=args.config, dtype=args.dtype,
        torch_device=b.tdev, torch_reason=b.torch_reason, args=vars(args), rows=[dataclasses.asdict(r) for r in rows])
    result["table"] = table(rows)
    print(f"date: {result['date']}; jax {jax.__version__}, torch {torch_version or 'n/a'}; {result['device']}; "
          f"host {result['host']}; load {result['load_avg']}; XLA_FLAGS {result['xla_flags'] or '(none)'}")
    print(f"config {args.config}, UNet/VAE {args.dtype}, random weights"
          f"{' (diffusers init, converted)' if b.tdev else ' (N(0, 0.02²) drawn on the host)'}")
    print(result["table"], flush=True)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        common.log(f"results written to {args.json}")
    return result


if __name__ == "__main__":
    main()
