"""Small artifacts, each a safetensors file with string metadata: a subject's residual token
embedding (Cones 2) and a set of concept neurons (Cones, a `.cones` file).

Residual
--------
A residual file holds one tensor, `residual` [n, d] float32 (one row per sub-word of the subject
word), and string metadata:

  format        "cones_jax.residual"
  version       "1"
  word          the subject's category word, e.g. "dog"
  token_ids     JSON list of the word's n sub-word token ids
  dim           d, the text encoder's width
  text_encoder  fingerprint of the base text encoder (`StableDiffusion.text_encoder_fingerprint`)
  preset        how it was trained ("official", "paper", "imported")

Concept neurons
---------------
A `.cones` file holds, per searched UNet tensor (named by its "/"-joined Flax path), the sorted flat
indices of its shut neurons as one uint8 tensor: delta-coded LEB128 varints or a bitmap, deflated,
whichever is smaller. Its metadata:

  format        "cones_jax.neurons"
  version       "1"
  unet          fingerprint of the base UNet (`StableDiffusion.unet_fingerprint`)
  tensors       JSON {path: {"shape": [...], "count": n, "encoding": "delta" or "bitmap"}}
  identifiers   JSON list of the identifier tokens, e.g. ["sks"]
  classes       JSON list of the class words, e.g. ["dog"]
  ...           anything else the search recorded (steps, tau, ...), kept in `ConceptNeurons.meta`

Neuron scores
-------------
`train.py neurons --keep-scores` also writes, beside each `.cones` file, the search's scores M_p
(`NAME.scores.safetensors`): one float32 tensor per searched UNet tensor, of its shape, and the
metadata of a `.cones` file without `tensors` and `tau` (format "cones_jax.neuron_scores").
`train.py neurons-cut` picks neurons from it at another τ or sparsity without searching again: the
search is the costly part, and the cut is the knob tuned per model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
import zlib

import numpy as np

from cones_jax.errors import ArtifactError, NeuronsError, NeuronsFileError  # noqa: F401 (re-exported)
from cones_jax.fileio import CheckpointError, load_safetensors, read_torch_tensor, refuse_pickle, save_safetensors

RESIDUAL_FORMAT = "cones_jax.residual"
NEURONS_FORMAT = "cones_jax.neurons"
SCORES_FORMAT = "cones_jax.neuron_scores"
SCORES_SUFFIX = ".scores.safetensors"


@dataclasses.dataclass(frozen=True)
class Residual:
    delta: np.ndarray  # [n, d]
    word: str
    token_ids: tuple[int, ...]
    text_encoder: str = ""
    preset: str = ""
    path: str = ""

    @property
    def dim(self) -> int:
        return int(self.delta.shape[-1])


def save_residual(path: str, residual: Residual, extra: dict | None = None) -> None:
    delta = np.asarray(residual.delta, np.float32)
    if delta.ndim != 2:
        raise ArtifactError(f"a residual is [n, d], got shape {delta.shape}")
    meta = {"format": RESIDUAL_FORMAT, "version": "1", "word": residual.word,
            "token_ids": json.dumps(list(map(int, residual.token_ids))), "dim": str(delta.shape[1]),
            "text_encoder": residual.text_encoder, "preset": residual.preset}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    save_safetensors(path, {"residual": delta}, meta)


def _load_official_pt(path: str) -> np.ndarray:
    try:
        return read_torch_tensor(path).astype(np.float32).reshape(1, -1)
    except CheckpointError as e:
        raise ArtifactError(f"{e} (the official Cones-V2 residual format is a bare tensor)") from None


def load_residual(path: str, *, word: str | None = None, dim: int | None = None, text_encoder: str | None = None,
                  allow_pickle: bool = False) -> Residual:
    """Reads a residual; checks its values are finite, and checks it against the model's
    text-encoder width (`dim`, known from the model's config.json before loading) and identity
    (`text_encoder`, the fingerprint, known once the model is loaded).

    An official Cones-V2 `.pt` file (a pickled bare [1, 1024] tensor) is imported only with
    `allow_pickle=True`; it carries no metadata, so `word` must be given.
    """
    if not os.path.isfile(path):
        raise ArtifactError(f"residual file {path} does not exist")
    if path.endswith((".pt", ".pth", ".bin")):
        refuse_pickle(path, allow_pickle, "a .safetensors residual written by `train.py residual`")
        if not word:
            raise ArtifactError(f"{path}: an official .pt residual has no metadata; say which word it is for")
        res = Residual(_load_official_pt(path), word, (), "", "imported", path)
    else:
        try:
            tensors, meta = load_safetensors(path)
        except CheckpointError as e:
            raise ArtifactError(str(e)) from None
        if meta.get("format") != RESIDUAL_FORMAT or "residual" not in tensors:
            raise ArtifactError(f"{path} is not a cones_jax residual file (format={meta.get('format')!r})")
        try:
            token_ids = tuple(json.loads(meta.get("token_ids", "[]")))
        except json.JSONDecodeError:
            raise ArtifactError(f"{path}: corrupt token_ids metadata") from None
        res = Residual(np.array(tensors["residual"], np.float32), meta.get("word", ""), token_ids,
                       meta.get("text_encoder", ""), meta.get("preset", ""), path)
        if word is not None and res.word and res.word != word:
            warnings.warn(f"{path} was trained for the word {res.word!r} but is used for {word!r}", stacklevel=2)
    if res.delta.ndim != 2 or not res.delta.size:
        raise ArtifactError(f"{path}: a residual is [n, d], got shape {res.delta.shape}; the file is corrupt")
    if not np.isfinite(res.delta).all():
        raise ArtifactError(f"{path} holds {np.count_nonzero(~np.isfinite(res.delta))} NaN or Inf value(s); the "
                            "training that wrote it diverged: train it again with a lower learning rate")
    if dim is not None and res.dim != dim:
        raise ArtifactError(f"{path} is a residual for a {res.dim}-d text encoder but this model's is {dim}-d; "
                            "train a residual for this base model")
    if text_encoder and res.text_encoder and res.text_encoder != text_encoder:
        # same width, other weights: the embedding offsets mean nothing to this text encoder
        raise ArtifactError(f"{path} was trained on another base model (text encoder {res.text_encoder}, this "
                            f"one is {text_encoder}); train a residual for this base model")
    return res


# --------------------------------------------------------------------------------------------
# Concept neurons
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConceptNeurons:
    """One `.cones` file: the shut neurons of one subject (or of a joint fine-tune of several)."""

    indices: dict[str, np.ndarray]   # path -> sorted flat indices of shut weights
    shapes: dict[str, tuple[int, ...]]
    identifiers: tuple[str, ...]     # e.g. ("sks",)
    classes: tuple[str, ...]         # e.g. ("dog",)
    unet: str = ""                   # fingerprint of the base UNet
    meta: dict = dataclasses.field(default_factory=dict)
    path: str = ""

    @property
    def count(self) -> int:
        return int(sum(len(v) for v in self.indices.values()))

    @property
    def searched(self) -> int:
        return int(sum(np.prod(s) for s in self.shapes.values()))


def _varints(values: np.ndarray) -> bytes:
    """LEB128 varints of non-negative integers (deltas of sorted indices)."""
    if len(values) and int(np.min(values)) < 0:
        raise ValueError("indices must be sorted (negative delta)")
    out = bytearray()
    for v in values.tolist():
        while True:
            byte = v & 0x7F
            v >>= 7
            if v:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
    return bytes(out)


def _from_varints(raw: bytes, count: int) -> np.ndarray:
    vals, v, shift = [], 0, 0
    for byte in raw:
        v |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
        else:
            vals.append(v)
            v, shift = 0, 0
    if len(vals) != count or shift:
        raise ValueError("truncated index stream")
    return np.array(vals, np.int64)


def encode_indices(indices: np.ndarray, size: int) -> tuple[bytes, str]:
    """Sorted unique flat indices -> (bytes, encoding): delta-coded varints or a bitmap, deflated;
    the smaller wins (deltas for sparse sets, the bitmap past a few percent)."""
    idx = np.asarray(indices, np.int64)
    delta = zlib.compress(_varints(np.diff(idx, prepend=0)), 9)
    bits = np.zeros(size, bool)
    bits[idx] = True
    bitmap = zlib.compress(np.packbits(bits).tobytes(), 9)
    return (delta, "delta") if len(delta) <= len(bitmap) else (bitmap, "bitmap")


def decode_indices(raw: bytes, encoding: str, count: int, size: int, where: str) -> np.ndarray:
    """The inverse of `encode_indices`; `where` names the tensor in error messages."""
    try:
        data = zlib.decompress(raw)
        if encoding == "delta":
            idx = np.cumsum(_from_varints(data, count))
        elif encoding == "bitmap":
            idx = np.flatnonzero(np.unpackbits(np.frombuffer(data, np.uint8))[:size]).astype(np.int64)
        else:
            raise ValueError(f"unknown encoding {encoding!r}")
    except (zlib.error, ValueError) as e:
        raise NeuronsFileError(f"{where}: corrupt index data ({e})") from None
    return check_indices(idx, count, size, where)


def check_indices(idx: np.ndarray, count: int, size: int, where: str) -> np.ndarray:
    """`idx` itself when it holds `count` sorted unique indices into a tensor of `size` weights."""
    if len(idx) != count:
        raise NeuronsFileError(f"{where}: holds {len(idx)} indices but says {count}")
    if len(idx) and (idx.min() < 0 or idx.max() >= size):
        raise NeuronsFileError(f"{where}: index {int(idx.max() if idx.max() >= size else idx.min())} is out of range "
                               f"for a tensor of {size} weights; the file is corrupt or for another model")
    if np.any(np.diff(idx) <= 0):
        raise NeuronsFileError(f"{where}: indices overlap or are unsorted; the file is corrupt")
    return idx


def save_neurons(path: str, cn: ConceptNeurons) -> None:
    """Writes `cn` as a `.cones` file (atomically); its indices are checked first."""
    tensors, table = {}, {}
    for k in sorted(cn.indices):
        size = int(np.prod(cn.shapes[k]))
        idx = check_indices(np.asarray(cn.indices[k], np.int64), len(cn.indices[k]), size, k)
        raw, enc = encode_indices(idx, size)
        tensors[k] = np.frombuffer(raw, np.uint8)
        table[k] = {"shape": list(cn.shapes[k]), "count": int(len(idx)), "encoding": enc}
    meta = {"format": NEURONS_FORMAT, "version": "1", "unet": cn.unet, "tensors": json.dumps(table),
            "identifiers": json.dumps(list(cn.identifiers)), "classes": json.dumps(list(cn.classes)),
            **{k: str(v) for k, v in cn.meta.items()}}
    save_safetensors(path, tensors, meta)


def _read_subject_file(path: str, fmt: str, kind: str, *, missing_fix: str = "",
                       format_fix: str = "") -> tuple[dict, dict, tuple, tuple]:
    """The opening that `.cones` and scores files share: exists, is safetensors, is `fmt` (a
    cones_jax `kind` file), has readable names. The fixes are appended to their errors."""
    if not os.path.isfile(path):
        raise NeuronsFileError(f"{kind} file {path} does not exist{missing_fix}")
    try:
        tensors, meta = load_safetensors(path)
    except CheckpointError as e:
        raise NeuronsFileError(str(e)) from None
    if meta.get("format") != fmt:
        raise NeuronsFileError(f"{path} is not a cones_jax {kind} file (format={meta.get('format')!r}){format_fix}")
    try:
        identifiers = tuple(json.loads(meta.get("identifiers", "[]")))
        classes = tuple(json.loads(meta.get("classes", "[]")))
    except json.JSONDecodeError:
        raise NeuronsFileError(f"{path}: corrupt metadata") from None
    return tensors, meta, identifiers, classes


def load_neurons(path: str, *, unet_fingerprint: str | None = None,
                 unet_shapes: dict[str, tuple[int, ...]] | None = None) -> ConceptNeurons:
    """Reads a `.cones` file; checks it against the base UNet (fingerprint and tensor shapes)."""
    tensors, meta, identifiers, classes = _read_subject_file(path, NEURONS_FORMAT, "concept-neuron")
    try:
        table = json.loads(meta["tensors"])
    except (KeyError, json.JSONDecodeError):
        raise NeuronsFileError(f"{path}: corrupt metadata") from None
    if unet_fingerprint and meta.get("unet") and meta["unet"] != unet_fingerprint:
        raise NeuronsFileError(f"{path} was found on another base model (UNet {meta['unet']}, this one is "
                               f"{unet_fingerprint}); search the neurons again on this model")
    indices, shapes = {}, {}
    for k, info in table.items():
        shape = tuple(int(s) for s in info["shape"])
        if unet_shapes is not None:
            if k not in unet_shapes:
                raise NeuronsFileError(f"{path}: tensor {k} is not in this UNet; the file is for another model")
            if tuple(unet_shapes[k]) != shape:
                raise NeuronsFileError(f"{path}: tensor {k} has shape {shape} here but {tuple(unet_shapes[k])} in this "
                                       "UNet; the file is for another model")
        if k not in tensors:
            raise NeuronsFileError(f"{path}: no index data for {k}")
        indices[k] = decode_indices(np.asarray(tensors[k]).tobytes(), info["encoding"], int(info["count"]),
                                    int(np.prod(shape)), f"{path}: {k}")
        shapes[k] = shape
    extra = {k: v for k, v in meta.items() if k not in ("format", "version", "unet", "tensors", "identifiers",
                                                         "classes")}
    return ConceptNeurons(indices, shapes, identifiers, classes, meta.get("unet", ""), extra, path)


# --------------------------------------------------------------------------------------------
# Neuron scores
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NeuronScores:
    """The scores M_p of one search, and what a `.cones` file cut from them records."""

    scores: dict[str, np.ndarray]    # path -> M_p, the shape of the searched tensor
    identifiers: tuple[str, ...]
    classes: tuple[str, ...]
    unet: str = ""
    meta: dict = dataclasses.field(default_factory=dict)  # rho, steps, batch
    path: str = ""


def scores_path(cones_path: str) -> str:
    """Where `--keep-scores` puts the scores of the search that wrote `cones_path`."""
    stem = cones_path[:-len(".cones")] if cones_path.endswith(".cones") else cones_path
    return stem + SCORES_SUFFIX


def save_neuron_scores(path: str, ns: NeuronScores) -> None:
    """Writes `ns` (atomically)."""
    meta = {"format": SCORES_FORMAT, "version": "1", "unet": ns.unet,
            "identifiers": json.dumps(list(ns.identifiers)), "classes": json.dumps(list(ns.classes)),
            **{k: str(v) for k, v in ns.meta.items()}}
    save_safetensors(path, {k: np.asarray(v, np.float32) for k, v in ns.scores.items()}, meta)


def load_neuron_scores(path: str) -> NeuronScores:
    """Reads a scores file written by `train.py neurons --keep-scores`."""
    tensors, meta, identifiers, classes = _read_subject_file(
        path, SCORES_FORMAT, "neuron-scores", missing_fix="; write one with train.py neurons --keep-scores",
        format_fix=f"; give the {SCORES_SUFFIX} file that train.py neurons --keep-scores wrote")
    scores = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    if not scores or not all(np.isfinite(v).all() for v in scores.values()):
        raise NeuronsFileError(f"{path}: no scores, or scores that are not finite; the file is corrupt")
    extra = {k: v for k, v in meta.items() if k not in ("format", "version", "unet", "identifiers", "classes")}
    return NeuronScores(scores, identifiers, classes, meta.get("unet", ""), extra, path)
