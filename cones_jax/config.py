"""Typed configs: the presets in `cones_jax/configs/` and the one way to override them.

Every constant of a method lives in a config, never as a literal in library code. A config is a
frozen dataclass (`SamplingConfig`, `ResidualConfig`, `NeuronsConfig`, `DemoModelConfig`, `DemoLineageConfig`) that
also reads like a mapping (`cfg["steps"]`, `cfg.get(...)`, `dict(cfg)`, `"steps" in cfg`), so code
that takes a plain dict takes a config too.

A preset is a module of `cones_jax.configs` whose `get_config()` returns one; `load_config` takes
its name (or `official`/`paper`, or the path of a .py file of the same form). Overrides go through
`Config.override`, which checks each key and the type of each value against the config's fields:
a command line's `--set key=value` and its convenience flags (`--steps`, `--cfg`, ...) both end
there. Precedence when sampling: preset < layout file < flags (`resolve_sampling`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import os
import types
import typing
from collections.abc import Iterator, Mapping
from importlib import resources
from typing import Any, Literal, Self

from cones_jax.errors import ConfigError

PRESETS = {"official": "cones2_official", "paper": "cones2_paper"}
CONFIG_PACKAGE = "cones_jax.configs"


@dataclasses.dataclass(frozen=True)
class Config(Mapping):
    """Base of the typed configs: frozen fields, read access as a mapping, checked overrides."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._field_names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._field_names())

    def __len__(self) -> int:
        return len(self._field_names())

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, each checked like an override."""
        return self.override(changes)

    def override(self, overrides: Mapping[str, Any] | None, *, source: str = "--set") -> Self:
        """A copy with `overrides` (key -> value); an unknown key or a value of the wrong type is a
        one-line `ValueError` naming the key, the expected type and how to write it."""
        if not overrides:
            return self
        hints = typing.get_type_hints(type(self))
        names = self._field_names()
        checked = {}
        for key, value in overrides.items():
            if key not in names:
                raise ConfigError(unknown_key_message(type(self).__name__, key, names, source))
            checked[key] = check_value(key, value, hints[key], source)
        return dataclasses.replace(self, **checked)


def unknown_key_message(kind: str, key: str, names: typing.Sequence[str], source: str) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {source} {close[0]}=...? " if close else ""
    return f"{source}: {kind} has no key {key!r}; {hint}keys: {', '.join(sorted(names))}"


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is tuple:
        return f"a list of {type_name(args[0])}"
    return "None" if tp is type(None) else tp.__name__


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value converted to `tp`)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return (value in args and type(value) in {type(a) for a in args}), value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_coerce(v, args[0]) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if tp is type(None):
        return value is None, value
    if tp is float:  # an int is a float, but a bool is neither
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, tp), value


def _example(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is Literal:
        return str(args[0])
    if typing.get_origin(tp) is tuple:
        return "[" + _example(args[0]) + "]"
    if args:
        return _example(args[0])
    return {int: "50", float: "0.5", bool: "True", str: "text"}.get(tp, "...")


def check_value(key: str, value: Any, tp: Any, source: str = "--set") -> Any:
    """`value` as field type `tp`, or a one-line `ValueError`."""
    ok, out = _coerce(value, tp)
    if not ok:
        raise ConfigError(f"{source} {key}: expected {type_name(tp)}, got {value!r} "
                         f"({type(value).__name__}); write e.g. {source} {key}={_example(tp)}")
    return out


# --------------------------------------------------------------------------------------------
# The config types
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingConfig(Config):
    """Cones 2 layout-guided sampling (`sample.py`)."""

    preset: str
    scheduler: str                     # ddim | euler | dpmpp_2m (schedulers.KINDS)
    timestep_spacing: str | None       # None: the model's own scheduler config
    steps: int
    cfg_scale: float
    self_recurrence: bool              # redo each guided step after re-noising to its level
    guidance_steps: int                # steps [0, guidance_steps) are guided
    guidance_weight: float             # λ of Eq. 7
    weight_positive: float             # γ⁺: default strength of a layout subject that gives none
    weight_negative: float             # γ⁻ everywhere outside a subject's region
    guidance_sigmas: Literal["separate", "sampler"]


@dataclasses.dataclass(frozen=True)
class ResidualConfig(Config):
    """Cones 2 residual training (`train.py residual`); `reg` picks which regulariser's keys count."""

    preset: str
    instance_prompt: str               # "{}" is the category word
    reg: Literal["official", "paper"]
    delta_prompts: Literal["templates", "sentences"]
    lr: float
    steps: int
    batch: int
    resolution: int
    crop: Literal["random", "center"]
    lambda_start: float = 1e-2         # reg="official": λ1 · ‖E′[0] − E[0]‖₂
    lambda_rest: float = 1e-3          # reg="official": λ2 · ‖E′[1+n:] − E[1+n:]‖_F
    reg_lambda: float = 1.0            # reg="paper": λ of Eq. 4
    reg_batch: int = 4                 # reg="paper": sentences per step
    num_sentences: int = 1000
    sentence_seed: int = 0
    # delta_prompts="templates": the prompts Δ is averaged over, each with one "{}" for the word;
    # empty means textual inversion's 27 (the official code's). A model whose text encoder never
    # read "a photo of" averages better over its own captions' wording.
    delta_templates: tuple[str, ...] = ()
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # Many-subject runs (`--subjects`): devices that share one copy of the frozen UNet (FSDP-style,
    # each holds 1/model_parallel of it); 1 replicates it on every device. Must divide the device count.
    model_parallel: int = 1


@dataclasses.dataclass(frozen=True)
class NeuronsConfig(Config):
    """Cones concept-neuron search (`train.py neurons`, `train.py neurons-joint`)."""

    identifier: str
    instance_prompt: str               # "{identifier}", "{cls}"
    class_prompt: str                  # "{cls}"
    prior_weight: float
    num_class_images: int
    class_steps: int
    class_cfg: float
    search: tuple[str, ...]            # regexes over UNet parameter paths
    rho: float
    steps: int
    batch: int
    tau: float | None
    sparsity: float
    joint_tau: float
    resolution: int | None             # None: the model's native size
    crop: Literal["random", "center"]
    seed: int
    checkpoint_every: int
    keep_checkpoints: int
    # Many-subject runs (`train_neurons_many`): devices that hold one copy of the frozen UNet between
    # them (FSDP over the `model` mesh axis); 1 replicates it on every device.
    model_parallel: int = 1


@dataclasses.dataclass(frozen=True)
class DemoLineageConfig(Config):
    """The sittings that made the shipped demo model (`python -m cones_jax.demo.retrain`): each a dict
    of `name` and `runs`, the `cones_jax.demo.base_model` flags of each invocation."""

    sittings: tuple[dict, ...]


@dataclasses.dataclass(frozen=True)
class DemoModelConfig(Config):
    """The demo base model's training recipe (`python -m cones_jax.demo.base_model`)."""

    scenes: int
    vae_steps: int
    vae_batch: int
    vae_lr: float
    kl_weight: float
    steps: int
    batch: int
    lr: float
    single_object_fraction: float
    multi_object_fraction: float
    scene_sizes: Literal["words", "continuous"]
    weighting: Literal["clipped_v", "min_snr"]
    timestep_power: float
    grounding_weight: float
    grounding_pixel_weight: float
    max_length: int                    # text tokens
    text_width: int                    # text encoder width = UNet cross-attention dim
    latent_factor: int                 # image pixels per latent pixel


# --------------------------------------------------------------------------------------------
# Loading and overriding
# --------------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    """Names of the presets in the package (what `load_config` takes besides a path)."""
    names = [p.name[:-3] for p in resources.files(CONFIG_PACKAGE).iterdir()
             if p.name.endswith(".py") and not p.name.startswith("_")]
    return sorted(names + list(PRESETS))


def _module(name_or_path: str):
    name = PRESETS.get(name_or_path, name_or_path)
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise ConfigError(f"config file {name!r} not found; use one of {', '.join(preset_names())} "
                             "or the path of a .py file with get_config()")
        spec = importlib.util.spec_from_file_location(f"cones_jax_config_{os.path.basename(name)[:-3]}", name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if name not in preset_names():
        close = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown config {name_or_path!r}; {hint}use one of {', '.join(preset_names())} "
                         "or the path of a .py file with get_config()")
    return importlib.import_module(f"{CONFIG_PACKAGE}.{name}")


def load_config(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> Config:
    """`official`/`paper`, a preset name of `cones_jax.configs`, or a path to a .py config file,
    with `overrides` (key -> value) checked against the config's fields."""
    cfg = _module(name_or_path).get_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"config {name_or_path!r}: get_config() returned a {type(cfg).__name__}; return a typed "
                         "config from cones_jax.config (e.g. load_config('official').replace(steps=30))")
    return cfg.override(overrides)


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` with a Python literal value (strings may be bare; `Config.override` checks types)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like key=value, e.g. --set steps=30")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def parse_overrides(items: typing.Iterable[str]) -> dict[str, object]:
    """Every `--set key=value` of a command line, in order (a later one wins)."""
    return dict(parse_override(s) for s in items)


LAYOUT_KEYS = ("guidance_steps", "guidance_weight", "weight_negative")


def resolve_sampling(preset: str, layout: Any = None, flags: Mapping[str, Any] | None = None) -> tuple[Config, Any]:
    """The sampling config and the layout with every default filled in, by one precedence:
    preset < layout file < flags (`--set` and the convenience flags, which are the same keys).

    The layout's top-level `guidance_steps`, `guidance_weight` and `weight_negative` override the
    preset; a subject's γ⁺ is its own `strength` if the layout gives one, else `weight_positive`.
    The returned layout carries the resolved values, so whatever reads it agrees with the config.
    """
    cfg = load_config(preset)
    if layout is None:
        return cfg.override(flags), None
    from_layout = {k: getattr(layout, k) for k in LAYOUT_KEYS if getattr(layout, k, None) is not None}
    cfg = cfg.override(from_layout, source=f"{layout.source}:").override(flags)
    subjects = tuple(s if s.strength is not None else dataclasses.replace(s, strength=cfg.weight_positive)
                     for s in layout.subjects)
    layout = dataclasses.replace(layout, subjects=subjects,
                                 **{k: cfg[k] for k in LAYOUT_KEYS})
    return cfg, layout
