"""A local web app to draw a layout and generate from it: `python -m cones_jax.app` or `cones-jax app`.

    python -m cones_jax.app                      # the bundled demo model, http://127.0.0.1:7860
    cones-jax app --model /models/sd21-base --port 7861 --share

The page (Gradio, the `[app]` extra: pip install 'cones_jax[app]') has a canvas to draw, move,
resize and delete boxes over an optional background or colour map; per box a subject (word,
residual, γ⁺); the prompt with an inline check of the words; the preset, seeds, steps, CFG scale
and λ; Generate with a progress bar, the images with the layout drawn over them and, on request,
per-subject attention heat maps; and the layout as a JSON file that `sample.py --layout` reads,
which can be uploaded again to edit it.

It runs the CLI's sampler core (`cones_jax.sampler.LayoutSampler`) on one model loaded at start:
a new layout, prompt or seed reuses the compiled sampler. Requests queue, one at a time on the
model. Everything it writes (images, layout files, uploads, Gradio's own files) goes under
`--out-dir`.

    from cones_jax.app import launch
    launch(inline=True)                          # in a notebook: the page in the cell's output
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from cones_jax.cli import ArgumentParser, run_cli

if TYPE_CHECKING:
    from cones_jax.pipeline import StableDiffusion

DEFAULT_OUT = "cones_app_outputs"
DEFAULT_PORT = 7860


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="cones-jax app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Stable Diffusion folder in diffusers layout (default: the bundled demo)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT})")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--share", action="store_true", help="also serve through a public Gradio link")
    p.add_argument("--out-dir", default=DEFAULT_OUT,
                   help=f"the only folder the app writes to: images, layouts, uploads (default ./{DEFAULT_OUT})")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="UNet/VAE compute dtype")
    p.add_argument("--batch", type=int, help="images per sampler call (default: one per local device)")
    p.add_argument("--debug", action="store_true", help="print the traceback of a failure to start")
    return p


def make_app(model: str | None = None, out_dir: str = DEFAULT_OUT, *, dtype: str = "fp32",
             batch: int | None = None, sd: StableDiffusion | None = None) -> Any:
    """(Gradio Blocks, engine): the page, not launched, on `model` loaded now (or on `sd`, that
    model already loaded, as in a notebook). Gradio keeps its files (uploads, images sent to the
    page) in `out_dir/.gradio` too."""
    from cones_jax import bundled
    from cones_jax.app.engine import Engine
    from cones_jax.app.ui import build, require_gradio
    from cones_jax.generate import default_model

    out_dir = os.path.abspath(out_dir)
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(out_dir, ".gradio")  # read by Gradio at each upload/output
    require_gradio()
    model = model or default_model()
    engine = Engine(model, out_dir, dtype=dtype, batch=batch, sd=sd)
    demo = os.path.normpath(os.path.abspath(model)) == os.path.normpath(bundled.demo_model())
    return build(engine, demo_defaults=demo), engine


def launch(model: str | None = None, out_dir: str = DEFAULT_OUT, *, port: int | None = None,
           host: str = "127.0.0.1", share: bool | None = None, inline: bool | None = None, dtype: str = "fp32",
           batch: int | None = None, sd: StableDiffusion | None = None, block: bool = False) -> Any:
    """Starts the app; returns the Gradio Blocks (it keeps serving in the background unless `block`).
    `share=None` lets Gradio choose (a public link on Colab, where localhost is not the user's)."""
    page, engine = make_app(model, out_dir, dtype=dtype, batch=batch, sd=sd)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, share=share, inline=inline, prevent_thread_lock=not block,
                allowed_paths=[engine.out_dir], quiet=False, footer_links=[])
    return page


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def job() -> None:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        launch(args.model, args.out_dir, port=args.port, host=args.host, share=args.share or None, inline=False,
               dtype=args.dtype, batch=args.batch, block=True)

    # no persistent compilation cache: it would write outside --out-dir (and a sampler with a step
    # callback, which the progress bar needs, is never cached on disk anyway)
    return run_cli(job, debug=args.debug, parser=build_parser(), cache=False)


COMMANDS = {"app": "cones_jax.app", "sample": "cones_jax.sample", "train": "cones_jax.train"}


def cli_main(argv: list[str] | None = None) -> int:
    """`cones-jax COMMAND ...`: app (this web app), sample (sample.py), train (train.py)."""
    import importlib

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: cones-jax {{{','.join(COMMANDS)}}} [--help | options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
