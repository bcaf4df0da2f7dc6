"""Layout-guided multi-subject sampling (Cones 2): the command line of `sample.py`,
`python -m cones_jax.sample` and `cones-jax-sample`.

    python sample.py --layout examples/layouts/two_subjects.json                 # the bundled demo model
    cones-jax-sample --layout demo:two_subjects                                  # the same, installed
    python sample.py --layout examples/layouts/stable_diffusion/two_subjects.json --model /models/sd21-base \
        --seeds 0 1 2 3
    python sample.py --layout demo:two_subjects --preset paper --set guidance_steps=25 --set weight_positive=3

Config values: preset < layout file < flags. `--set key=value` overrides any key of the preset
(type-checked); `--steps`, `--scheduler` and `--cfg` are the same as `--set steps=...`,
`--set scheduler=...`, `--set cfg_scale=...`, and win over a `--set` of the same key.
`weight_positive` is the γ⁺ of every subject whose layout entry gives no `strength`.

Every input is checked before the model loads: flags and numbers (steps >= 1, finite CFG and λ,
seeds distinct integers), the layout, the model folder, residual and concept-neuron files, and
`--out` (writable, not a file, no existing outputs unless --overwrite). A `guidance_steps` above
`--steps` guides every step and says so on stderr. While a run writes to `--out` it holds
`<out>/.cones_jax.lock`: a second run to the same folder stops with an error instead.

Exit codes: 0 done; 2 bad input or configuration; 1 the environment or the numbers (a read-only
or locked --out, NaN/Inf images); 130 interrupted. A failure is one line on stderr, and no image
is written (--debug adds the traceback).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cones_jax.generate import GenerateOptions

from cones_jax.cli import ArgumentParser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", required=True, help="layout JSON (ours or the official Cones-V2 config list), or "
                   "demo:NAME for a bundled one (demo:two_subjects; see cones_jax.bundled.layout_names())")
    p.add_argument("--model", help="local Stable Diffusion folder in diffusers layout (default: the bundled demo)")
    p.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, help="sampling steps (= --set steps=N)")
    p.add_argument("--preset", default="official",
                   help="official | paper | a preset of cones_jax/configs | a .py config file")
    p.add_argument("--scheduler", choices=["ddim", "euler", "dpmpp_2m"], help="(= --set scheduler=NAME)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (= --set cfg_scale=X)")
    p.add_argument("--negative-prompt")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="UNet/VAE compute dtype; the attention bias is always fp32")
    p.add_argument("--batch", type=int, help="images per sampler call (default: all seeds at once, halved until "
                   "they fit in memory, split over all local devices)")
    p.add_argument("--no-guidance", action="store_true", help="plain text-to-image (residuals still applied)")
    p.add_argument("--show-layout", action="store_true", help="also write each image with the layout drawn on it")
    p.add_argument("--attention-maps", action="store_true", help="also write per-subject cross-attention heat maps")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--debug", action="store_true", help="print the traceback of any failure")
    p.add_argument("--allow-pickle", action="store_true", help="allow importing official .pt residuals (pickle)")
    p.add_argument("--neurons", nargs="+", default=[], metavar="FILE.cones",
                   help="Cones concept-neuron files: the union of their neurons is shut "
                        "(prompt with their identifiers)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value, type-checked (repeatable)")
    return p


def options(args: argparse.Namespace) -> GenerateOptions:
    """The parsed flags as `GenerateOptions`; --steps, --scheduler and --cfg are sugar for --set keys
    (and win over them)."""
    from cones_jax.config import parse_overrides
    from cones_jax.generate import GenerateOptions

    flags = {"steps": args.steps, "scheduler": args.scheduler, "cfg_scale": args.cfg}
    overrides = {**parse_overrides(args.set), **{k: v for k, v in flags.items() if v is not None}}
    return GenerateOptions(
        model=args.model, out_dir=args.out, seeds=tuple(args.seeds), preset=args.preset, overrides=overrides,
        dtype=args.dtype, batch=args.batch, guided=not args.no_guidance, negative_prompt=args.negative_prompt,
        neurons=tuple(args.neurons), allow_pickle=args.allow_pickle, show_layout=args.show_layout,
        attention_maps=args.attention_maps, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cones_jax.bundled import resolve_layout
    from cones_jax.cli import run_cli
    from cones_jax.generate import generate

    def job():
        paths = generate(resolve_layout(args.layout), options(args))
        print(f"wrote {len(paths['images'])} image(s) and {paths['grid']}")

    # config keys with no flag of their own are set with --set, and messages say so
    via_set = {k: f"--set {k}" for k in ("guidance_steps", "guidance_weight", "weight_positive", "weight_negative")}
    return run_cli(job, debug=args.debug, parser=build_parser(),
                   flags={"out_dir": "--out", "cfg_scale": "--cfg", "guided": "--no-guidance", **via_set})


if __name__ == "__main__":
    sys.exit(main())
