"""Paths of the files shipped inside the package: the demo model, its world and the example layouts.

They live in `cones_jax/demo/data/` (the repository's `examples/` is a link to it) and are found
through `importlib.resources`, so an installed wheel runs the demo with no checkout around it.
A layout argument may name a bundled layout as `demo:NAME` (e.g. `demo:two_subjects`,
`demo:stable_diffusion/official_format.json`).
"""

from __future__ import annotations

import os
from importlib import resources

from cones_jax.errors import ConfigError, LayoutError

DEMO_PREFIX = "demo:"


def data_dir() -> str:
    """The folder of the bundled data (a real folder: the package is installed unzipped)."""
    root = resources.files("cones_jax.demo") / "data"
    if not isinstance(root, os.PathLike):
        raise ConfigError("cones_jax's bundled data is not on a file system (zipped install?); "
                                "install the package with pip, which unpacks it")
    return os.fspath(root)


def demo_model() -> str:
    """The demo base model, a diffusers folder."""
    return os.path.join(data_dir(), "demo_model")


def demo_world() -> str:
    """The demo world: `subjects/` photos, trained `residuals/` and `neurons/`, the `detector`."""
    return os.path.join(data_dir(), "demo_world")


def layouts_dir() -> str:
    return os.path.join(data_dir(), "layouts")


def layout_names() -> list[str]:
    """Bundled layouts as `demo:` names, e.g. `demo:two_subjects`."""
    root = layouts_dir()
    names = []
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        names += [DEMO_PREFIX + os.path.normpath(os.path.join(rel, f[:-5])).replace(os.sep, "/")
                  for f in files if f.endswith(".json")]
    return sorted(names)


def resolve_layout(path: str) -> str:
    """`demo:NAME` -> the bundled layout file (`.json` may be left off); any other path unchanged."""
    if not path.startswith(DEMO_PREFIX):
        return path
    name = path[len(DEMO_PREFIX):]
    name = name if name.endswith((".json", ".yaml", ".yml")) else name + ".json"
    full = os.path.join(layouts_dir(), *name.split("/"))
    if not os.path.isfile(full):
        raise LayoutError(f"--layout {path!r}: no such bundled layout; use one of {', '.join(layout_names())}")
    return full
