"""Named configs from `configs/` (Python files with `get_config()`), with `key=value` overrides.

Every constant of a method lives in a config file, never as a literal in library code.
"""

from __future__ import annotations

import ast
import importlib.util
import os

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PRESETS = {"official": "cones2_official", "paper": "cones2_paper"}


def load_config(name_or_path: str, overrides: dict | None = None) -> dict:
    """`official`/`paper`, a config name under configs/, or a path to a .py config file."""
    name = PRESETS.get(name_or_path, name_or_path)
    path = name if name.endswith(".py") else os.path.join(CONFIG_DIR, name + ".py")
    if not os.path.isfile(path):
        known = sorted(list(PRESETS) + [f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py")
                                        and not f.startswith("_")]) if os.path.isdir(CONFIG_DIR) else list(PRESETS)
        raise ValueError(f"unknown config {name_or_path!r}; use one of {', '.join(known)} or a path to a .py file")
    spec = importlib.util.spec_from_file_location(f"cones_jax_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for key, value in (overrides or {}).items():
        if key not in cfg:
            raise ValueError(f"config {name_or_path!r} has no key {key!r} (keys: {', '.join(sorted(cfg))})")
        cfg[key] = value
    return cfg


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` with a Python literal value (strings may be bare)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value
