"""PyTorch state dict <-> Flax params, by a handful of mechanical rules, every shape checked both ways.

Our Flax modules are named after the PyTorch module paths (`down_blocks_0/resnets_1/conv1`), so a
PyTorch key maps to a Flax path by joining each list index onto the name before it
(`down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/kernel`). The leaf rule
comes from what the target tree holds at that path:

  kernel of a Conv   (4-D)  <- weight OIHW, transposed to HWIO
  kernel of a Dense  (2-D)  <- weight [out, in] transposed (a 1x1 conv weight [out, in, 1, 1] too)
  scale of a norm           <- weight
  embedding of an Embed     <- weight
  bias                      <- bias

The target tree comes from `jax.eval_shape(module.init, ...)`: no weights are created to learn it.
`to_state_dict` runs the rules backwards (Flax path -> PyTorch key, HWIO -> OIHW, `.T`) to write
folders that diffusers loads, and checks every shape again.
This module is pure: numpy in, numpy out; no file access, no jax device work.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from cones_jax.fileio import CheckpointError

_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """`a.b.0.c.weight` -> ('a', 'b_0', 'c', 'weight')."""
    return tuple(_INDEX.sub(r"_\1", key).split("."))


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


class Fingerprint:
    """A short stable identity of a params tree, to tie artifacts (residuals, concept neurons) to a base
    model: a SHA-256 over every path and shape, and the fp32 values of the small tensors (norms, biases,
    position embeddings), enough to tell models apart without hashing gigabytes. Fed leaf by leaf in
    sorted path order; `convert_state_dict` feeds it the tensors as stored, so that the identity does not
    depend on the dtype a model is loaded in."""

    SMALL = 1 << 20  # elements: tensors up to this size have their values hashed

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, path: tuple[str, ...], value: np.ndarray) -> None:
        self._hash.update("/".join(path).encode() + str(tuple(value.shape)).encode())
        if value.size <= self.SMALL:
            self._hash.update(np.asarray(value, dtype=np.float32).tobytes())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()[:16]


def _leaf(target_leaves: Mapping, module_path: tuple[str, ...], torch_leaf: str, value: np.ndarray):
    """Returns (flax path, converted value) for one PyTorch tensor, or None if no target matches."""
    if torch_leaf == "bias":
        path = module_path + ("bias",)
        return (path, value) if path in target_leaves else None
    if torch_leaf != "weight":
        return None
    for name in ("kernel", "scale", "embedding"):
        path = module_path + (name,)
        if path not in target_leaves:
            continue
        if name != "kernel":
            return path, value
        rank = len(target_leaves[path].shape)
        if rank == 4 and value.ndim == 4:
            return path, np.transpose(value, (2, 3, 1, 0))
        if rank == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
            return path, value[:, :, 0, 0].T
        if rank == 2 and value.ndim == 2:
            return path, value.T
        return path, value  # rank mismatch: reported by the shape check
    return None


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    target: Mapping,
    *,
    rename: Callable[[str], str | None] = lambda k: k,
    dtype: npt.DTypeLike | None = None,
    component: str = "model",
    put: Callable[[np.ndarray], object] = lambda x: x,
    fingerprint: Fingerprint | None = None,
) -> dict:
    """Converts a PyTorch-named state dict to a Flax params tree shaped like `target`.

    Args:
      state: PyTorch key -> array (may be memory-mapped; each is read once).
      target: params tree of shape/dtype structs (from `jax.eval_shape`); leaves need `.shape`.
      rename: maps a checkpoint key to our canonical PyTorch key, or None to drop it (buffers such
        as `position_ids`, legacy names).
      dtype: cast every floating tensor to this dtype (None keeps the target's dtype).
      component: name used in error messages ("unet", "vae", ...).
      put: called on each converted array (e.g. `jax.device_put`) so that host copies are freed
        tensor by tensor.
      fingerprint: if given, fed every converted tensor before the cast to `dtype`, in sorted path
        order, so that its digest is that of the weights as stored whatever dtype they are loaded in.

    Raises:
      CheckpointError naming the first missing, unexpected or mis-shaped keys.
    """
    target_leaves = flatten(target)
    # First where each tensor goes (transposes of memory-mapped tensors are views: nothing is read yet),
    # then the values in path order, the order a fingerprint hashes them in.
    found: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched = [], []
    for key in state:
        canonical = rename(key)
        if canonical is None:
            continue
        parts = torch_key_to_path(canonical)
        hit = _leaf(target_leaves, parts[:-1], parts[-1], state[key])
        if hit is None:
            unexpected.append(key)
            continue
        path, value = hit
        want = tuple(target_leaves[path].shape)
        if tuple(value.shape) != want:
            mismatched.append(f"{key} has shape {tuple(state[key].shape)}, expected {want} for {'/'.join(path)}")
            continue
        found[path] = value
    missing = [p for p in target_leaves if p not in found]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} mis-shaped tensor(s): " + "; ".join(mismatched[:3]))
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): " + ", ".join("/".join(p) for p in missing[:3]))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): " + ", ".join(unexpected[:3]))
    if problems:
        raise CheckpointError(f"{component} weights do not match its config: " + " | ".join(problems))
    out: dict[tuple[str, ...], object] = {}
    for path in sorted(found):
        value = found.pop(path)
        if fingerprint is not None:
            fingerprint.update(path, value)
        want_dtype = dtype if dtype is not None else target_leaves[path].dtype
        if np.issubdtype(np.asarray(value).dtype, np.floating) or value.dtype.name == "bfloat16":
            value = np.asarray(value).astype(want_dtype)
        out[path] = put(np.ascontiguousarray(value))
    return unflatten(out)


# --------------------------------------------------------------------------------------------
# The inverse: Flax params -> PyTorch state dict (to write folders that diffusers loads)
# --------------------------------------------------------------------------------------------

_NOT_LISTS = ("linear_1", "linear_2")  # TimestepEmbedding's own names, not list entries


def path_to_torch_key(path: tuple[str, ...]) -> str:
    """Flax path -> PyTorch key, the inverse of `torch_key_to_path`
    (`down_blocks_0/resnets_1/conv1/kernel` -> `down_blocks.0.resnets.1.conv1.weight`)."""
    parts = [p if p in _NOT_LISTS else re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
    leaf = "bias" if path[-1] == "bias" else "weight"
    return ".".join(parts + [leaf])


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] != "kernel":
        return shape
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]


def state_dict_template(params: Mapping) -> dict[str, tuple[int, ...]]:
    """PyTorch key -> PyTorch shape for a Flax params tree of our modules (kernels HWIO -> OIHW,
    [in, out] -> [out, in]). Two Flax leaves that would share a key are an error."""
    out: dict[str, tuple[int, ...]] = {}
    for path, leaf in flatten(params).items():
        key = path_to_torch_key(path)
        if key in out:
            raise CheckpointError(f"two parameters map to the PyTorch key {key} (one is {'/'.join(path)})")
        out[key] = _torch_shape(path, tuple(leaf.shape))
    return out


def _torch_leaf(leaves: Mapping, key: str) -> tuple[tuple[str, ...], np.ndarray] | None:
    """(Flax path, value in PyTorch layout) for one PyTorch key, or None if no Flax leaf matches."""
    parts = torch_key_to_path(key)
    module, leaf = parts[:-1], parts[-1]
    names = ("bias",) if leaf == "bias" else ("kernel", "scale", "embedding") if leaf == "weight" else ()
    for name in names:
        path = module + (name,)
        if path in leaves:
            v = np.asarray(leaves[path])
            if name == "kernel":
                v = np.transpose(v, (3, 2, 0, 1)) if v.ndim == 4 else v.T
            return path, v
    return None


def params_to_state_dict(params: Mapping, template: Mapping[str, tuple[int, ...]], *,
                         component: str = "model") -> dict[str, np.ndarray]:
    """Inverse of `convert_state_dict`: `template` maps each PyTorch key to its PyTorch shape.

    Every shape is checked, as on the way in: a key with no Flax parameter, a converted tensor of
    another shape (a Dense kernel may fill a 1x1 conv weight [out, in, 1, 1]) and a Flax parameter
    that no key takes are a `CheckpointError` naming the first few. Used to write checkpoints that
    PyTorch diffusers can load (the bundled demo model) and by round-trip tests.
    """
    leaves = flatten(params)
    out, used = {}, set()
    missing, mismatched = [], []
    for key, want in template.items():
        hit = _torch_leaf(leaves, key)
        if hit is None:
            missing.append(key)
            continue
        path, value = hit
        want = tuple(want)
        if value.shape != want and not (value.ndim == 2 and want == (*value.shape, 1, 1)):
            mismatched.append(f"{'/'.join(path)} gives {value.shape}, expected {want} for {key}")
            continue
        out[key] = value.reshape(want)
        used.add(path)
    unused = [p for p in leaves if p not in used]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} mis-shaped tensor(s): " + "; ".join(mismatched[:3]))
    if missing:
        problems.append(f"{len(missing)} key(s) with no Flax parameter: " + ", ".join(missing[:3]))
    if unused:
        problems.append(f"{len(unused)} Flax parameter(s) no key takes: " + ", ".join("/".join(p) for p in unused[:3]))
    if problems:
        raise CheckpointError(f"{component} params do not match the PyTorch template: " + " | ".join(problems))
    return out


def to_state_dict(params: Mapping, prefix: str = "", dtype: npt.DTypeLike = np.float32, *,
                  component: str = "model") -> dict[str, np.ndarray]:
    """A Flax params tree of our modules as a PyTorch state dict (contiguous `dtype` arrays, keys
    prefixed with `prefix`, e.g. "text_model." for transformers' CLIPTextModel)."""
    state = params_to_state_dict(params, state_dict_template(params), component=component)
    return {prefix + k: np.ascontiguousarray(v, dtype) for k, v in state.items()}
