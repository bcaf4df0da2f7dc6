"""Many subjects' concept neurons in one run (`neurons.train_neurons_many`) on a tiny random SD 1.x
folder under 8 fake CPU devices: the same neurons as one `train_neurons` run per subject, bad
subjects, finished subjects, and a resume with other subjects."""

import os
import warnings

import jax
import numpy as np
import pytest
from tiny_checkpoints import make_sd, random_photos

from cones_jax import neurons, subjects
from cones_jax.errors import CheckpointError, DataError

RES = 32
COMMON = dict(resolution=RES, batch=2, rho=1e-2, steps=2)



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sd"))
    make_sd(root, "sd1")
    base = tmp_path_factory.mktemp("data")
    classes = str(base / "classes")
    random_photos(os.path.join(classes, "dog"), 3, 1)
    random_photos(os.path.join(classes, "cat"), 2, 2)
    entries = [subjects.SubjectEntry("rex", random_photos(str(base / "rex"), 2, 10), "dog"),
               subjects.SubjectEntry("tom", random_photos(str(base / "tom"), 3, 11), "cat",
                                     {"seed": 5, "identifier": "xyz"}),
               subjects.SubjectEntry("max", random_photos(str(base / "max"), 2, 12), "dog", {"sparsity": 0.02})]
    return root, classes, entries


def _quiet(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return args[0](*args[1:], **kw)


def test_multi_subject_run_equals_single_runs(tiny, tmp_path, monkeypatch):
    """3 subjects (two classes, per-subject seed, identifier and sparsity) in one run on 8 devices
    find the neurons of 3 separate `train_neurons` runs, with the same scores."""
    root, classes, entries = tiny
    assert len(jax.devices()) == 8
    found: list = []
    search = neurons.search
    monkeypatch.setattr(neurons, "search", lambda *a, **k: found.append(search(*a, **k)) or found[-1])
    singles = []
    for e in entries:
        ov = dict(e.overrides)
        sparsity = ov.pop("sparsity", 0.01)
        singles.append(_quiet(neurons.train_neurons, root, e.images, e.word, str(tmp_path / "one" / f"{e.name}.cones"),
                              neurons.SearchOptions(overrides={**COMMON, **ov}, sparsity=sparsity, progress=False,
                                                    class_dir=os.path.join(classes, e.word)), log=lambda s: None))
    single_scores = [f[0] for f in found]

    lines: list[str] = []
    scores: list = []
    out_dir = str(tmp_path / "many")
    many = _quiet(neurons.train_neurons_many, root, entries, out_dir,
                  neurons.SearchOptions(overrides=COMMON, sparsity=0.01, class_dir=classes, progress=False,
                                        keep_scores=True),
                  scores=scores, log=lines.append)
    assert [cn.path for cn in many] == [os.path.join(out_dir, f"{e.name}.cones") for e in entries]
    for e, one, got, s_one, s_many in zip(entries, singles, many, single_scores, scores):
        back = neurons.load_neurons(os.path.join(out_dir, f"{e.name}.cones"))
        one_back = neurons.load_neurons(one.path)
        # τ is a midpoint of two scores, which the two runs agree on only to float noise (as the scores below)
        tau, one_tau = float(back.meta.pop("tau")), float(one_back.meta.pop("tau"))
        assert tau == pytest.approx(one_tau, rel=1e-4), e.name
        assert (back.identifiers, back.classes, back.unet, back.meta, back.shapes) == (
            one_back.identifiers, one_back.classes, one_back.unet, one_back.meta, one_back.shapes), e.name
        scale = max(np.abs(v).max() for v in s_one.values())
        for k in s_one:
            np.testing.assert_allclose(s_many[k], s_one[k], atol=1e-4 * scale, rtol=0, err_msg=f"{e.name} {k}")
            np.testing.assert_array_equal(back.indices[k], one.indices[k], err_msg=f"{e.name} {k}")
            np.testing.assert_array_equal(got.indices[k], one.indices[k])
        kept = neurons.load_neuron_scores(os.path.join(out_dir, f"{e.name}.scores.safetensors"))
        assert kept.identifiers == back.identifiers and all(np.array_equal(kept.scores[k], s_many[k]) for k in s_many)
    assert singles[1].identifiers == ("xyz",)
    assert singles[2].count > singles[0].count  # max's own sparsity
    assert any("3 subject(s) in one run" in line for line in lines)


def test_multi_subject_skip_bad_overwrite_and_resume(tiny, tmp_path):
    """A bad subject refuses the run unless skip_bad; finished subjects are skipped unless overwrite;
    a resume with other subjects is refused in one line."""
    root, classes, entries = tiny
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    bad = [subjects.SubjectEntry("nophotos", empty, "dog"),
           subjects.SubjectEntry("shape", entries[0].images, "dog", {"rho": 1.0})]
    out_dir = str(tmp_path / "out")
    # model_parallel=2: the frozen UNet on a (subject, data, model=2) mesh
    opts = neurons.SearchOptions(overrides=dict(COMMON, steps=1, checkpoint_every=1, model_parallel=2), sparsity=0.01,
                                 class_dir=classes, progress=False, checkpoint_dir=str(tmp_path / "ckpt"))
    lines: list[str] = []
    with pytest.raises(DataError, match="2 of 4 subject"):
        neurons.train_neurons_many(root, bad + entries[:2], out_dir, opts, log=lines.append)
    assert any("'nophotos'" in line and "no images" in line for line in lines)
    assert any("'shape'" in line and "'rho'" in line for line in lines)
    assert not os.path.exists(out_dir) and not os.path.exists(tmp_path / "ckpt")

    lines.clear()
    got = _quiet(neurons.train_neurons_many, root, bad + entries[:2], out_dir, opts, skip_bad=True, log=lines.append)
    assert [cn.identifiers for cn in got] == [("sks",), ("xyz",)]
    assert sorted(os.listdir(out_dir)) == ["rex.cones", "tom.cones"]
    assert sum(line.startswith("skipping subject") for line in lines) == 2
    assert any("'model': 2" in line for line in lines)

    # finished subjects are skipped: nothing left to do, nothing loads
    lines.clear()
    mtime = os.path.getmtime(os.path.join(out_dir, "rex.cones"))
    assert neurons.train_neurons_many(root, entries[:2], out_dir, opts, log=lines.append) == []
    assert any("skipping 2 subject(s)" in line for line in lines)
    assert os.path.getmtime(os.path.join(out_dir, "rex.cones")) == mtime

    with pytest.raises(neurons.NeuronsError, match="model_parallel"):
        neurons.train_neurons_many(root, entries[:1], out_dir, opts, overwrite=True, overrides=dict(
            opts.overrides, model_parallel=3), log=lambda s: None)
    # a resume with another list of subjects is refused, one line naming the difference
    with pytest.raises(CheckpointError, match="holds 2 subject.*trains 2 .*lacks 'max'"):
        _quiet(neurons.train_neurons_many, root, [entries[0], entries[2]], out_dir, opts, overwrite=True,
               resume=True, log=lambda s: None)
    # the same subjects resume (the run is finished: the files are rewritten from the checkpoint)
    again = _quiet(neurons.train_neurons_many, root, entries[:2], out_dir, opts, overwrite=True, resume=True,
                   log=lambda s: None)
    assert [cn.indices.keys() for cn in again] == [cn.indices.keys() for cn in got]
    for a, b in zip(again, got):
        for k in a.indices:
            np.testing.assert_array_equal(a.indices[k], b.indices[k])

    # A run that stopped while writing its files left some written: --resume (without --overwrite)
    # restores the whole list from the checkpoint, keeps the written file and writes the missing one.
    os.remove(os.path.join(out_dir, "tom.cones"))
    kept = os.path.getmtime(os.path.join(out_dir, "rex.cones"))
    lines.clear()
    resumed = _quiet(neurons.train_neurons_many, root, entries[:2], out_dir, opts, resume=True, log=lines.append)
    assert any("kept as they are: rex" in line for line in lines)
    assert os.path.getmtime(os.path.join(out_dir, "rex.cones")) == kept
    tom = neurons.load_neurons(os.path.join(out_dir, "tom.cones"))
    for k in tom.indices:
        np.testing.assert_array_equal(tom.indices[k], got[1].indices[k])
    assert [cn.identifiers for cn in resumed] == [("sks",), ("xyz",)]


def test_multi_subject_neurons_cli(tiny, tmp_path, capsys):
    """`train.py neurons --subjects FOLDER --out-dir DIR`: a folder of `class-name` folders, one .cones
    file each; the one-subject flags do not mix with --subjects."""
    from cones_jax import train as train_cli

    root, classes, entries = tiny
    folder = tmp_path / "subjects"
    folder.mkdir()
    for e in entries[:2]:
        os.symlink(e.images, folder / f"{e.word}-{e.name}")
    out = tmp_path / "out"
    args = ["neurons", "--model", root, "--subjects", str(folder), "--out-dir", str(out), "--class-images", classes,
            "--steps", "1", "--batch", "2", "--sparsity", "0.01", "--set", f"resolution={RES}", "--no-progress"]
    assert _quiet(train_cli.main, args) == 0
    assert sorted(os.listdir(out)) == ["cat-tom.cones", "dog-rex.cones"]
    assert neurons.load_neurons(str(out / "cat-tom.cones")).classes == ("cat",)
    capsys.readouterr()
    assert train_cli.main(args + ["--images", entries[0].images]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--subjects" in err[0] and "--images" in err[0], err
    assert train_cli.main(["neurons", "--model", root, "--images", entries[0].images, "--class", "dog",
                           "--out-dir", str(out)]) == 2
    assert "--subjects" in capsys.readouterr().err
