#!/usr/bin/env python
"""Layout-guided multi-subject sampling (Cones 2).

    python sample.py --layout examples/layouts/two_subjects.json                 # the bundled demo model
    python sample.py --layout examples/layouts/stable_diffusion/two_subjects.json --model /models/sd21-base --seeds 0 1 2 3

Exit codes: 0 done, 2 bad input (one line on stderr, nothing written).
"""

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", required=True, help="layout JSON (ours or the official Cones-V2 config list)")
    p.add_argument("--model", help="local Stable Diffusion folder in diffusers layout (default: the bundled demo)")
    p.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int)
    p.add_argument("--preset", default="official", help="official | paper | a config file under configs/")
    p.add_argument("--scheduler", choices=["ddim", "euler", "dpmpp_2m"])
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    p.add_argument("--negative-prompt")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="UNet/VAE compute dtype; the attention bias is always fp32")
    p.add_argument("--batch", type=int, help="images per sampler call (default: all seeds at once, halved until "
                   "they fit in memory, split over all local devices)")
    p.add_argument("--no-guidance", action="store_true", help="plain text-to-image (residuals still applied)")
    p.add_argument("--show-layout", action="store_true", help="also write each image with the layout drawn on it")
    p.add_argument("--attention-maps", action="store_true", help="also write per-subject cross-attention heat maps")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-pickle", action="store_true", help="allow importing official .pt residuals (pickle)")
    p.add_argument("--neurons", nargs="+", default=[], metavar="FILE.cones",
                   help="Cones concept-neuron files: the union of their neurons is shut (prompt with their identifiers)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset value")
    return p.parse_args(argv)


def options(args):
    """The parsed flags as `GenerateOptions`; --steps, --scheduler and --cfg are sugar for --set keys."""
    from cones_jax.config import parse_override
    from cones_jax.generate import GenerateOptions

    flags = {"steps": args.steps, "scheduler": args.scheduler, "cfg_scale": args.cfg}
    overrides = {**dict(parse_override(s) for s in args.set), **{k: v for k, v in flags.items() if v is not None}}
    return GenerateOptions(
        model=args.model, out_dir=args.out, seeds=tuple(args.seeds), preset=args.preset, overrides=overrides,
        dtype=args.dtype, batch=args.batch, guided=not args.no_guidance, negative_prompt=args.negative_prompt,
        neurons=tuple(args.neurons), allow_pickle=args.allow_pickle, show_layout=args.show_layout,
        attention_maps=args.attention_maps, overwrite=args.overwrite)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cones_jax.cli import run_cli
    from cones_jax.generate import generate

    def job():
        paths = generate(args.layout, options(args))
        print(f"wrote {len(paths['images'])} image(s) and {paths['grid']}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
