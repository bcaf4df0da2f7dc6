"""The shapes world: deterministic scenes and captions, the shipped detector's accuracy on held-out
renders, and the base model's diffusers export (PyTorch diffusers loads it and computes what we do)."""

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cones_jax import convert, training
from cones_jax.demo import base_model, detect, evaluate, world

DETECTOR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "demo_world", "detector.safetensors")


def test_scenes_are_deterministic_and_captioned():
    a, b = world.random_scene(123), world.random_scene(123)
    assert a == b and 1 <= len(a.things) <= 4
    np.testing.assert_array_equal(world.render(a), world.render(b))
    img = world.render(a)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    text = world.caption(a)
    for t in a.things:
        assert t.shape in text and t.colour in text
    # boxes inside the image and not overlapping
    for i, t in enumerate(a.things):
        assert 0 <= t.box[0] < t.box[2] <= 64 and 0 <= t.box[1] < t.box[3] <= 64
        for u in a.things[i + 1:]:
            assert detect._overlap(t.box, u.box) == 0
    assert world.caption(a, np.random.default_rng(0)) == world.caption(a, np.random.default_rng(0))


def test_words_scenes_are_those_every_sitting_trained_on():
    # sha256 of the first 300 scenes as the world drew them before continuous sizes existed: the
    # "words" default must keep every recorded sitting's data (demo_model_lineage.py) bit for bit.
    got = hashlib.sha256(repr([world.random_scene(i) for i in range(300)]).encode()).hexdigest()
    assert got == "3567cda8f02e4a4d8f46361cfef04111a381caa7d7f2688ab0c42b69696e4472"


def test_continuous_scene_sizes_span_the_layouts_boxes():
    words = [world.random_scene(i) for i in range(400)]
    cont = [world.random_scene(i, sizes="continuous") for i in range(400)]
    sides, same = [], 0
    for w, c in zip(words, cont):
        # the same things are drawn; only their sides, boxes and size words follow the side (a crowded
        # scene may drop a thing that found no room in one of the two)
        if len(w.things) == len(c.things):
            assert [(t.shape, t.colour, t.pattern) for t in c.things] == [(t.shape, t.colour, t.pattern)
                                                                        for t in w.things]
            same += 1
        for i, t in enumerate(c.things):
            side = t.box[2] - t.box[0]
            assert world.CONTINUOUS_SIDES[0] - 1e-6 <= side <= world.CONTINUOUS_SIDES[1]
            assert t.size == ("small" if side < (15 * 26) ** 0.5 else "big")  # the words' middles 15, 26 px
            for u in c.things[i + 1:]:
                assert detect._overlap(t.box, u.box) == 0
            sides.append(side)
    assert same >= 0.9 * len(words)
    q10, q50, q90 = np.percentile(sides, [10, 50, 90])
    # the words' gap (17-23 px) and both ends beyond the words' ranges (13-29 px) are drawn
    assert q10 < 13 and 17 < q50 < 23 and q90 > 27 and max(sides) > 30, (q10, q50, q90)
    with pytest.raises(ValueError, match="scene sizes 'huge' is not one of words, continuous"):
        world.random_scene(0, sizes="huge")


def test_shipped_detector_on_held_out_renders():
    det = detect.load_detector(DETECTOR)
    x, y = detect.make_dataset(range(3 * 10 ** 6, 3 * 10 ** 6 + 150), augment=False, seed=3)
    acc = detect.head_accuracy(det, x, y)
    assert min(acc[k] for k in detect.HEADS) >= 0.95, acc
    # the layout suite rendered exactly as asked scores (almost) perfectly
    cases = [c for c in evaluate.suite() if len(c.names) in (2, 4)][:4]
    gt = evaluate.ground_truth_check(det, cases, [0, 1])
    assert gt["placement"] == 1.0 and gt["confusion"] == 0.0 and gt["identity"] >= 0.9, gt


def test_export_loads_in_diffusers_and_matches(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    words = base_model.vocabulary()
    from cones_jax.tokenizer import clip_vocabulary, write_clip_tokenizer

    tok = write_clip_tokenizer(str(tmp_path / "tok"), words, max_length=base_model.MAX_LENGTH)
    assert len(clip_vocabulary(words)[0]) == tok.vocab_size  # what bench demo-step builds its model from
    text, unet = base_model.models(tok.vocab_size)
    vae = base_model.vae_module()

    def noisy(params, seed):  # random everywhere (zero-initialised biases too), so a wrong key shows
        # drawn on the host: jax.random would compile one kernel per tensor shape (minutes on a small CPU)
        rng = np.random.default_rng(seed)
        return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32)),
                            params)

    inputs = base_model.init_inputs()
    tp = noisy(base_model.init_params(text, *inputs["text_encoder"], seed=0), 1)
    up = noisy(base_model.init_params(unet, *inputs["unet"], seed=2), 3)
    vp = noisy(base_model.init_params(vae, *inputs["vae"], seed=4), 5)
    out = str(tmp_path / "demo")
    base_model.export(out, unet_params=up, text_params=tp, vae_params=vp, scaling_factor=0.8, tokenizer_words=words,
                      unet_steps=7)
    with open(os.path.join(out, base_model.TRAINING_RECORD)) as f:
        assert json.load(f)["unet_steps"] == 7

    assert_matches_diffusers(out)
    # --init-from: a later run continues from exactly the exported weights
    from cones_jax.pipeline import load_pipeline

    sd = load_pipeline(out)  # loaded once: each diagnostic below only reads it
    warm = base_model.warm_start({"text_encoder": tp, "unet": up}, sd)
    for got, want in ((warm["unet"], up), (warm["text_encoder"], tp)):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), got, want)
    # the training diagnostic reads an exported folder
    from cones_jax.demo import diagnose

    rows = 1 + len(diagnose.X0_TIMESTEPS) + 2 * len(diagnose.DDIM_STARTS)
    # a coarse DDIM stride: the grid's layout is what is checked here, not how well it denoises
    assert diagnose.probe_grid(sd, ddim_stride=250).shape == (rows * 64, len(diagnose.PROBES) * 64, 3)
    rise = diagnose.caption_sensitivity(sd, timesteps=(850,), draws=1)
    assert set(rise) == {850} and all(np.isfinite(v) for v in rise[850].values())
    assert rise[850]["colour"] != 0.0  # random weights read every word a little
    # with every cross-attention key zeroed, a word's attention is the same at every pixel, so the
    # share on its object is the object's area: the diagnostic's baseline
    flat = convert.flatten(sd.params["unet"])
    blind = dataclasses.replace(sd, params=dict(sd.params, unet=convert.unflatten(
        {k: np.zeros_like(v) if "attn2" in k and "to_k" in k else v for k, v in flat.items()})))
    loc = diagnose.word_localization(blind, timesteps=(600,), n=4)[600]
    assert loc["shape"] == pytest.approx(loc["area"], rel=1e-3)
    assert loc["colour"] == pytest.approx(loc["area"], rel=1e-3)
    assert 0.02 < loc["area"] < 0.3, loc
    loc = diagnose.word_localization(sd, timesteps=(600,), n=4)[600]
    assert loc["shape"] != pytest.approx(loc["area"], rel=1e-3), loc  # a model that sees the text is not blind
    # an object cell's attention over the prompt's tokens sums to 1; blind keys spread it evenly
    images = np.stack([world.render(world.Scene((world.Thing("star", "red", box=(16, 16, 48, 48)),), "grey",
                                                seed=k)) for k in range(2)])
    assert 0.1 < diagnose.object_masks(images).mean() < 0.3, diagnose.object_masks(images).mean()
    share = diagnose.object_attention(blind, images, "a red star", timesteps=(600,), draws=1)
    even = 1.0 / len(share["tokens"])
    np.testing.assert_allclose(share["object"], even, rtol=1e-4)
    np.testing.assert_allclose(share["background"], even, rtol=1e-4)
    share = diagnose.object_attention(sd, images, "a red star", timesteps=(600,), draws=1)
    assert share["tokens"][:2] == [sd.tokenizer.bos_token, "a</w>"], share["tokens"][:4]
    assert share["object"].sum() == pytest.approx(1.0, rel=1e-4)
    assert np.abs(share["object"] - even).max() > 1e-3  # a model that sees the text is not blind
    with pytest.raises(SystemExit):  # the prompts need photos, asked for before any model loads
        diagnose.main(["--model", out, "--object-attention", "a star"])
    assert "--object-attention needs --images" in capsys.readouterr().err
    with pytest.raises(ValueError, match="differs from this recipe"):
        base_model.warm_start({"text_encoder": tp, "unet": {"conv_in": {"kernel": np.zeros((3, 3, 4, 8))}}},
                              sd)
    # a recipe that does not fit the folder stops before any work
    monkeypatch.setitem(base_model.UNET, "block_out_channels", [32, 64, 64])
    work = str(tmp_path / "run")
    assert base_model.main(["--workdir", work, "--init-from", out, "--scenes", "4"]) == 2
    assert "error: --init-from: unet" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(work, "images.npy"))


def assert_matches_diffusers(folder: str, steps: int = 2, n: int = 1) -> np.ndarray:
    """diffusers loads `folder`; its tokenizer, text encoder, UNet and VAE compute what ours do, and
    its own pipeline generates from it. Returns that pipeline's `n` images for "a big red circle"."""
    import diffusers
    import torch

    from cones_jax.pipeline import load_pipeline

    sd = load_pipeline(folder)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ids = sd.tokenizer.encode(["a big red striped star and a blue circle on a grey background"])
    ids_t = pipe.tokenizer(["a big red striped star and a blue circle on a grey background"], padding="max_length",
                           max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    np.testing.assert_array_equal(ids, ids_t.numpy())
    with torch.no_grad():
        ctx_t = pipe.text_encoder(ids_t)[0]
        rng = np.random.default_rng(0)
        side = sd.unet.config.sample_size
        x = rng.standard_normal((1, side, side, 4)).astype(np.float32)
        eps_t = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.tensor([500.0]), ctx_t).sample
        img_t = pipe.vae.decode(torch.from_numpy(x.transpose(0, 3, 1, 2))).sample
    ctx = sd.text_encoder.apply({"params": sd.params["text_encoder"]}, jnp.asarray(ids))["last_hidden_state"]
    np.testing.assert_allclose(np.asarray(ctx), ctx_t.numpy(), atol=1e-4)
    eps = sd.unet.apply({"params": sd.params["unet"]}, jnp.asarray(x), jnp.array([500.0]), ctx)
    np.testing.assert_allclose(np.asarray(eps), eps_t.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    img = sd.vae.apply({"params": sd.params["vae"]}, jnp.asarray(x), method=sd.vae.decode)
    np.testing.assert_allclose(np.asarray(img), img_t.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    # and the whole diffusers pipeline runs on it
    res = pipe("a big red circle", num_inference_steps=steps, guidance_scale=5.0, height=64, width=64,
               output_type="np", num_images_per_prompt=n, generator=torch.Generator().manual_seed(0))
    assert res.images.shape == (n, 64, 64, 3)
    return res.images


DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "demo_model")


def test_shipped_demo_model_runs_in_diffusers():
    """The shipped folder is a plain diffusers Stable Diffusion: PyTorch diffusers loads it, matches our
    modules on its weights, and draws a red object for "a big red circle" in most of 4 samples."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    images = assert_matches_diffusers(DEMO_MODEL, steps=25, n=4)
    red = (images[..., 0] > 0.6) & (images[..., 1] < 0.4) & (images[..., 2] < 0.4)
    assert (red.sum(axis=(1, 2)) >= 40).sum() >= 3, red.sum(axis=(1, 2))


def test_layout_guidance_places_subjects_better_than_none():
    """A small run of the evaluation on the shipped model: with full guidance (official preset at the
    demo model's λ), the 2-subject layouts of the suite get their subjects into their boxes more
    often than without."""
    from cones_jax.pipeline import load_pipeline

    det = detect.load_detector(DETECTOR)
    sd = load_pipeline(DEMO_MODEL)
    cases = [c for c in evaluate.suite() if len(c.names) == 2]
    rows = evaluate.evaluate(sd, det, seeds=[0, 1, 2, 3], presets=("official",), cases=cases, steps=20,
                             residuals=(False,), settings=("no guidance", "full guidance"), log=lambda *_: None)
    none, full = (r["placement@2"] for r in rows)
    assert full >= none + 0.2, (none, full)


def test_the_neuron_subjects_file_is_what_made_the_shipped_neurons():
    """examples/demo_world/neurons.json names each subject's photos, class word and identifier as the
    shipped .cones files and the evaluation have them, so its one command remakes those files."""
    from cones_jax import neurons, subjects

    entries = subjects.read_subjects(os.path.join(evaluate.DEMO_WORLD, "neurons.json"))
    assert sorted(e.name for e in entries) == sorted(evaluate.SUBJECTS)
    for e in entries:
        assert e.word == evaluate.SUBJECTS[e.name].shape and e.overrides == {"identifier": evaluate.IDENTIFIERS[e.name]}
        assert os.path.samefile(e.images, os.path.join(evaluate.DEMO_WORLD, "subjects", e.name))
        shipped = neurons.load_neurons(os.path.join(evaluate.DEMO_NEURONS, f"{e.name}.cones"))
        assert (shipped.identifiers, shipped.classes) == ((evaluate.IDENTIFIERS[e.name],), (e.word,))


def test_concept_neurons_render_their_subjects():
    """A small run of the identity comparison on the shipped model and its shipped concept neurons:
    with a subject's neurons shut, its identifier prompt ("a sks star") draws more of the subject's
    traits than the base model does on that prompt (shape, colour, pattern, outline, eyes: 2.2 of 5
    a subject against 1.5 over 16 seeds, BENCHMARKS.md; 1.9 against 1.25 on these 4); with a pair's
    two sets concatenated, "a sks star and a zwx heart" draws both shapes more often (69% against 44%
    over 16 seeds; 88% against 38% on these 4)."""
    from cones_jax.pipeline import load_pipeline

    det = detect.load_detector(DETECTOR)
    sd = load_pipeline(DEMO_MODEL)
    rows = evaluate.identity_by_method(sd, det, seeds=[0, 1, 2, 3],
                                       methods=("base model, identifier prompt", "concept neurons"),
                                       log=lambda *_: None)
    by = {(r["method"], r["group"]): r for r in rows}
    base, shut = (by[(m, "mean, 1 per image")] for m in ("base model, identifier prompt", "concept neurons"))
    assert sum(shut[t] for t in evaluate.LOOK) >= sum(base[t] for t in evaluate.LOOK) + 0.3, (base, shut)
    base, shut = (by[(m, "mean, 2 per image")] for m in ("base model, identifier prompt", "concept neurons"))
    assert shut["all_shape"] >= base["all_shape"] + 0.1, (base, shut)


def test_residuals_render_their_subjects():
    """A small run of the identity comparison on the shipped residuals: on the class prompt ("a
    star"), each subject's residual at its word draws the subject's shape in its colour, which no
    word asks for, far more often than the base model does (BENCHMARKS.md: 72% against 14% over 16
    seeds; 88% against 25% on these 4)."""
    from cones_jax.pipeline import load_pipeline

    det = detect.load_detector(DETECTOR)
    sd = load_pipeline(DEMO_MODEL)
    rows = evaluate.identity_by_method(sd, det, seeds=[0, 1, 2, 3], groups=[(n,) for n in evaluate.SUBJECTS],
                                       methods=("base model, class prompt", "residuals"), log=lambda *_: None)
    by = {(r["method"], r["group"]): r for r in rows}
    base, res = (by[(m, "mean, 1 per image")] for m in ("base model, class prompt", "residuals"))
    assert res["colour"] >= base["colour"] + 0.4, (base, res)


def test_shipped_artifacts_fit_the_demo_model_in_any_dtype():
    """The shipped .cones and residual files carry the fingerprints of the fp32 demo model; loaded in bf16,
    the model has the same fingerprints (those of its weights as stored), so the files load."""
    from cones_jax import artifacts, neurons
    from cones_jax.pipeline import fingerprint_params, load_pipeline

    cones = sorted(os.path.join(evaluate.DEMO_NEURONS, f) for f in os.listdir(evaluate.DEMO_NEURONS))
    residuals = sorted(os.path.join(evaluate.DEMO_RESIDUALS, f) for f in os.listdir(evaluate.DEMO_RESIDUALS))
    for dtype in ("fp32", "bf16"):
        sd = load_pipeline(DEMO_MODEL, dtype=dtype, components=("unet", "text_encoder"))
        sets = neurons.load_for_model(cones, sd.params["unet"], fingerprint=sd.unet_fingerprint)
        assert {c.unet for c in sets} == {sd.unet_fingerprint}
        # a residual of another text encoder only warns: its recorded fingerprint is compared here
        assert {artifacts.load_residual(p).text_encoder for p in residuals} == {sd.text_encoder_fingerprint}
    assert fingerprint_params(sd.params["unet"]) != sd.unet_fingerprint  # the bf16 params' own would refuse them


def test_workdir_of_another_recipe_is_refused(tmp_path, monkeypatch, capsys):
    work = str(tmp_path / "run")
    os.makedirs(work)
    base_model.check_workdir_recipe(work)  # records this recipe
    base_model.check_workdir_recipe(work)  # and accepts it again
    assert base_model.parse_args(["--workdir", work]).scene_sizes == "words"
    assert base_model.parse_args(["--workdir", work, "--scene-sizes", "continuous"]).scene_sizes == "continuous"
    with pytest.raises(ValueError, match=r"another recipe \(scene_sizes differ\)"):
        base_model.check_workdir_recipe(work, "continuous")  # its images are the other scenes
    monkeypatch.setitem(base_model.UNET, "block_out_channels", [8, 16, 32])
    with pytest.raises(ValueError, match=r"another recipe \(unet differ\)"):
        base_model.check_workdir_recipe(work)
    assert base_model.main(["--workdir", work, "--scenes", "4"]) == 2
    assert "error: --workdir" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(work, "images.npy"))


def test_a_sitting_keys_its_seeds_by_the_steps_it_continues_from(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / base_model.TRAINING_RECORD).write_text(json.dumps({"unet_steps": 5400}))
    work = str(tmp_path / "run")
    os.makedirs(work)
    assert base_model.sitting_offset(work, str(folder)) == 5400
    (folder / base_model.TRAINING_RECORD).write_text(json.dumps({"unet_steps": 9000}))  # --out rewrote it
    assert base_model.sitting_offset(work, str(folder)) == 5400  # a resumed sitting keeps its seeds
    with pytest.raises(ValueError, match="started from .*export, not scratch"):
        base_model.sitting_offset(work, None)  # its checkpoints would silently win over a fresh start
    fresh = str(tmp_path / "fresh")
    os.makedirs(fresh)
    assert base_model.sitting_offset(fresh, None) == 0


def test_single_object_batches_add_to_the_old_draw(capsys):
    scenes = [world.random_scene(i) for i in range(200)]
    singles = np.flatnonzero([len(s.things) == 1 for s in scenes])
    old = [np.sort(training.batch_indices(s, 16, 200, seed=base_model.DATA_SEED + 5)) for s in range(3)]
    for s in range(3):  # no single-object share: every earlier run's data order, unchanged
        np.testing.assert_array_equal(base_model.unet_batch_indices(s, 16, 200, singles, 0, prior=5), old[s])
    seen = []
    for s in range(len(singles)):
        idx = base_model.unet_batch_indices(s, 16, 200, singles, 10, prior=5)
        assert len(idx) == 16 and list(idx) == sorted(idx)
        assert sum(len(scenes[i].things) == 1 for i in idx) >= 10
        seen += list(idx)
    assert set(singles) <= set(seen)  # the single-object pool is shuffled through, not sampled at random
    with pytest.raises(SystemExit):
        base_model.main(["--workdir", "unused", "--single-object-fraction", "1.5"])
    assert "--single-object-fraction 1.5 is not in [0, 1]" in capsys.readouterr().err


def test_crowded_batches_add_to_the_single_object_draw(capsys):
    scenes = [world.random_scene(i) for i in range(200)]
    singles = np.flatnonzero([len(s.things) == 1 for s in scenes])
    multis = np.flatnonzero([len(s.things) >= base_model.CROWDED for s in scenes])
    for s in range(3):  # no crowded share: the single-object runs' data order, unchanged
        np.testing.assert_array_equal(base_model.unet_batch_indices(s, 16, 200, singles, 5, 7, multis, 0),
                                      base_model.unet_batch_indices(s, 16, 200, singles, 5, 7))
    seen = []
    for s in range(len(multis)):
        idx = base_model.unet_batch_indices(s, 16, 200, singles, 5, 7, multis, 6)
        assert len(idx) == 16 and list(idx) == sorted(idx)
        counts = [len(scenes[i].things) for i in idx]
        assert counts.count(1) >= 5 and sum(c >= 3 for c in counts) >= 6
        seen += list(idx)
    assert set(multis) <= set(seen)
    for argv, msg in ((["--multi-object-fraction", "-0.1"], "--multi-object-fraction -0.1 is not in [0, 1 - "),
                      (["--single-object-fraction", "0.5", "--multi-object-fraction", "0.6"],
                       "--multi-object-fraction 0.6 is not in [0, 1 - --single-object-fraction 0.5]")):
        with pytest.raises(SystemExit):
            base_model.main(["--workdir", "unused", *argv])
        assert msg in capsys.readouterr().err


def test_timestep_power_trains_more_on_high_noise(capsys):
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(base_model.sample_timesteps(key, 64, 1000, 0.0),
                                  jax.random.randint(key, (64,), 0, 1000))  # earlier runs' draw, unchanged
    t = np.asarray(base_model.sample_timesteps(key, 100_000, 1000, 1.0))
    assert t.min() >= 0 and t.max() == 999
    assert abs((t >= 850).mean() - (1 - 0.85 ** 2)) < 0.01  # density 2 t / T
    assert abs(t.mean() - 666.5) < 5
    with pytest.raises(SystemExit):
        base_model.main(["--workdir", "unused", "--timestep-power", "-1"])
    assert "--timestep-power -1.0 is negative" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    from cones_jax.tokenizer import write_clip_tokenizer

    return write_clip_tokenizer(str(tmp_path_factory.mktemp("tok")), base_model.vocabulary(),
                                max_length=base_model.MAX_LENGTH)


def test_grounding_targets_cover_each_trait_words_objects(demo_tokenizer):
    red_star = world.Thing("star", "red", "striped", box=(4.0, 4.0, 28.0, 28.0))
    red_ring = world.Thing("ring", "red", box=(36.0, 36.0, 60.0, 60.0))
    blue_star = world.Thing("star", "blue", box=(36.0, 4.0, 60.0, 28.0))
    scene = world.Scene((red_star, red_ring, blue_star), "grey", seed=0)
    caption = "a red striped star , a red ring and a blue star on a grey background"
    ids = demo_tokenizer.encode([caption])
    targets = base_model.grounding_targets([scene], ids, base_model.grounded_word_ids(demo_tokenizer), (16, 8))
    assert set(targets) == {"ground_256", "ground_64", "shape_tokens"}
    assert targets["ground_256"].shape == (1, 256, ids.shape[1])
    words = ["<start>"] + caption.split()
    marked = [words[k] for k in np.flatnonzero(targets["shape_tokens"][0]) if k < len(words)]
    assert marked == ["star", "ring", "star"] and targets["shape_tokens"].sum() == 3

    def cover(word):
        return targets["ground_256"][0, :, words.index(word)].reshape(16, 16)

    def body(t):
        x0, y0, x1, y1 = t.box
        return world.shape_mask(t.shape, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, 64).reshape(
            16, 4, 16, 4).mean(axis=(1, 3))

    np.testing.assert_allclose(cover("red"), np.maximum(body(red_star), body(red_ring)), atol=1e-6)
    np.testing.assert_allclose(cover("star"), np.maximum(body(red_star), body(blue_star)), atol=1e-6)
    np.testing.assert_allclose(cover("striped"), body(red_star), atol=1e-6)
    assert 0 < cover("ring").sum() < body(world.Thing("circle", "red", box=red_ring.box)).sum()  # its hole
    for k, w in enumerate(words):  # every other token (and the padding) is left out of the loss
        if w not in base_model.GROUNDED_WORDS:
            assert not targets["ground_256"][0, :, k].any() and not targets["ground_64"][0, :, k].any(), w
    np.testing.assert_allclose(targets["ground_64"][0].sum(0), targets["ground_256"][0].sum(0) / 4, rtol=1e-5)


def test_grounding_loss_is_the_share_of_attention_off_the_object():
    cover = np.zeros((2, 4, 3), np.float32)
    cover[0, :2, 1] = 1.0  # token 1 of example 0 names an object on the first two of four cells
    cover[1, 3, 2] = 0.5   # token 2 of example 1: half a cell
    batch = {"ground_4": jnp.asarray(cover)}
    on_object = np.zeros((2, 4, 3), np.float32)
    on_object[0, :2, :] = 0.5
    on_object[1, 3, :] = 1.0
    # all of token 1's mass on its cells; token 2 of example 1: 1 - 0.5 = 0.5 of it off the object
    assert float(base_model.grounding_loss({"a": jnp.asarray(on_object)}, batch)) == pytest.approx(0.5 * 0.25)
    uniform = jnp.full((2, 4, 3), 0.25)
    want = 0.5 * ((1 - 0.5) ** 2 + (1 - 0.125) ** 2)
    assert float(base_model.grounding_loss({"a": uniform, "b": uniform}, batch)) == pytest.approx(want)
    assert float(base_model.grounding_loss({"a": uniform}, {"ground_4": jnp.zeros((2, 4, 3))})) == 0.0


def test_pixel_grounding_loss_is_the_cross_entropy_of_shape_attention_against_cover():
    cover = np.zeros((1, 4, 3), np.float32)
    cover[0, :2, 1] = 1.0   # token 1 names a shape covering the first two of four cells
    cover[0, 1:3, 2] = 1.0  # token 2 names a colour: grounded by the token loss, not this one
    probs = np.full((1, 4, 3), 0.2, np.float32)
    probs[0, :2, 1] = 0.8
    batch = {"ground_4": jnp.asarray(cover), "shape_tokens": jnp.asarray([[0.0, 1.0, 0.0]])}
    want = -(2 * np.log(0.8) + 2 * np.log(0.8)) / 4  # inside p = 0.8 of 1, outside 0.2 of 0
    got = base_model.pixel_grounding_loss({"a": jnp.asarray(probs)}, batch)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # attention that matches the cover does better than attention on a spot inside it, which the
    # token loss alone cannot tell apart from it (all of the mass is on the object either way)
    on_cover = probs * cover
    spot = on_cover.copy()
    spot[0, :, 1] = [0.8, 0.0, 0.0, 0.0]
    assert float(base_model.grounding_loss({"a": jnp.asarray(spot)}, batch)) == pytest.approx(
        float(base_model.grounding_loss({"a": jnp.asarray(on_cover)}, batch)))
    assert float(base_model.pixel_grounding_loss({"a": jnp.asarray(spot)}, batch)) > float(
        base_model.pixel_grounding_loss({"a": jnp.asarray(on_cover)}, batch))
    assert float(base_model.pixel_grounding_loss({"a": jnp.asarray(probs)}, dict(
        batch, shape_tokens=jnp.zeros((1, 3))))) == 0.0


def test_grounding_weight_adds_a_term_and_zero_keeps_the_old_loss(demo_tokenizer, capsys):
    text, unet = base_model.models(demo_tokenizer.vocab_size)
    assert base_model.cross_attention_sides(unet) == (16, 8)
    inputs = base_model.init_inputs()
    params = {"text_encoder": base_model.init_params(text, *inputs["text_encoder"], seed=2),
              "unet": base_model.init_params(unet, *inputs["unet"], seed=3)}
    scenes = [world.random_scene(i) for i in range(2)]
    ids = demo_tokenizer.encode([world.caption(s) for s in scenes])
    rng = np.random.default_rng(0)
    batch = {"mean": rng.standard_normal((2, 32, 32, 4)).astype(np.float32),
             "std": np.full((2, 32, 32, 4), 0.01, np.float32), "ids": ids}
    grounded = dict(batch, **base_model.grounding_targets(scenes, ids, base_model.grounded_word_ids(demo_tokenizer),
                                                          (16, 8)))
    key = jax.random.PRNGKey(0)
    # jitted: run op by op, the UNet's forward and backward took most of this test's minute
    plain, parts = jax.jit(base_model.make_diffusion_loss(unet, text, 0.5))(params, None, batch, key)
    assert set(parts) == {"mse"}
    loss_fn = base_model.make_diffusion_loss(unet, text, 0.5, grounding_weight=0.1, grounding_pixel_weight=0.05)

    def ground(p):  # the grounding term, with the whole loss as aux
        total, gparts = loss_fn(p, None, grounded, key)
        return gparts["ground"], (total, gparts)

    (_, (total, gparts)), grads = jax.jit(jax.value_and_grad(ground, has_aux=True))(params)
    assert float(gparts["mse"]) == pytest.approx(float(parts["mse"]), rel=1e-5)
    assert 0.0 < float(gparts["ground"]) < 1.0
    assert 0.0 < float(gparts["pixel"])
    assert float(total) == pytest.approx(float(plain) + 0.1 * float(gparts["ground"]) + 0.05 * float(gparts["pixel"]),
                                         rel=1e-5)
    to_k = grads["unet"]["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"]
    assert float(jnp.abs(to_k).sum()) > 0  # the keys learn where words attend
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads["text_encoder"]))) > 0
    with pytest.raises(SystemExit):
        base_model.main(["--workdir", "unused", "--grounding-weight", "-0.1"])
    assert "--grounding-weight -0.1 is negative" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        base_model.main(["--workdir", "unused", "--grounding-pixel-weight", "-1"])
    assert "--grounding-pixel-weight -1.0 is negative" in capsys.readouterr().err


def test_evaluate_cli_refuses_a_bad_override_before_loading(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", "/nonexistent", "--set", "self_recurence=False"])
    assert e.value.code == 2 and "has no key 'self_recurence'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--model", "/nonexistent", "--set", "steps"])
    assert "must look like key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--model", "/nonexistent", "--neurons", "/nonexistent", "--identity-only"])
    assert "lacks sunny.cones" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--model", "/nonexistent", "--methods", "residuals"])
    assert "add --identity-only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--model", "/nonexistent", "--residuals", "/nonexistent", "--residual-rows"])
    assert "--residual-rows: /nonexistent lacks a residual" in capsys.readouterr().err


def test_figure_lays_photos_beside_samples(capsys, tmp_path):
    """The README figure: each subject's photos (found by its residual's name), then the samples;
    tiles enlarged without blurring. A layout whose subjects have no photos is one line, exit 2,
    before the model loads."""
    from PIL import Image

    from cones_jax import bundled
    from cones_jax import layout as layout_lib
    from cones_jax.demo import figure

    lay = layout_lib.load_layout(bundled.resolve_layout("demo:two_subjects"))
    rows = figure.subject_photos(lay)
    assert [label.split()[0] for label, _ in rows] == ["sunny", "dotty"]
    assert all(len(photos) == 4 and photos[0].shape == (64, 64, 3) for _, photos in rows)
    tile = np.zeros((64, 64, 3), np.uint8)
    tile[:32] = 255
    out = figure.compose(rows + [("samples", [tile] * 2)], scale=2)
    assert out.width == 4 * 128 + 3 * figure.GAP
    last = np.asarray(out)[-128:, :128]
    assert set(np.unique(last)) == {0, 255}  # nearest-pixel scaling: no blended edge
    assert last[63].min() == 255 and last[64].max() == 0
    assert figure.main(["--photos", str(tmp_path), "--out", str(tmp_path / "f.png")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "f.png").exists()
    assert isinstance(out, Image.Image)
