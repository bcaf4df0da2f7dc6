"""Layout-guided sampling end to end on a tiny random checkpoint: the CLI, recompilation,
determinism, sharding over 8 fake devices, and the official algorithm re-implemented in PyTorch."""

import json
import os
from types import MappingProxyType

import jax
import numpy as np
import pytest
from PIL import Image
from tiny_checkpoints import make_sd

from cones_jax import artifacts, guidance, sampling
from cones_jax import sample as sample_cli
from cones_jax.config import load_config
from cones_jax.layout import parse_layout
from cones_jax.pipeline import load_pipeline
from cones_jax.sampler import LayoutSampler, shard_batch, to_uint8

LAYOUT = {"prompt": "a dog and a cat on the beach", "size": [32, 32],
          "subjects": [{"word": "dog", "box": [0.0, 0.0, 0.5, 1.0]}, {"word": "cat", "box": [0.5, 0.0, 1.0, 1.0]}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sd"))
    make_sd(root, "sd1")
    return root, load_pipeline(root)


def write_layout(folder, obj, name="layout.json"):
    path = os.path.join(str(folder), name)
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def run(argv):
    return sample_cli.main(argv)


def test_cli_writes_images_and_extras(tiny, tmp_path, capsys):
    root, _ = tiny
    layout = write_layout(tmp_path, LAYOUT)
    out = tmp_path / "out"
    rc = run(["--layout", layout, "--model", root, "--out", str(out), "--seeds", "0", "1", "--steps", "2",
              "--show-layout", "--attention-maps"])
    assert rc == 0, capsys.readouterr().err
    names = sorted(os.listdir(out))
    assert "layout_seed0000.png" in names and "layout_seed0001.png" in names and "layout_grid.png" in names
    assert "layout_seed0000_layout.png" in names
    assert "layout_seed0001_attn_0_dog.png" in names and "layout_seed0001_attn_1_cat.png" in names
    assert not [n for n in names if n.endswith(".tmp")]
    assert Image.open(out / "layout_seed0000.png").size == (32, 32)
    printed = capsys.readouterr().out
    assert ("compiled the sampler" in printed or "the compiled sampler" in printed) and "s per image" in printed
    # an existing output is not overwritten without --overwrite
    before = (out / "layout_seed0000.png").read_bytes()
    rc = run(["--layout", layout, "--model", root, "--out", str(out), "--seeds", "0", "--steps", "2"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert (out / "layout_seed0000.png").read_bytes() == before


def _prepared_inputs(sd, layout_obj, folder, cfg, seeds):
    core = LayoutSampler(sd, cfg)
    prep = core.prepare(parse_layout(layout_obj, str(folder)))
    return core.schedule, core.inputs([prep] * len(seeds), seeds)


def test_new_layout_does_not_recompile_and_seed_is_deterministic(tiny, tmp_path):
    _, sd = tiny
    cfg = load_config("official", {"steps": 3, "guidance_steps": 2})
    sampler = sampling.make_sampler(sd, sampling.SamplerSpec(scheduler="euler", steps=3, self_recurrence=True),
                                    guidance.layout_bias)
    sched, a = _prepared_inputs(sd, LAYOUT, tmp_path, cfg, [0])
    other = dict(LAYOUT, prompt="a red cat next to a dog in the park",
                 subjects=[{"word": "cat", "box": [0.1, 0.1, 0.4, 0.9], "strength": 1.5},
                           {"word": "dog", "box": [0.6, 0.2, 0.9, 0.8]}])
    _, b = _prepared_inputs(sd, other, tmp_path,
                            load_config("official", {"steps": 3, "guidance_steps": 2, "guidance_weight": 0.05}), [0])
    img_a = np.asarray(sampler(sd.params, sched, a))
    img_b = np.asarray(sampler(sd.params, sched, b))
    img_a2 = np.asarray(sampler(sd.params, sched, a))
    assert sampler._cache_size() == 1  # a new prompt, layout and weight reuse the compiled sampler
    np.testing.assert_array_equal(img_a, img_a2)  # same seed, same image
    assert np.abs(img_a - img_b).max() > 1e-3


def test_sharded_batch_equals_single_device(tiny, tmp_path):
    _, sd = tiny
    assert len(jax.local_devices()) == 8, "conftest sets 8 fake CPU devices"
    cfg = load_config("paper", {"steps": 2, "scheduler": "ddim"})
    seeds = list(range(8))
    sched, inputs = _prepared_inputs(sd, LAYOUT, tmp_path, cfg, seeds)
    sampler = sampling.make_sampler(sd, sampling.SamplerSpec(scheduler="ddim", steps=2), guidance.layout_bias)
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
    sharded = sampler(jax.device_put(sd.params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())),
                      sched, shard_batch(inputs, mesh))
    assert len(sharded.sharding.device_set) == 8
    def one(k):
        take = lambda x: x[k:k + 1] if getattr(x, "ndim", 0) >= 1 and x.shape[0] == 8 else x
        return np.asarray(sampler(sd.params, sched, jax.tree_util.tree_map(take, inputs)))

    single = np.concatenate([one(k) for k in range(8)])
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-5)


def test_self_recurrence_noise_follows_the_seed(tiny, tmp_path):
    """Official sampling re-noises every guided step, which at the first step replaces most of the
    starting noise: the re-noise must come from the image's own seed, or every seed of a call
    draws the same image, and an image would change with its batch."""
    _, sd = tiny
    cfg = load_config("official", {"steps": 3, "guidance_steps": 3})
    sampler = sampling.make_sampler(sd, sampling.SamplerSpec(scheduler="euler", steps=3, self_recurrence=True),
                                    guidance.layout_bias)
    sched, pair = _prepared_inputs(sd, LAYOUT, tmp_path, cfg, [0, 5])
    _, alone = _prepared_inputs(sd, LAYOUT, tmp_path, cfg, [5])
    both = np.asarray(sampler(sd.params, sched, pair))
    np.testing.assert_allclose(both[1:], np.asarray(sampler(sd.params, sched, alone)), atol=1e-5)
    assert np.abs(both[0] - both[1]).mean() > 0.02


def test_bad_inputs_exit_2_and_write_nothing(tiny, tmp_path, capsys):
    root, sd = tiny
    wrong = tmp_path / "wrong.safetensors"
    artifacts.save_residual(str(wrong), artifacts.Residual(np.ones((1, 64), np.float32), "dog", (5,)))
    long_prompt = " ".join(["dog"] * 90)
    cases = {
        "box": (dict(LAYOUT, subjects=[{"word": "dog", "box": [0.5, 0.0, 0.2, 1.0]}]), "subjects[0].box"),
        "key": (dict(LAYOUT, colour="red"), "colour"),
        "word": (dict(LAYOUT, subjects=[{"word": "sunflower", "box": [0, 0, 1, 1]}]), "sunflower"),
        "long": (dict(LAYOUT, prompt=long_prompt), "prompt"),
        "residual": (dict(LAYOUT, subjects=[{"word": "dog", "box": [0, 0, 1, 1], "residual": str(wrong)}]), "64-d"),
        "color": (dict(LAYOUT, color_map="map.png", subjects=[{"word": "dog", "color": "#00ff00"}]), "00ff00"),
    }
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "map.png")
    for name, (obj, needle) in cases.items():
        out = tmp_path / f"out_{name}"
        rc = run(["--layout", write_layout(tmp_path, obj, f"{name}.json"), "--model", root, "--out", str(out),
                  "--steps", "1", "--seeds", "0"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, (name, err)
        assert err.startswith("error:") and "\n" not in err and needle.lower() in err.lower(), (name, err)
        assert not out.exists() or not os.listdir(out), name
    rc = run(["--layout", str(tmp_path / "missing.json"), "--model", root, "--out", str(tmp_path / "o")])
    assert rc == 2 and "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    rc = run(["--layout", write_layout(tmp_path, LAYOUT), "--model", str(tmp_path / "empty"),
              "--out", str(tmp_path / "o")])
    assert rc == 2 and "model_index.json" in capsys.readouterr().err


def test_core_reuses_its_sampler_and_draws_what_the_sampler_draws(tiny, tmp_path):
    """The core: a second layout at the same shapes reuses the compiled sampler, and its uint8
    images are the jitted sampler's on the same inputs, whatever the batch split over devices."""
    _, sd = tiny
    # a config is only read: a read-only mapping will do (typed configs keep `cfg[key]` access)
    core = LayoutSampler(sd, MappingProxyType(load_config("paper", {"steps": 2})), batch=4)
    lay = parse_layout(LAYOUT, str(tmp_path))
    other = parse_layout(dict(LAYOUT, prompt="a cat and a dog on the beach"), str(tmp_path))
    first = core.draw([lay], [0, 1, 2])
    again = core.draw([other, lay], [1, 2])
    assert again.compiled.cached and again.batch == 4 and first.images.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(again.images[2:], first.images[1:])  # (lay, 1), (lay, 2): same images
    jitted = sampling.make_sampler(sd, core.spec, guidance.layout_bias)
    want = to_uint8(jitted(sd.params, core.schedule, core.inputs([core.prepare(lay)] * 3, [0, 1, 2]))[0])
    assert np.abs(want.astype(int) - first.images.astype(int)).max() <= 1


def test_on_step_hears_every_step_and_is_compiled_in_only_when_given(tiny, tmp_path):
    _, sd = tiny
    cfg = load_config("paper", {"steps": 2})  # the previous test's sampler, reused for `plain`
    lay = parse_layout(LAYOUT, str(tmp_path))
    heard = []
    called = LayoutSampler(sd, cfg, batch=4, on_step=heard.append).draw([lay], [0])
    plain = LayoutSampler(sd, cfg, batch=4).draw([lay], [0])
    assert sorted(heard) == [0, 1]
    np.testing.assert_array_equal(called.images, plain.images)
    assert "callback" in called.compiled.fn.as_text() and "callback" not in plain.compiled.fn.as_text()


def test_the_sampler_flags_non_finite_images_per_image(tiny, tmp_path):
    """`check_finite`: one bool per image, computed inside the jitted sampler; a NaN in one image's
    starting noise flags that image only."""
    _, sd = tiny
    cfg = load_config("paper", {"steps": 1})
    sched, inputs = _prepared_inputs(sd, LAYOUT, tmp_path, cfg, [0, 1])
    noise = np.asarray(inputs.noise).copy()
    noise[0, 0, 0, 0] = np.nan
    spec = sampling.SamplerSpec(scheduler="euler", steps=1, check_finite=True)
    images, finite = sampling.make_sampler(sd, spec, guidance.layout_bias)(sd.params, sched,
                                                                          inputs.replace(noise=noise))
    assert images.shape[0] == 2 and np.asarray(finite).tolist() == [False, True]
