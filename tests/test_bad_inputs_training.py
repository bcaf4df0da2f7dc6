"""Bad input to `train.py residual`, `train.py neurons` and training configs, as a new user would
give it: each case ends with its exit code, one line on stderr naming the problem, and nothing
created or changed where the output would go. Every check runs before the model loads, so the
cases run `main()` in-process and never compile.

The image checks, the 16-bit PNG reader and the model's own training defaults are tested here too.
"""

import os

import numpy as np
import pytest
from PIL import Image

from cones_jax import bundled, training
from cones_jax import train as train_cli

DEMO = bundled.demo_model()


def _image(path, size=(64, 64), mode="RGB"):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)


@pytest.fixture
def world(tmp_path):
    """An output folder holding one existing file, and the image folders of the cases."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.safetensors").write_bytes(b"keep me")
    (out / "kept.cones").write_bytes(b"keep me too")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        _image(photos / name)
    folders = {"photos": photos}
    for name in ("empty", "text_only", "broken", "tiny"):
        folders[name] = tmp_path / name
        folders[name].mkdir()
    (folders["text_only"] / "notes.txt").write_text("no image here")
    (folders["broken"] / "x.png").write_bytes(b"not a png at all")
    _image(folders["tiny"] / "one_pixel.png", size=(1, 1))
    (tmp_path / "a_file.png").write_bytes(b"")
    return tmp_path, out, {k: str(v) for k, v in folders.items()}


def _snapshot(folder):
    return {name: (os.path.getmtime(os.path.join(folder, name)), open(os.path.join(folder, name), "rb").read())
            for name in sorted(os.listdir(folder))}


def _residual(tmp, out, folders, *extra, images="photos", word="star", name="star.safetensors"):
    argv = ["residual", "--model", DEMO, "--word", word, "--out", str(out / name), "--no-progress"]
    if images:
        argv += ["--images", folders.get(images, images)]
    return argv + list(extra)


def _neurons(tmp, out, folders, *extra, images="photos", cls="dog", name="dog.cones"):
    return ["neurons", "--model", DEMO, "--class", cls, "--out", str(out / name), "--images",
            folders.get(images, images), "--no-progress"] + list(extra)


# (name, argv builder, exit code, a word the error line must hold)
CASES = [
    ("steps 0", lambda t, o, f: _residual(t, o, f, "--steps", "0"), 2, "--steps"),
    ("steps -5", lambda t, o, f: _residual(t, o, f, "--steps", "-5"), 2, "--steps"),
    ("batch -1", lambda t, o, f: _residual(t, o, f, "--batch", "-1"), 2, "--batch"),
    ("lr nan by --set", lambda t, o, f: _residual(t, o, f, "--set", "lr=nan"), 2, "lr"),
    ("lr nan", lambda t, o, f: _residual(t, o, f, "--lr", "nan"), 2, "--lr"),
    ("lr inf", lambda t, o, f: _residual(t, o, f, "--lr", "inf"), 2, "--lr"),
    ("lr negative", lambda t, o, f: _residual(t, o, f, "--lr=-1e-4"), 2, "--lr"),
    ("resolution 0", lambda t, o, f: _residual(t, o, f, "--resolution", "0"), 2, "--resolution"),
    ("checkpoint every 0", lambda t, o, f: _residual(t, o, f, "--checkpoint-every", "0"), 2, "--checkpoint-every"),
    ("images is a file", lambda t, o, f: _residual(t, o, f, images=str(t / "a_file.png")), 2, "is a file"),
    ("images missing", lambda t, o, f: _residual(t, o, f, images=str(t / "nowhere")), 2, "does not exist"),
    ("images empty", lambda t, o, f: _residual(t, o, f, images="empty"), 2, "holds no images"),
    ("only text files", lambda t, o, f: _residual(t, o, f, images="text_only"), 2, "holds no images"),
    ("undecodable image", lambda t, o, f: _residual(t, o, f, images="broken"), 2, "cannot read image"),
    ("1x1 image", lambda t, o, f: _residual(t, o, f, images="tiny"), 2, "at least 32 px"),
    ("no --images", lambda t, o, f: _residual(t, o, f, images=None), 2, "--images"),
    ("word with punctuation", lambda t, o, f: _residual(t, o, f, word="star!"), 2, "'!'"),
    ("empty word", lambda t, o, f: _residual(t, o, f, word="  "), 2, "--word"),
    ("out exists", lambda t, o, f: _residual(t, o, f, name="kept.safetensors"), 2, "--overwrite"),
    ("out is a folder", lambda t, o, f: _residual(t, o, f, name=""), 2, "is a folder"),
    ("out suffix", lambda t, o, f: _residual(t, o, f, name="star.pt"), 2, ".safetensors"),
    ("out below a file", lambda t, o, f: _residual(t, o, f, name="kept.cones/star.safetensors"), 2, "is a file"),
    ("resume without dir", lambda t, o, f: _residual(t, o, f, "--resume"), 2, "--checkpoint-dir"),
    ("checkpoint dir is a file", lambda t, o, f: _residual(t, o, f, "--checkpoint-dir", str(o / "kept.cones")), 2,
     "--checkpoint-dir"),
    ("unknown config", lambda t, o, f: _residual(t, o, f, "--config", "cones2_train_dem"), 2, "cones2_train_demo"),
    ("missing config file", lambda t, o, f: _residual(t, o, f, "--config", str(t / "mine.py")), 2, "not found"),
    ("unknown --set key", lambda t, o, f: _residual(t, o, f, "--set", "stepz=3"), 2, "steps"),
    ("neurons steps 0", lambda t, o, f: _neurons(t, o, f, "--steps", "0"), 2, "--steps"),
    ("neurons rho nan", lambda t, o, f: _neurons(t, o, f, "--rho", "nan"), 2, "--rho"),
    ("neurons batch 0", lambda t, o, f: _neurons(t, o, f, "--batch", "0"), 2, "--batch"),
    ("neurons out exists", lambda t, o, f: _neurons(t, o, f, name="kept.cones"), 2, "--overwrite"),
    ("neurons out suffix", lambda t, o, f: _neurons(t, o, f, name="dog.safetensors"), 2, ".cones"),
    ("neurons class punctuation", lambda t, o, f: _neurons(t, o, f, cls="dog?"), 2, "--class"),
    ("neurons images is a file", lambda t, o, f: _neurons(t, o, f, images=str(t / "a_file.png")), 2, "is a file"),
    ("neurons 1x1 image", lambda t, o, f: _neurons(t, o, f, images="tiny"), 2, "at least 32 px"),
    ("neurons sparsity 2", lambda t, o, f: _neurons(t, o, f, "--sparsity", "2"), 2, "--sparsity"),
    ("neurons class images is a file", lambda t, o, f: _neurons(t, o, f, "--class-images", str(t / "a_file.png")), 2,
     "--class-images"),
]


@pytest.mark.parametrize("name,argv,code,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, capsys, monkeypatch, name, argv, code, needle):
    tmp, out, folders = world
    # Nothing may load a model: a case that gets that far fails here instead of compiling.
    monkeypatch.setattr("cones_jax.pipeline.load_pipeline",
                        lambda *a, **k: pytest.fail(f"{name}: the model was loaded before the check"))
    before = _snapshot(out)
    rc = train_cli.main(argv(tmp, out, folders))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, (name, err)
    assert len(err) == 1 and err[0].startswith("error: "), (name, err)
    assert needle in err[0], (name, err)
    assert _snapshot(out) == before, name


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(world, capsys):
    tmp, out, folders = world
    os.chmod(out, 0o555)
    try:
        rc = train_cli.main(_residual(tmp, out, folders))
    finally:
        os.chmod(out, 0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "not writable" in err[0], err


# ---------------------------------------------------------------------------------------------- images


def test_sixteen_bit_png_is_read_as_its_values(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64), (48, 1)).astype(np.uint16)
    path = str(tmp_path / "deep.png")
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(training.read_image(path))
    assert rgb.shape == (48, 64, 3)
    np.testing.assert_allclose(rgb[0, :, 0], np.round(ramp[0] / 257), atol=1)
    assert rgb.min() == 0 and rgb.max() == 255


def test_one_line_for_skipped_files_and_small_images(tmp_path, capsys):
    for name in ("a.png", "b.png"):
        _image(tmp_path / name, size=(40, 48))
    for name in ("x.txt", "y.json", "z.md", "w.csv"):
        (tmp_path / name).write_text("-")
    paths = training.check_images(str(tmp_path), resolution=64)
    assert [os.path.basename(p) for p in paths] == ["a.png", "b.png"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("warning: skipping 4 file(s)") and "..." in err[0]
    assert err[1].startswith("warning: 2 image(s)") and "64 px" in err[1]


# ---------------------------------------------------------------------------------------------- defaults


def test_the_demo_model_brings_its_own_training_configs():
    assert training.model_training_config(DEMO, "residual")[0] == "cones2_train_demo"
    assert training.model_training_config(DEMO, "neurons")[0] == "cones1_train_demo"


def test_other_models_train_at_their_native_resolution(tmp_path):
    import json

    for part, cfg in (("unet", {"sample_size": 96}), ("vae", {"block_out_channels": [1, 2, 3, 4]})):
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text(json.dumps(cfg))
    name, resolution, why = training.model_training_config(str(tmp_path), "residual")
    assert name is None and resolution == 768 and "96" in why
    # A model folder may name a preset, never a file to run.
    (tmp_path / training.MODEL_TRAINING_FILE).write_text(json.dumps({"residual": "evil.py"}))
    with pytest.raises(training.ConfigError, match="not a preset"):
        training.model_training_config(str(tmp_path), "residual")


def test_residual_cli_says_which_config_it_chose(tmp_path, capsys, monkeypatch):
    from cones_jax import residual

    def stop(*a, **k):
        raise training.DataError("stopped here")

    monkeypatch.setattr(residual, "setup_residual", stop)
    photos = tmp_path / "photos"
    photos.mkdir()
    _image(photos / "a.png")
    rc = train_cli.main(["residual", "--model", DEMO, "--images", str(photos), "--word", "star", "--out",
                         str(tmp_path / "s.safetensors"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[0].startswith("config: cones2_train_demo at 64 px"), err
