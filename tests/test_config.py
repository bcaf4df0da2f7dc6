"""Typed presets and the one override route: checked keys and types, one precedence
(preset < layout file < flags), γ⁺ from the preset and per subject."""

import dataclasses
import json

import numpy as np
import pytest

from cones_jax import config
from cones_jax import generate as gen
from cones_jax import layout as layout_lib
from cones_jax import sample as sample_cli
from cones_jax import train as train_cli

LAYOUT = {"prompt": "a dog and a cat", "guidance_weight": 0.3, "guidance_steps": 20, "weight_negative": -5.0,
          "subjects": [{"word": "dog", "box": [0, 0, 0.5, 1], "strength": 4.0},
                       {"word": "cat", "box": [0.5, 0, 1, 1]}]}


@pytest.mark.parametrize("name", config.preset_names())
def test_every_preset_is_a_typed_config_read_like_a_mapping(name):
    cfg = config.load_config(name)
    assert isinstance(cfg, config.Config)
    key = next(iter(cfg))
    assert cfg[key] == getattr(cfg, key) == cfg.get(key) and key in cfg and "no_such_key" not in cfg
    assert dict(cfg) == {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    assert cfg.get("no_such_key", 7) == 7
    with pytest.raises((TypeError, dataclasses.FrozenInstanceError)):
        cfg[key] = cfg[key]


def test_override_checks_and_converts_types():
    cfg = config.load_config("official", {"steps": 3, "cfg_scale": 5, "timestep_spacing": None})
    assert cfg.steps == 3 and cfg.cfg_scale == 5.0 and isinstance(cfg.cfg_scale, float)
    assert cfg.timestep_spacing is None
    assert config.load_config("cones1_train", {"search": ["a", "b"], "tau": 0.5}).search == ("a", "b")
    assert config.load_config("cones1_train").replace(tau=None).tau is None
    assert config.load_config("paper").steps == 50  # presets are not changed by an override


def test_unknown_key_is_a_one_line_error_with_a_suggestion():
    with pytest.raises(ValueError) as e:
        config.load_config("official", {"stepz": 3})
    msg = str(e.value)
    assert "\n" not in msg and "'stepz'" in msg and "did you mean --set steps=" in msg
    with pytest.raises(ValueError, match="unknown config 'oficial'; did you mean 'official'"):
        config.load_config("oficial")


@pytest.mark.parametrize("key,value,expected", [
    ("steps", "ten", "expected int"),
    ("steps", 2.5, "expected int"),
    ("self_recurrence", 1, "expected bool"),
    ("cfg_scale", True, "expected float"),
    ("guidance_sigmas", "sometimes", "expected one of 'separate', 'sampler'"),
    ("scheduler", 3, "expected str"),
])
def test_wrong_type_is_a_one_line_error_naming_key_type_and_fix(key, value, expected):
    with pytest.raises(ValueError) as e:
        config.load_config("official", {key: value})
    msg = str(e.value)
    assert "\n" not in msg and f"--set {key}: {expected}" in msg and f"write e.g. --set {key}=" in msg


def test_parse_override_reads_literals_and_bare_strings():
    assert config.parse_overrides(["steps=30", "scheduler=ddim", "timestep_spacing=None", "steps=40"]) == {
        "steps": 40, "scheduler": "ddim", "timestep_spacing": None}
    with pytest.raises(ValueError, match="must look like key=value"):
        config.parse_override("steps")


def test_a_config_file_must_return_a_typed_config(tmp_path):
    good = tmp_path / "mine.py"
    good.write_text("from cones_jax.config import load_config\n\n"
                    "def get_config():\n    return load_config('paper').replace(steps=7)\n")
    assert config.load_config(str(good)).steps == 7
    bad = tmp_path / "old.py"
    bad.write_text("def get_config():\n    return dict(steps=7)\n")
    with pytest.raises(ValueError, match="return a typed config"):
        config.load_config(str(bad))


def _layout(tmp_path, **changes):
    return layout_lib.parse_layout(dict(LAYOUT, **changes), str(tmp_path))


def test_precedence_preset_then_layout_then_flags(tmp_path):
    preset = config.load_config("official")
    cfg, _ = config.resolve_sampling("official")
    assert cfg == preset
    cfg, lay = config.resolve_sampling("official", _layout(tmp_path))
    assert (cfg.guidance_weight, cfg.guidance_steps, cfg.weight_negative) == (0.3, 20, -5.0)
    assert cfg.steps == preset.steps and lay.weight_negative == -5.0
    flags = {"guidance_weight": 0.5, "weight_negative": -7.0, "guidance_steps": 10}
    cfg, lay = config.resolve_sampling("official", _layout(tmp_path), flags)
    assert (cfg.guidance_weight, cfg.guidance_steps, cfg.weight_negative) == (0.5, 10, -7.0)
    # what the sampler reads from the layout agrees with the config
    assert (lay.guidance_weight, lay.guidance_steps, lay.weight_negative) == (0.5, 10, -7.0)
    bare = {k: v for k, v in LAYOUT.items() if k not in config.LAYOUT_KEYS}
    cfg, lay = config.resolve_sampling("paper", layout_lib.parse_layout(bare, str(tmp_path)))
    assert cfg == config.load_config("paper") and lay.weight_negative == cfg.weight_negative


def test_weight_positive_is_the_default_strength_and_subjects_override_it(tmp_path):
    assert _layout(tmp_path).subjects[1].strength is None  # the layout gave none
    _, lay = config.resolve_sampling("official", _layout(tmp_path))
    assert [s.strength for s in lay.subjects] == [4.0, config.load_config("official").weight_positive]
    _, lay = config.resolve_sampling("official", _layout(tmp_path), {"weight_positive": 3})
    assert [s.strength for s in lay.subjects] == [4.0, 3.0]
    masks = layout_lib.region_masks(lay, 8, 8)
    gammas = layout_lib.gamma_maps(lay, masks)
    assert np.all(gammas[0][masks[0]] == 4.0) and np.all(gammas[1][masks[1]] == 3.0)
    assert np.all(gammas[1][~masks[1]] == -5.0)


def test_cli_rejects_a_bad_set_with_exit_2_before_reading_anything(tmp_path, capsys):
    missing = str(tmp_path / "no_such_layout.json")
    assert sample_cli.main(["--layout", missing, "--set", "stepz=3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'stepz'" in err and "no_such_layout" not in err
    assert sample_cli.main(["--layout", missing, "--set", "steps=many"]) == 2
    assert "--set steps: expected int, got 'many'" in capsys.readouterr().err
    (tmp_path / "photos").mkdir()
    rc = train_cli.main(["residual", "--images", str(tmp_path / "photos"), "--word", "dog",
                         "--out", str(tmp_path / "dog.safetensors"), "--set", "lr=fast"])
    assert rc == 2 and "--set lr: expected float, got 'fast'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "dog.safetensors").exists()


def test_demo_layout_names_resolve_to_bundled_files():
    from cones_jax import bundled

    assert "demo:two_subjects" in bundled.layout_names()
    path = bundled.resolve_layout("demo:two_subjects")
    assert path == bundled.resolve_layout("demo:two_subjects.json") and path.endswith("two_subjects.json")
    assert layout_lib.load_layout(path, check_residuals=True).subjects[0].word == "star"
    assert bundled.resolve_layout("mine.json") == "mine.json"
    with pytest.raises(layout_lib.LayoutError, match="demo:two_subjects"):
        bundled.resolve_layout("demo:nope")


def test_generate_hands_the_resolved_values_to_the_sampler(tmp_path, monkeypatch):
    """generate() follows the same precedence: a layout's weight_negative no longer beats --set,
    and --set weight_positive reaches the subjects without a strength of their own."""
    path = tmp_path / "lay.json"
    path.write_text(json.dumps(LAYOUT))
    seen = {}

    class Stop(Exception):
        pass

    class Capture:
        def __init__(self, sd, cfg, **kw):
            seen.update(cfg=cfg)

        def prepare(self, lay):
            seen.update(lay=lay)
            raise Stop

    monkeypatch.setattr(gen, "LayoutSampler", Capture)
    monkeypatch.setattr(gen, "check_artifacts", lambda *a, **k: None)  # `sd` is a stand-in, not a model
    args = sample_cli.parse_args(["--layout", str(path), "--out", str(tmp_path / "out"), "--steps", "4",
                                  "--set", "weight_negative=-7.0", "--set", "weight_positive=3.0",
                                  "--set", "steps=9"])
    with pytest.raises(Stop):
        gen.generate(str(path), sample_cli.options(args), sd=object(), progress=False)
    lay, cfg = seen["lay"], seen["cfg"]
    assert (cfg["weight_negative"], lay.weight_negative) == (-7.0, -7.0)
    assert cfg["guidance_weight"] == 0.3 and cfg["steps"] == 4  # from the layout; the flag beats --set
    assert [s.strength for s in lay.subjects] == [4.0, 3.0]
