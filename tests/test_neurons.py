"""Cones concept neurons (Alg. A2) on a tiny random SD 1.x folder: Theorem 3.1, the artifact, the
union of sets, the effect of shutting, sharding, the CLIs and their bad input."""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tiny_checkpoints import make_sd, random_photos

from cones_jax import neurons, training
from cones_jax import sample as sample_cli
from cones_jax import train as train_cli
from cones_jax.convert import flatten, unflatten
from cones_jax.fileio import load_safetensors, save_safetensors

RES = 32  # pixels; the tiny VAE halves it -> 16x16 latents



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sd"))
    make_sd(root, "sd1")
    base = tmp_path_factory.mktemp("data")
    return root, random_photos(str(base / "dog"), 2, 0), random_photos(str(base / "class_dog"), 3, 1)


def _cfg(**kw):
    return neurons.load_train_config(overrides=dict(dict(resolution=RES, batch=2, rho=1e-2), **kw))


@pytest.fixture(scope="module")
def setup(tiny):
    root, images, classes = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return neurons.setup_neurons(root, neurons.Subject(images, "dog", "sks"), cfg=_cfg(), class_dir=classes,
                                     log=lambda s: None)


def _loss_at(setup, xi, step):
    """L_con at the search's step `step` (same batch and randomness), with kernels ξ⊙θ."""
    rng = jax.random.fold_in(jax.random.PRNGKey(setup.cfg["seed"]), step)
    offsets = {k: v - 1.0 for k, v in xi.items()}
    return neurons.concept_loss(setup.spec, {"xi_offset": offsets}, setup.frozen, setup.host_batch(step), rng)[0]


def test_theorem_3_1_one_step(setup):
    """K = 1: the selected set {M_p > τ} equals {θ·∂L/∂θ > τ} (Theorem 3.1, Eq. 9)."""
    rho = 1e-4
    import dataclasses

    setup = dataclasses.replace(setup, cfg=dict(setup.cfg, rho=rho))
    scores, _ = neurons.search(setup, steps=1, progress=False, log=lambda s: None)
    zeros = setup.initial_params()["xi_offset"]
    leaves = flatten(setup.frozen["unet"])

    def loss_theta(sub):
        """L_con as a function of the searched kernels themselves (ξ = 1)."""
        tree = dict(leaves)
        for p, v in sub.items():
            tree[tuple(p.split("/"))] = v
        frozen = dict(setup.frozen, unet=unflatten(tree))
        rng = jax.random.fold_in(jax.random.PRNGKey(setup.cfg["seed"]), 0)
        return neurons.concept_loss(setup.spec, {"xi_offset": zeros}, frozen, setup.host_batch(0), rng)[0]

    sub = {p: leaves[tuple(p.split("/"))] for p in setup.paths}
    grads = jax.grad(loss_theta)(sub)
    prod = {p: np.asarray(sub[p] * grads[p]) for p in setup.paths}
    allv = np.sort(np.concatenate([v.ravel() for v in prod.values()]))
    np.testing.assert_allclose(np.concatenate([scores[p].ravel() for p in setup.paths]),
                               np.concatenate([prod[p].ravel() for p in setup.paths]),
                               atol=1e-4 * np.abs(allv).max(), rtol=0)
    # τ in the widest gap among the top 5% of products: the two sets must be identical
    top = allv[int(0.95 * len(allv)):int(0.99 * len(allv))]
    k = int(np.argmax(np.diff(top)))
    tau = float((top[k] + top[k + 1]) / 2)
    assert tau > 0 and top[k + 1] - top[k] > 2 * np.abs(np.concatenate(
        [(scores[p] - prod[p]).ravel() for p in setup.paths])).max()
    got = neurons.select_neurons(scores, tau)
    want = {p: np.flatnonzero(prod[p].ravel() > tau) for p in setup.paths}
    for p in setup.paths:
        np.testing.assert_array_equal(got[p], want[p])


def _random_set(setup, frac, seed, identifier="sks"):
    rng = np.random.default_rng(seed)
    idx = {p: np.sort(rng.choice(int(np.prod(setup.shapes[p])), max(1, int(frac * np.prod(setup.shapes[p]))),
                                 replace=False)).astype(np.int64) for p in setup.paths}
    return neurons.ConceptNeurons(idx, {p: setup.shapes[p] for p in setup.paths}, (identifier,), ("dog",),
                                  setup.fingerprint)


def test_artifact_roundtrip_both_encodings(setup, tmp_path):
    for frac, enc in ((0.003, "delta"), (0.4, "bitmap")):
        cn = _random_set(setup, frac, 0)
        path = str(tmp_path / f"{enc}.cones")
        neurons.save_neurons(path, cn)
        _, meta = load_safetensors(path)
        assert {v["encoding"] for v in json.loads(meta["tensors"]).values()} == {enc}
        back = neurons.load_neurons(path, unet_fingerprint=setup.fingerprint, unet_shapes=setup.shapes)
        for p in setup.paths:
            np.testing.assert_array_equal(back.indices[p], cn.indices[p])
        m1 = neurons.masks(cn.indices, cn.shapes)
        m2 = neurons.masks(back.indices, back.shapes)
        assert all(np.array_equal(m1[p], m2[p]) for p in setup.paths)
        assert back.identifiers == ("sks",) and back.classes == ("dog",)
        # the payload beats both raw int32 indices and a raw bitmap (plus deflate's few bytes per tensor)
        payload = sum(np.asarray(v).nbytes for v in load_safetensors(path)[0].values())
        assert payload <= min(4 * cn.count, cn.searched / 8) + 16 * len(setup.paths), (payload, cn.count)


def test_neurons_searched_in_fp32_load_under_bf16(setup, tiny, tmp_path):
    from cones_jax.pipeline import load_pipeline

    path = str(tmp_path / "fp32.cones")
    neurons.save_neurons(path, _random_set(setup, 0.01, 4))
    sd = load_pipeline(tiny[0], dtype="bf16", components=("unet",))
    (back,) = neurons.load_for_model([path], sd.params["unet"], fingerprint=sd.unet_fingerprint)
    assert back.unet == setup.fingerprint == sd.unet_fingerprint
    with pytest.raises(neurons.NeuronsError, match="another base model"):  # the bf16 params' own fingerprint
        neurons.load_for_model([path], sd.params["unet"])
    # and through the command line, as a user runs it
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"prompt": "a dog on the beach", "size": [32, 32],
                                  "subjects": [{"word": "dog", "box": [0, 0, 1, 1]}]}))
    rc = sample_cli.main(["--layout", str(layout), "--model", tiny[0], "--out", str(tmp_path / "out"), "--steps", "1",
                          "--seeds", "0", "--dtype", "bf16", "--neurons", path])
    assert rc == 0 and (tmp_path / "out" / "layout_seed0000.png").exists()


def test_union_is_the_product_of_masks(setup):
    a, b = _random_set(setup, 0.05, 1), _random_set(setup, 0.05, 2, "xyz")
    u = neurons.union([a, b])
    mu = neurons.masks(u, a.shapes)
    ma, mb = neurons.masks(a.indices, a.shapes), neurons.masks(b.indices, b.shapes)
    for p in setup.paths:
        np.testing.assert_array_equal(mu[p], ma[p] * mb[p])
    shut = neurons.apply_neurons(setup.frozen["unet"], [a, b])
    got, orig = flatten(shut), flatten(setup.frozen["unet"])
    for p in setup.paths:
        key = tuple(p.split("/"))
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(orig[key]) * mu[p])


def test_shutting_neurons_lowers_the_loss(setup):
    steps = 4
    scores, _ = neurons.search(setup, steps=steps, progress=False, log=lambda s: None)
    idx = neurons.select_neurons(scores, neurons.tau_for_sparsity(scores, 0.005))
    mask = {p: jnp.asarray(m) for p, m in neurons.masks(idx, {p: setup.shapes[p] for p in setup.paths}).items()}
    ones = {k: v + 1.0 for k, v in setup.initial_params()["xi_offset"].items()}
    before = np.mean([float(_loss_at(setup, ones, k)) for k in range(steps)])
    after = np.mean([float(_loss_at(setup, mask, k)) for k in range(steps)])
    assert after < before, (after, before)


def test_sharded_search_equals_single_device(tiny):
    root, images, classes = tiny
    assert len(jax.devices()) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s8 = neurons.setup_neurons(root, neurons.Subject(images, "dog", "sks"), cfg=_cfg(batch=8),
                                   class_dir=classes, log=lambda s: None)
    one = neurons.search(s8, steps=2, progress=False, mesh=training.make_mesh(8, jax.devices()[:1]),
                         log=lambda s: None)[0]
    eight = neurons.search(s8, steps=2, progress=False, log=lambda s: None)[0]
    scale = max(np.abs(v).max() for v in one.values())
    for p in s8.paths:
        np.testing.assert_allclose(eight[p], one[p], atol=1e-4 * scale + 2e-5, rtol=0)


def test_bad_artifacts(setup, tmp_path):
    cn = _random_set(setup, 0.01, 3)
    path = str(tmp_path / "a.cones")
    neurons.save_neurons(path, cn)
    with pytest.raises(ValueError, match="sorted"):
        neurons.encode_indices(np.array([5, 2]), 10)
    with pytest.raises(neurons.NeuronsError, match="another base model"):
        neurons.load_neurons(path, unet_fingerprint="0123456789abcdef")
    tensors, meta = load_safetensors(path)
    table = json.loads(meta["tensors"])
    p0 = setup.paths[0]
    size = int(np.prod(setup.shapes[p0]))
    cases = (("dup", np.array([3, 3, 7]), "overlap"), ("range", np.array([1, size + 5]), "out of range"))
    for name, idx, match in cases:
        raw, enc = neurons.encode_indices(idx, size + 64)
        bad_tensors = dict({k: np.asarray(v) for k, v in tensors.items()}, **{p0: np.frombuffer(raw, np.uint8)})
        bad_table = dict(table, **{p0: {"shape": list(setup.shapes[p0]), "count": len(idx), "encoding": enc}})
        bad = str(tmp_path / f"{name}.cones")
        save_safetensors(bad, bad_tensors, dict(meta, tensors=json.dumps(bad_table)))
        with pytest.raises(neurons.NeuronsError, match=match):
            neurons.load_neurons(bad)
    scores = {p: np.linspace(-1, 1, int(np.prod(setup.shapes[p]))).reshape(setup.shapes[p]) for p in setup.paths}
    with pytest.raises(neurons.NeuronsError, match="selects no neuron"):
        neurons.select_neurons(scores, 5.0)
    with pytest.raises(neurons.NeuronsError, match="every searched weight"):
        neurons.select_neurons(scores, -5.0)


def test_cli_search_then_sample(tiny, tmp_path, capsys, monkeypatch):
    root, images, _ = tiny
    out = str(tmp_path / "dog.cones")
    monkeypatch.setenv("CONES_JAX_CACHE", str(tmp_path / "cache"))
    beside_photos = sorted(os.listdir(os.path.dirname(images)))
    argv = ["neurons", "--model", root, "--images", images, "--class", "dog", "--out", out, "--steps", "2",
            "--sparsity", "0.01", "--batch", "2", "--no-progress",
            "--set", "resolution=32", "--set", "num_class_images=2", "--set", "class_steps=2",
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "1"]
    rc = train_cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 0, err
    cn = neurons.load_neurons(out)
    assert 0 < cn.count < cn.searched
    # no --class-images: the base model's class images go to the cache, keyed by its UNet, not beside the photos
    class_dir = neurons.default_class_dir(cn.unet, neurons.load_train_config(
        overrides={"class_steps": 2}), "dog")
    assert class_dir.startswith(str(tmp_path / "cache" / "class_images" / cn.unet))
    assert len(os.listdir(class_dir)) == 2 and "concept neurons" in err
    assert sorted(os.listdir(os.path.dirname(images))) == beside_photos
    # resuming a finished run changes nothing; a second run into the same checkpoints needs --resume
    rc = train_cli.main(argv + ["--overwrite"])
    assert rc == 2 and "--resume" in capsys.readouterr().err
    # bad τ: one line, exit 2, nothing written
    bad_out = str(tmp_path / "bad.cones")
    rc = train_cli.main(["neurons", "--model", root, "--images", images, "--class", "dog", "--out", bad_out,
                         "--steps", "1", "--tau", "1e9", "--class-images", class_dir, "--no-progress",
                         "--set", "resolution=32"])
    errs = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errs) == 1 and "selects no neuron" in errs[0] and not os.path.exists(bad_out)

    layout = str(tmp_path / "layout.json")
    with open(layout, "w") as f:
        json.dump({"prompt": "a photo of a sks dog on the beach", "size": [32, 32],
                   "subjects": [{"word": "dog", "box": [0.0, 0.0, 0.5, 1.0]}]}, f)
    base = ["--layout", layout, "--model", root, "--seeds", "0", "--steps", "2"]
    assert sample_cli.main(base + ["--out", str(tmp_path / "plain")]) == 0
    assert sample_cli.main(base + ["--out", str(tmp_path / "shut"), "--neurons", out]) == 0
    a = np.asarray(Image.open(tmp_path / "plain" / "layout_seed0000.png"), np.float32)
    b = np.asarray(Image.open(tmp_path / "shut" / "layout_seed0000.png"), np.float32)
    assert np.abs(a - b).max() > 0
    capsys.readouterr()
    rc = sample_cli.main(base + ["--out", str(tmp_path / "x"), "--neurons", str(tmp_path / "missing.cones")])
    errs = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errs) == 1 and not os.path.exists(tmp_path / "x")


def test_kept_scores_cut_again_without_a_search(tiny, tmp_path, capsys):
    """`neurons --keep-scores` writes the scores beside the .cones file; `neurons-cut` at the search's
    sparsity writes the same neurons, at another sparsity more of them, and bad input is one line
    that writes nothing."""
    root, images, classes = tiny
    out = str(tmp_path / "dog.cones")
    rc = train_cli.main(["neurons", "--model", root, "--images", images, "--class", "dog", "--out", out,
                         "--steps", "2", "--sparsity", "0.01", "--batch", "2", "--no-progress", "--keep-scores",
                         "--class-images", classes, "--set", "resolution=32"])
    assert rc == 0, capsys.readouterr().err
    kept = str(tmp_path / "dog.scores.safetensors")
    assert "scores in " + kept in capsys.readouterr().err
    found = neurons.load_neurons(out)
    ns = neurons.load_neuron_scores(kept)
    assert (ns.identifiers, ns.classes, ns.unet) == (found.identifiers, found.classes, found.unet)
    assert {k: v.shape for k, v in ns.scores.items()} == found.shapes

    assert train_cli.main(["neurons-cut", "--scores", kept, "--sparsity", "0.01", "--out-dir",
                           str(tmp_path / "again")]) == 0
    again = neurons.load_neurons(str(tmp_path / "again" / "dog.cones"))
    assert again.meta == found.meta and again.unet == found.unet
    for k in found.indices:
        np.testing.assert_array_equal(again.indices[k], found.indices[k])
    assert train_cli.main(["neurons-cut", "--scores", kept, "--sparsity", "0.03", "--out",
                           str(tmp_path / "more.cones")]) == 0
    more = neurons.load_neurons(str(tmp_path / "more.cones"))
    assert more.count == round(0.03 * found.searched) and more.count > found.count
    assert all(set(found.indices[k]) <= set(more.indices[k]) for k in found.indices)  # the same ranking, cut lower
    capsys.readouterr()

    bad = str(tmp_path / "bad.cones")
    for argv, says in [(["--scores", out, "--sparsity", "0.01", "--out", bad], "not a cones_jax neuron-scores"),
                       (["--scores", kept, kept, "--sparsity", "0.01", "--out", bad], "--out takes one"),
                       (["--scores", kept, "--sparsity", "1.5", "--out", bad], "--sparsity must be in (0, 1)"),
                       (["--scores", kept, "--tau", "1e9", "--out", bad], "selects no neuron"),
                       (["--scores", str(tmp_path / "no.scores.safetensors"), "--tau", "0", "--out", bad],
                        "does not exist"),
                       (["--scores", kept, "--sparsity", "0.01", "--out", str(tmp_path / "more.cones")],
                        "--overwrite")]:
        rc = train_cli.main(["neurons-cut"] + argv)
        errs = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errs) == 1 and says in errs[0], (argv, errs)
    assert not os.path.exists(bad)
    assert neurons.load_neurons(str(tmp_path / "more.cones")).count == more.count  # left as it was


def test_joint_loss_of_one_subject_is_its_concept_loss(setup):
    """Sec. 3.3's summed loss over S = 1 subject is Eq. 4, draw for draw."""
    joint = neurons.JointSetup([setup])
    params = setup.initial_params()
    rng = jax.random.PRNGKey(3)
    one, _ = neurons.concept_loss(setup.spec, params, setup.frozen, setup.host_batch(0), rng)
    summed, _ = neurons.joint_concept_loss(setup.spec, params, joint.frozen, joint.host_batch(0), rng)
    np.testing.assert_allclose(float(summed), float(one), rtol=1e-6)


def test_joint_finetune_stays_in_the_union(tiny, tmp_path, capsys):
    """Two subjects searched apart, then fine-tuned together (Sec. 3.3): ξ moves only at the union of
    their neurons, the kept set is the top of the union by joint score, and the CLI writes one file
    holding both subjects; bad input is one line each."""
    root, images, classes = tiny
    cat_images = random_photos(str(tmp_path / "cat"), 2, 5)
    common = ["--steps", "2", "--sparsity", "0.01", "--class-images", classes, "--no-progress",
              "--set", "resolution=32"]
    a, b = str(tmp_path / "dog.cones"), str(tmp_path / "cat.cones")
    assert train_cli.main(["neurons", "--model", root, "--images", images, "--class", "dog", "--out", a] + common) == 0
    assert train_cli.main(["neurons", "--model", root, "--images", cat_images, "--class", "cat", "--identifier",
                           "xyz", "--out", b] + common) == 0
    sets = [neurons.load_neurons(a), neurons.load_neurons(b)]
    shut = neurons.union(sets)

    # the restricted search itself: zero scores outside the union, moving ones inside
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setups = [neurons.setup_neurons(root, neurons.Subject(img, cls, ident), cfg=_cfg(), class_dir=classes,
                                        log=lambda s: None)
                  for img, cls, ident in ((images, "dog", "sks"), (cat_images, "cat", "xyz"))]
    joint = neurons.JointSetup(setups)
    allowed = neurons.only_at(shut, {k: joint.shapes[k] for k in joint.paths})
    scores, _ = neurons.search(joint, steps=2, progress=False, allowed=allowed, log=lambda s: None)
    for k, v in scores.items():
        inside = np.zeros(v.size, bool)
        inside[shut.get(k, [])] = True
        assert np.all(v.ravel()[~inside] == 0), k
    assert sum(np.count_nonzero(v.ravel()[shut[k]]) for k, v in scores.items() if k in shut) > 0

    out = str(tmp_path / "dog_cat.cones")
    argv = ["neurons-joint", "--model", root, "--neurons", a, b, "--images", images, cat_images,
            "--class-images", classes, classes, "--out", out, "--steps", "2", "--keep", "0.5", "--no-progress",
            "--set", "resolution=32"]
    assert train_cli.main(argv) == 0, capsys.readouterr().err
    cn = neurons.load_neurons(out)
    n_union = sum(len(v) for v in shut.values())
    assert cn.identifiers == ("sks", "xyz") and cn.classes == ("dog", "cat")
    assert abs(cn.count - n_union / 2) <= 1
    for k, v in cn.indices.items():
        assert np.isin(v, shut.get(k, [])).all(), k
    capsys.readouterr()
    for bad, msg in ((["--neurons", a, "--images", images], "at least two"),
                     (["--neurons", a, b, "--images", images], "one folder of photos per file")):
        rc = train_cli.main(["neurons-joint", "--model", root, "--out", str(tmp_path / "bad.cones"), "--no-progress"]
                            + bad)
        errs = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errs) == 1 and msg in errs[0], errs
        assert not os.path.exists(tmp_path / "bad.cones")
