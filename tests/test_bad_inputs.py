"""Bad inputs a new user may try, each answered by one line on stderr, the right exit code, and
nothing created or changed where the outputs go (issue 22).

The sampling half: `sample.py` flags, `--out`, layouts, model folders and artifacts. Every case
runs `cones_jax.sample.main` in-process on the bundled demo model and stops before compiling: a
case that should fail before the model loads fails the test if the model is loaded, and no case
may compile the sampler.
"""

import json
import os
import shutil

import numpy as np
import pytest

from cones_jax import artifacts, bundled, sampling
from cones_jax import pipeline as pipeline_lib
from cones_jax import sample as sample_cli
from cones_jax.fileio import OutputLock

PROMPT = "a star and a heart on a grey background"
LAYOUT = {"prompt": PROMPT, "subjects": [{"word": "star", "box": [0.0, 0.2, 0.5, 0.8]},
                                         {"word": "heart", "box": [0.5, 0.2, 1.0, 0.8]}]}
DEMO_DIM = 96  # the demo text encoder's width


def _write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def _text(path, text):
    path.write_text(text)
    return str(path)


def _snapshot(folder):
    """Every file under `folder` with its bytes (None: the folder does not exist)."""
    if not os.path.exists(folder):
        return None
    if os.path.isfile(folder):
        return open(folder, "rb").read()
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def _model_copy(tmp_path, change=None):
    """The demo model as a folder of symlinks (weights) and copies (configs), then `change(folder)`."""
    root = tmp_path / "model"
    shutil.copytree(bundled.demo_model(), root, copy_function=os.symlink)
    for config in root.glob("*/config.json"):
        config.unlink()
        shutil.copy(os.path.join(bundled.demo_model(), config.parent.name, "config.json"), config)
    if change is not None:
        change(root)
    return str(root)


def _residual(path, delta=None, *, word="star", text_encoder=""):
    delta = np.full((1, DEMO_DIM), 0.01, np.float32) if delta is None else delta
    artifacts.save_residual(str(path), artifacts.Residual(delta, word, (5,), text_encoder=text_encoder))
    return str(path)


def _with_residual(tmp_path, residual_path):
    subjects = [dict(LAYOUT["subjects"][0], residual=residual_path), LAYOUT["subjects"][1]]
    return ["--layout", _write(tmp_path / "res.json", dict(LAYOUT, subjects=subjects))]


def _neurons(tmp_path, unet="3d309bb021b12655"):
    path = str(tmp_path / "star.cones")
    cn = artifacts.ConceptNeurons({"conv_in/bias": np.array([1, 3])}, {"conv_in/bias": (32,)}, ("sks",), ("star",),
                                  unet=unet)
    artifacts.save_neurons(path, cn)
    return path


def _config_change(component, **values):
    def change(root):
        path = root / component / "config.json"
        _write(path, dict(json.load(open(path)), **values))
    return change


def _bin_only_unet(root):
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


# Each case: (id, argv builder (tmp_path, out) -> extra argv, exit code, words the one line must hold,
# whether it must fail before the model loads). The builder's argv replaces the defaults' flags; the
# default steps (the preset's 50) keep the one line free of the note that clamps guidance_steps.
CASES = [
    # numeric flags
    ("steps-0", lambda t, o: ["--steps", "0"], 2, ["--steps", ">= 1"], True),
    ("steps-negative", lambda t, o: ["--steps", "-5"], 2, ["--steps"], True),
    ("guidance-steps-fraction", lambda t, o: ["--set", "guidance_steps=2.5"], 2, ["guidance_steps", "int"], True),
    ("cfg-nan", lambda t, o: ["--cfg", "nan"], 2, ["--cfg", "finite"], True),
    ("cfg-inf", lambda t, o: ["--cfg", "inf"], 2, ["--cfg", "finite"], True),
    ("lambda-inf", lambda t, o: ["--set", "guidance_weight=1e999"], 2, ["guidance_weight", "finite"], True),
    ("gamma-minus-inf", lambda t, o: ["--set", "weight_negative=-1e999"], 2, ["weight_negative", "finite"], True),
    ("guidance-steps-negative", lambda t, o: ["--set", "guidance_steps=-1"], 2, ["guidance_steps", ">= 0"], True),
    ("seeds-repeated", lambda t, o: ["--seeds", "1", "1"], 2, ["--seeds", "distinct"], True),
    ("seeds-negative", lambda t, o: ["--seeds", "-1"], 2, ["--seeds", "-1"], True),
    ("seeds-too-large", lambda t, o: ["--seeds", str(2**32)], 2, ["--seeds", "4294967296"], True),
    ("seeds-fraction", lambda t, o: ["--seeds", "1.5"], 2, ["--seeds", "1.5"], True),
    ("batch-0", lambda t, o: ["--batch", "0"], 2, ["--batch"], True),
    ("unknown-preset", lambda t, o: ["--preset", "offical"], 2, ["offical", "official"], True),
    ("unknown-key", lambda t, o: ["--set", "cfg=3"], 2, ["cfg", "cfg_scale"], True),
    # the output folder
    ("out-is-a-file", lambda t, o: (o.write_text("mine"), [])[1], 2, ["--out", "is a file"], True),
    ("out-below-a-file", lambda t, o: (t.joinpath("f").write_text("x"), ["--out", str(t / "f" / "out")])[1], 2,
     ["--out", "runs through the file"], True),
    ("out-has-the-images", lambda t, o: (o.mkdir(), o.joinpath("two_subjects_seed0000.png").write_bytes(b"png"),
                                         [])[2], 2, ["already exists", "--overwrite"], True),
    # layouts
    ("layout-missing", lambda t, o: ["--layout", str(t / "none.json")], 2, ["none.json", "not found"], True),
    ("layout-is-a-folder", lambda t, o: ["--layout", str(t)], 2, ["is a folder", ".json"], True),
    ("layout-nan-lambda", lambda t, o: ["--layout", _text(t / "l.json", json.dumps(LAYOUT)[:-1]
                                                          + ', "guidance_weight": NaN}')], 2,
 ["guidance_weight", "finite"], True),
    ("layout-inf-strength", lambda t, o: ["--layout", _write(t / "l.json", dict(LAYOUT, subjects=[
        dict(LAYOUT["subjects"][0], strength=1e999)]))], 2, ["strength", "finite"], True),
    ("layout-word-not-in-prompt", lambda t, o: ["--layout", _write(t / "l.json", dict(LAYOUT, subjects=[
        {"word": "circle", "box": [0, 0, 1, 1]}]))], 2, ["circle"], True),
    ("layout-residual-missing", lambda t, o: _with_residual(t, str(t / "none.safetensors")), 2,
     ["subjects[0].residual", "does not exist"], True),
    # model folders
    ("model-missing", lambda t, o: ["--model", str(t / "none")], 2, ["does not exist"], True),
    ("model-is-a-file", lambda t, o: ["--model", _text(t / "sd.ckpt", "weights")], 2,
     ["is a file", "from_single_file"], True),
    ("model-no-index", lambda t, o: ["--model", _model_copy(t, lambda r: (r / "model_index.json").unlink())], 2,
     ["model_index.json"], True),
    ("model-bin-only", lambda t, o: ["--model", _model_copy(t, _bin_only_unet)], 2,
     ["pickle", "safetensors", "convert"], True),
    ("model-no-vae", lambda t, o: ["--model", _model_copy(t, lambda r: shutil.rmtree(r / "vae"))], 2,
     ["vae/"], True),
    ("model-bad-config", lambda t, o: ["--model", _model_copy(t, lambda r: (r / "unet" / "config.json").write_text(
        "{"))], 2, ["unet", "config.json"], True),
    ("model-widths-differ", lambda t, o: ["--model", _model_copy(t, _config_change("unet", cross_attention_dim=64))],
     2, ["64-d", "96-d"], True),
    # artifacts
    ("residual-nan", lambda t, o: _with_residual(t, _residual(t / "r.safetensors", np.full((1, DEMO_DIM), np.nan,
                                                                                            np.float32))), 2,
     ["subjects[0].residual", "NaN"], True),
    ("residual-width", lambda t, o: _with_residual(t, _residual(t / "r.safetensors", np.ones((1, 64), np.float32))),
     2, ["64-d", "96-d"], True),
    ("residual-not-safetensors", lambda t, o: (t.joinpath("r.safetensors").write_bytes(b"hello"),
                                               _with_residual(t, str(t / "r.safetensors")))[1], 2,
     ["subjects[0].residual", "safetensors"], True),
    ("residual-pickle", lambda t, o: (t.joinpath("r.pt").write_bytes(b"\x80\x04"),
                                      _with_residual(t, str(t / "r.pt")))[1], 2, ["pickle", "--allow-pickle"], True),
    ("residual-other-model", lambda t, o: _with_residual(t, _residual(t / "r.safetensors",
                                                                      text_encoder="0123456789abcdef")), 2,
     ["subjects[0].residual", "another base model"], False),
    ("neurons-missing", lambda t, o: ["--neurons", str(t / "none.cones")], 2, ["none.cones", "does not exist"], True),
    ("neurons-not-a-cones-file", lambda t, o: ["--neurons", _residual(t / "r.cones")], 2,
     ["not a cones_jax concept-neuron file"], True),
    ("neurons-other-model", lambda t, o: ["--neurons", _neurons(t, unet="fedcba9876543210")], 2,
     ["another base model"], False),
]


@pytest.fixture
def no_compile(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the sampler was compiled: the bad input was not caught in time")

    monkeypatch.setattr(sampling, "compile_sampler", refuse)


def _run(argv):
    try:
        return sample_cli.main(argv)
    except SystemExit as e:  # argparse's own refusals (a fraction where an integer goes)
        return e.code


@pytest.mark.parametrize("name, build, code, needles, before_load", CASES, ids=[c[0] for c in CASES])
def test_sample_bad_input(name, build, code, needles, before_load, tmp_path, capsys, monkeypatch, no_compile):
    out = tmp_path / "out"
    extra = build(tmp_path, out)
    if before_load:
        def refuse(*args, **kwargs):
            raise AssertionError("the model was loaded before the bad input was caught")

        monkeypatch.setattr(pipeline_lib, "load_pipeline", refuse)
    argv = {"--layout": "demo:two_subjects", "--model": bundled.demo_model(), "--out": str(out),
            "--seeds": "0"}
    flags = [a for a in extra if a.startswith("--")]
    base = [x for k, v in argv.items() if k not in flags for x in (k, v)]
    before = _snapshot(out)
    capsys.readouterr()
    rc = _run(base + extra)
    err = capsys.readouterr().err.strip()
    assert rc == code, (name, err)
    assert err.startswith("error: ") and "\n" not in err, (name, err)
    for needle in needles:
        assert needle in err, (name, needle, err)
    assert _snapshot(out) == before, name


def test_sample_out_not_writable(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes into read-only folders: let the check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == str(locked) else real(p, mode))
    monkeypatch.setattr(pipeline_lib, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    try:
        rc = _run(["--layout", "demo:two_subjects", "--out", str(locked / "out"), "--seeds", "0"])
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: ") and "\n" not in err and "not writable" in err, err
    assert "--out" in err and not (locked / "out").exists()


def test_sample_a_second_run_to_the_same_out_stops(tmp_path, capsys, monkeypatch, no_compile):
    """While one run holds `--out`, another stops before loading the model: both cannot say 'wrote'."""
    out = tmp_path / "out"
    monkeypatch.setattr(pipeline_lib, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    with OutputLock(out):
        before = _snapshot(out)
        rc = _run(["--layout", "demo:two_subjects", "--out", str(out), "--seeds", "0"])
        assert _snapshot(out) == before
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and f"another run (pid {os.getpid()})" in err and "--out" in err, err
    assert not out.exists()  # the folder made for the lock is gone with it


def test_sample_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / OutputLock.NAME).write_text("999999999\n")  # left by a run killed with SIGKILL
    with OutputLock(out) as lock:
        assert open(lock.path).read().strip() == str(os.getpid())
    assert os.listdir(out) == []


def test_sample_outputs_written_meanwhile_are_not_replaced(tmp_path, capsys, monkeypatch):
    """Existence is checked again just before writing: a file that appeared while sampling stays."""
    from cones_jax import generate

    out = tmp_path / "out"
    theirs = out / "two_subjects_seed0000.png"

    def render(*args, **kwargs):
        theirs.write_bytes(b"another run's image")

    monkeypatch.setattr(generate, "render", render)
    rc = _run(["--layout", "demo:two_subjects", "--out", str(out), "--seeds", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "already exists" in err and "\n" not in err, err
    assert theirs.read_bytes() == b"another run's image" and sorted(os.listdir(out)) == [theirs.name]


def test_sample_non_finite_images_are_not_written(tmp_path, capsys, monkeypatch):
    """The sampler's per-image finite flags: a NaN image stops the run with exit 1, naming its seed."""
    def fake_compile(sd, spec, bias_fn, params, schedule, inputs, **kwargs):
        assert spec.check_finite

        def fn(params, schedule, inputs):
            n = inputs.noise.shape[0]
            return np.full((n, 64, 64, 3), np.nan, np.float32), np.arange(n) % 2 == 1  # even rows: NaN

        return sampling.CompiledSampler(fn, 0.0, False)

    monkeypatch.setattr(sampling, "compile_sampler", fake_compile)
    out = tmp_path / "out"
    rc = _run(["--layout", "demo:two_subjects", "--out", str(out), "--seeds", "3", "4", "--steps", "2",
               "--batch", "2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert rc == 1 and err.startswith("error: "), err
    assert "NaN or Inf for seed(s) 3;" in err and not out.exists(), err


def test_sample_guidance_steps_are_clamped_to_steps(tmp_path, capsys, monkeypatch):
    """`--steps 20` with the presets' guidance_steps=50 guides all 20 steps and says so, once."""
    from cones_jax import generate

    seen = {}

    def render(lay, cfg, *args, **kwargs):
        seen.update(cfg=cfg, lay=lay)
        raise generate.GenerateError("stop here")

    monkeypatch.setattr(generate, "render", render)
    rc = _run(["--layout", "demo:two_subjects", "--out", str(tmp_path / "out"), "--seeds", "0", "--steps", "20"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == "error: stop here" and len(err) == 2, err
    assert err[0].startswith("note: guidance_steps=50 is more than steps=20; guiding all 20 steps"), err
    assert seen["cfg"]["guidance_steps"] == 20 and seen["lay"].guidance_steps == 20


def test_sample_a_bin_only_model_is_not_sent_to_allow_pickle(tmp_path):
    """`--allow-pickle` is about official residuals; it must not be offered for model weights."""
    from cones_jax.errors import CheckpointError

    root = _model_copy(tmp_path, _bin_only_unet)
    with pytest.raises(CheckpointError) as e:
        pipeline_lib.check_model_folder(root)
    assert "allow" not in str(e.value).lower() and "safe_serialization=True" in str(e.value)


def test_sample_a_mask_of_another_shape_is_stretched_with_a_word(tmp_path):
    from PIL import Image

    from cones_jax import layout as layout_lib

    Image.new("L", (64, 32), 255).save(tmp_path / "wide.png")
    lay = layout_lib.parse_layout(dict(LAYOUT, subjects=[{"word": "star", "mask": "wide.png"}]), str(tmp_path))
    with pytest.warns(layout_lib.LayoutWarning, match=r"subjects\[0\].mask is 64x32 .* stretched"):
        layout_lib.region_masks(lay, 64, 64)


def test_sample_warnings_are_one_line_on_the_command_line(capsys):
    import warnings

    from cones_jax import cli

    assert cli.run_cli(lambda: warnings.warn("a mask\nis stretched", UserWarning, stacklevel=1)) == 0
    assert capsys.readouterr().err == "warning: a mask is stretched\n"
