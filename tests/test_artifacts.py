"""The `.cones` codec of `cones_jax.artifacts` on its own, without a model: index coding, the
file round trip, and the one-line errors of a file that is corrupt or for another model."""

import json

import numpy as np
import pytest

from cones_jax import artifacts
from cones_jax.fileio import load_safetensors, save_safetensors

SHAPES = {"down_blocks_0/attn2/to_k/kernel": (32, 16), "mid_block/attn2/to_v/kernel": (3, 3, 8, 8)}


def _set(frac: float, seed: int = 0) -> artifacts.ConceptNeurons:
    rng = np.random.default_rng(seed)
    idx = {k: np.sort(rng.choice(int(np.prod(s)), max(1, int(frac * np.prod(s))), replace=False)).astype(np.int64)
           for k, s in SHAPES.items()}
    return artifacts.ConceptNeurons(idx, dict(SHAPES), ("sks",), ("dog",), "0123456789abcdef", {"steps": 7})


@pytest.mark.parametrize("indices", [[], [0], [3, 4, 5, 200, 511], list(range(0, 512, 2))])
def test_index_coding_round_trips(indices):
    idx = np.asarray(indices, np.int64)
    raw, enc = artifacts.encode_indices(idx, 512)
    np.testing.assert_array_equal(artifacts.decode_indices(raw, enc, len(idx), 512, "t"), idx)


def test_dense_sets_take_the_bitmap_and_sparse_ones_the_deltas():
    assert artifacts.encode_indices(np.arange(0, 4096, 2), 4096)[1] == "bitmap"
    assert artifacts.encode_indices(np.array([7, 900, 4000]), 4096)[1] == "delta"


@pytest.mark.parametrize("frac", [0.01, 0.5])
def test_file_round_trip(tmp_path, frac):
    cn = _set(frac)
    path = str(tmp_path / "a.cones")
    artifacts.save_neurons(path, cn)
    back = artifacts.load_neurons(path, unet_fingerprint=cn.unet, unet_shapes=SHAPES)
    assert back.shapes == SHAPES and back.identifiers == ("sks",) and back.classes == ("dog",)
    assert back.unet == cn.unet and back.meta == {"steps": "7"} and back.path == path
    for k in SHAPES:
        np.testing.assert_array_equal(back.indices[k], cn.indices[k])
    assert back.count == cn.count and back.searched == sum(int(np.prod(s)) for s in SHAPES.values())


def test_errors_name_the_problem(tmp_path):
    path = str(tmp_path / "a.cones")
    artifacts.save_neurons(path, _set(0.05))
    cases = [
        (dict(unet_fingerprint="fedcba9876543210"), "another base model"),
        (dict(unet_shapes={**SHAPES, "mid_block/attn2/to_v/kernel": (8, 8)}), "has shape"),
        (dict(unet_shapes={"down_blocks_0/attn2/to_k/kernel": (32, 16)}), "not in this UNet"),
    ]
    for kwargs, match in cases:
        with pytest.raises(artifacts.NeuronsFileError, match=match):
            artifacts.load_neurons(path, **kwargs)
    tensors, meta = load_safetensors(path)
    save_safetensors(str(tmp_path / "b.cones"), dict(tensors), dict(meta, tensors="{"))
    with pytest.raises(artifacts.NeuronsFileError, match="corrupt metadata"):
        artifacts.load_neurons(str(tmp_path / "b.cones"))
    table = json.loads(meta["tensors"])
    key = next(iter(SHAPES))
    save_safetensors(str(tmp_path / "c.cones"), dict(tensors),
                     dict(meta, tensors=json.dumps(dict(table, **{key: dict(table[key], count=3)}))))
    with pytest.raises(artifacts.NeuronsFileError, match="corrupt index data"):
        artifacts.load_neurons(str(tmp_path / "c.cones"))
    with pytest.raises(artifacts.NeuronsFileError, match="does not exist"):
        artifacts.load_neurons(str(tmp_path / "none.cones"))
    with pytest.raises(ValueError, match="sorted"):
        artifacts.encode_indices(np.array([5, 2]), 10)


def test_file_errors_are_neuron_and_artifact_errors():
    # the CLIs and callers that catch either keep working
    assert issubclass(artifacts.NeuronsFileError, artifacts.NeuronsError)
    assert issubclass(artifacts.NeuronsFileError, artifacts.ArtifactError)
