"""Small artifacts: a subject's residual token embedding (Cones 2) as a few-KB safetensors file.

A residual file holds one tensor, `residual` [n, d] float32 (one row per sub-word of the subject
word), and string metadata:

  format        "cones_jax.residual"
  version       "1"
  word          the subject's category word, e.g. "dog"
  token_ids     JSON list of the word's n sub-word token ids
  dim           d, the text encoder's width
  text_encoder  fingerprint of the base text encoder (`StableDiffusion.text_encoder_fingerprint`)
  preset        how it was trained ("official", "paper", "imported")
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import numpy as np

from cones_jax.fileio import CheckpointError, load_safetensors, read_torch_tensor, refuse_pickle, save_safetensors

RESIDUAL_FORMAT = "cones_jax.residual"


class ArtifactError(ValueError):
    """An artifact does not fit the model or is malformed (one-line message)."""


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
        raise ValueError(f"a residual is [n, d], got shape {delta.shape}")
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
    """Reads a residual; checks it against the model's text-encoder width and identity.

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
    if dim is not None and res.dim != dim:
        raise ArtifactError(f"{path} is a residual for a {res.dim}-d text encoder but this model's is {dim}-d; "
                            "train a residual for this base model")
    if text_encoder and res.text_encoder and res.text_encoder != text_encoder:
        warnings.warn(f"{path} was trained on another base text encoder ({res.text_encoder} vs {text_encoder}); "
                      "results may be poor", stacklevel=2)
    return res
