"""Many subjects in one residual run (`train.py residual --subjects`) on 8 fake CPU devices: each
subject's Δ equals its own single-subject run's, bad and finished subjects, config groups, resume."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from tiny_checkpoints import make_sd

from cones_jax import artifacts, residual
from cones_jax import train as train_cli

RES = 32
LR = 1e-3
STEPS = 3
WORDS = ("dog", "cat", "teddy bear")  # "teddy bear" is two tokens: Δ rows of different counts
SEEDS = (0, 5, 7)


def _images(folder, seed, n=2):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 32 + 8 * k, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{k}.png"))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sd"))
    make_sd(root, "sd1")
    photos = tmp_path_factory.mktemp("photos")
    folders = [_images(str(photos / w.replace(" ", "_")), 10 + i, n=2 + i) for i, w in enumerate(WORDS)]
    return root, folders


def _subjects_file(path, folders, words=WORDS, seeds=SEEDS, extra=None):
    items = [{"images": f, "word": w, "name": w.replace(" ", "_"), "overrides": {"seed": s}}
             for f, w, s in zip(folders, words, seeds)]
    for item, more in zip(items, extra or []):
        item["overrides"].update(more)
    with open(path, "w") as f:
        json.dump({"subjects": items}, f)
    return str(path)


def _cli(root, subjects, out_dir, *more):
    return train_cli.main(["residual", "--model", root, "--subjects", subjects, "--out-dir", str(out_dir),
                           "--preset", "official", "--resolution", str(RES), "--lr", str(LR), "--steps", str(STEPS),
                           "--no-progress", *more])


@pytest.fixture(scope="module")
def singles(tiny, tmp_path_factory):
    """Each subject trained alone, as `train_residual` does it."""
    root, folders = tiny
    out = tmp_path_factory.mktemp("singles")
    return {w.replace(" ", "_"): residual.train_residual(
        root, f, w, str(out / f"{w.replace(' ', '_')}.safetensors"), preset="official", steps=STEPS, lr=LR,
        resolution=RES, seed=s, progress=False).delta for f, w, s in zip(folders, WORDS, SEEDS)}


@pytest.fixture(scope="module")
def many(tiny, tmp_path_factory):
    root, folders = tiny
    tmp = tmp_path_factory.mktemp("many")
    out = tmp / "out"
    assert _cli(root, _subjects_file(tmp / "s.json", folders), out) == 0
    return out


def _close(a, b):
    scale = float(np.abs(b).max())
    assert scale > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)


def test_multi_subject_run_equals_single_runs(singles, many):
    assert sorted(os.listdir(many)) == ["cat.safetensors", "dog.safetensors", "teddy_bear.safetensors"]
    for name, delta in singles.items():
        got = artifacts.load_residual(str(many / f"{name}.safetensors"))
        assert got.delta.shape == delta.shape
        _close(got.delta, delta)
    assert artifacts.load_residual(str(many / "teddy_bear.safetensors")).delta.shape[0] == 2
