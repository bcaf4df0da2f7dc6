"""Local diffusers folder -> Flax modules, params, tokenizer and scheduler config.

Nothing here downloads anything: the caller names a folder in diffusers layout
(`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Mapping

import jax
import numpy as np
import numpy.typing as npt

from cones_jax import convert
from cones_jax.fileio import CheckpointError, load_safetensors

_SAFETENSORS_NAMES = ("diffusion_pytorch_model", "model")
_PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin", "model.ckpt")


def read_config(component_dir: str) -> dict:
    path = os.path.join(component_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{component_dir}: no config.json; is this a diffusers model folder component?")
    return read_json(path)


def read_json(path: str) -> dict:
    """A JSON file, or a one-line CheckpointError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def find_weights_file(component_dir: str, variant: str | None = None) -> str:
    """The component's safetensors file: `<name>.safetensors`, or `<name>.<variant>.safetensors`.

    With no variant asked for, a lone `.fp16` variant is used when it is the only file present.
    Pickle weights (.bin, .ckpt) are never read, whatever the command's --allow-pickle (which is
    about small official residuals): the message says how to convert them.
    """
    candidates = []
    for name in _SAFETENSORS_NAMES:
        if variant:
            candidates.append(f"{name}.{variant}.safetensors")
        candidates.append(f"{name}.safetensors")
        if not variant:
            candidates.append(f"{name}.fp16.safetensors")
    for c in candidates:
        path = os.path.join(component_dir, c)
        if os.path.isfile(path):
            return path
    if glob.glob(os.path.join(component_dir, "*.safetensors.index.json")):
        raise CheckpointError(f"{component_dir}: sharded safetensors checkpoints are not supported; "
                              "re-save the component with max_shard_size large enough for one file")
    for p in _PICKLE_NAMES:
        path = os.path.join(component_dir, p)
        if os.path.isfile(path):
            raise CheckpointError(
                f"{path} is a pickle checkpoint, which cones_jax never loads as model weights; convert the "
                "model to safetensors with diffusers (DiffusionPipeline.from_pretrained(folder)"
                ".save_pretrained(new_folder, safe_serialization=True))")
    raise CheckpointError(f"{component_dir}: no weights file (expected one of {', '.join(candidates)})")


def load_params(
    component_dir: str,
    target: Mapping,
    *,
    rename: Callable[[str], str | None] = lambda k: k,
    dtype: npt.DTypeLike | None = None,
    variant: str | None = None,
    component: str | None = None,
    fingerprint: convert.Fingerprint | None = None,
) -> dict:
    """Reads a component's safetensors weights into a params tree shaped like `target`.

    `target` is the tree of `jax.ShapeDtypeStruct` from `jax.eval_shape(module.init, ...)["params"]`.
    Tensors are memory-mapped and converted one at a time, so host memory holds at most the
    finished params plus one tensor in flight (about one copy of the weights, plus the page cache).
    A `fingerprint` is fed the weights as stored in the file, before the cast to `dtype`.
    """
    path = find_weights_file(component_dir, variant)
    state, _ = load_safetensors(path)
    return convert.convert_state_dict(
        state, target, rename=rename, dtype=dtype,
        component=component or os.path.basename(os.path.normpath(component_dir)),
        put=lambda x: jax.device_put(np.asarray(x)), fingerprint=fingerprint,
    )
