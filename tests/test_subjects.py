"""The many-subject core (`cones_jax.subjects`): the subjects list, its checks, the mesh shape and the
slot layout, with no model."""

import json

import jax
import numpy as np
import pytest

from cones_jax import subjects
from cones_jax.errors import ConfigError, DataError


def _write(path, data):
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_read_subjects_json(tmp_path):
    path = _write(tmp_path / "s.json", {"subjects": [
        {"images": "photos/rex", "word": " dog "},
        {"images": "/abs/max", "word": "dog", "name": "max", "overrides": {"seed": 3}}]})
    a, b = subjects.read_subjects(path)
    assert (a.name, a.word, a.images, a.overrides) == ("dog", "dog", str(tmp_path / "photos" / "rex"), {})
    assert (b.name, b.images, b.overrides) == ("max", "/abs/max", {"seed": 3})
    bare = _write(tmp_path / "bare.json", [{"images": "x", "word": "cat"}])
    assert [e.name for e in subjects.read_subjects(bare)] == ["cat"]


def test_read_subjects_folder_of_folders(tmp_path):
    for name in ("dog-rex", "dog-max", "cat", ".hidden"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("x")
    entries = subjects.read_subjects(str(tmp_path))
    assert [(e.name, e.word) for e in entries] == [("cat", "cat"), ("dog-max", "dog"), ("dog-rex", "dog")]
    assert entries[2].images == str(tmp_path / "dog-rex")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no sub-folders"):
        subjects.read_subjects(str(tmp_path / "empty"))


@pytest.mark.parametrize("data, match", [
    ("{not json", "not valid JSON"),
    ({"subjects": []}, "non-empty list"),
    ({"other": 1}, "non-empty list"),
    ([3], "entry 0 is not an object"),
    ([{"images": "a"}], "entry 0 needs a non-empty string `word`"),
    ([{"images": "a", "word": "dog", "colour": "red"}], "unknown key"),
    ([{"images": "a", "word": "dog", "overrides": [1]}], "`overrides` must be an object"),
    ([{"images": "a", "word": "dog", "name": "../up"}], "cannot be a file name"),
    ([{"images": "a", "word": "dog"}, {"images": "b", "word": "dog"}], "names subject 'dog' twice"),
])
def test_bad_subjects_files(tmp_path, data, match):
    with pytest.raises(DataError, match=match) as e:
        subjects.read_subjects(_write(tmp_path / "s.json", data))
    assert "\n" not in str(e.value)


def test_missing_subjects_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        subjects.read_subjects(str(tmp_path / "nope.json"))


def test_check_subjects_and_pending(tmp_path):
    entries = [subjects.SubjectEntry(n, str(tmp_path / n), n) for n in ("a", "b", "c")]

    def check(e):
        if e.name == "b":
            raise DataError("no photos")

    lines = []
    with pytest.raises(DataError, match="1 of 3 subject.*are bad.*'b'"):
        subjects.check_subjects(entries, check, skip_bad=False, log=lines.append)
    assert lines == [f"bad subject 'b' ({tmp_path / 'b'}): no photos"]
    assert [e.name for e in subjects.check_subjects(entries, check, skip_bad=True, log=lines.append)] == ["a", "c"]
    with pytest.raises(DataError, match="no subject of 1"):
        subjects.check_subjects(entries[1:2], check, skip_bad=True, log=lines.append)

    (tmp_path / "a.safetensors").write_text("x")
    lines.clear()
    left = subjects.pending_subjects(entries, str(tmp_path), ".safetensors", overwrite=False, log=lines.append)
    assert [e.name for e in left] == ["b", "c"] and "skipping 1 subject(s)" in lines[0]
    assert len(subjects.pending_subjects(entries, str(tmp_path), ".safetensors", overwrite=True, log=print)) == 3


def test_photo_checks_are_shared_out_across_processes(monkeypatch):
    """On a pod, process p reads the photos of subjects p, p + P, ... only; the reasons are gathered
    so that every process drops the same subjects (here process 1 of 2, the other's findings faked)."""
    from jax.experimental import multihost_utils

    entries = [subjects.SubjectEntry(n, f"/photos/{n}", "dog") for n in "abcde"]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    read: list[str] = []

    def check_photos(e):
        read.append(e.name)
        if e.name == "d":
            raise DataError("image folder /photos/d holds no images")

    def allgather(local):
        other = np.zeros_like(local)  # process 0 found subject "c" (index 2) bad
        msg = b"image /photos/c/0.png is 8 px on its short side"
        other[2, :len(msg)] = np.frombuffer(msg, np.uint8)
        return np.stack([other, local])

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)

    def check_one(e):
        if e.name == "b":
            raise DataError("word tokenises to nothing")

    lines: list[str] = []
    good = subjects.check_subjects(entries, check_one, skip_bad=True, log=lines.append, check_photos=check_photos)
    assert read == ["d"]  # b (index 1) was already bad; a, c, e belong to process 0
    assert [e.name for e in good] == ["a", "e"]
    assert lines == ["skipping subject 'b' (/photos/b): word tokenises to nothing",
                     "skipping subject 'c' (/photos/c): image /photos/c/0.png is 8 px on its short side",
                     "skipping subject 'd' (/photos/d): image folder /photos/d holds no images"]


@pytest.mark.parametrize("n, batch, devices, model, want", [
    (3, 1, 8, 1, (8, 1, 1)),      # batch 1: every device trains its own subjects
    (16, 1, 8, 1, (8, 1, 1)),
    (1, 8, 8, 1, (1, 8, 1)),      # one subject, batch 8: data parallel
    (2, 4, 8, 1, (2, 4, 1)),
    (3, 2, 8, 2, (4, 1, 2)),      # model_parallel 2: four UNet copies
    (8, 1, 8, 8, (1, 1, 8)),
])
def test_mesh_shape(n, batch, devices, model, want):
    got = subjects.mesh_shape(n, batch, devices, model)
    assert got == want and np.prod(got) == devices


def test_mesh_shape_refuses_a_model_split_that_does_not_divide():
    with pytest.raises(ConfigError, match="must divide"):
        subjects.mesh_shape(2, 1, 8, 3)


def test_slots_spread_padding_and_local_subjects():
    assert subjects.slot_of(3, 8) == [0, 2, 5]
    mesh = subjects.make_subject_mesh(3, 1)
    assert dict(mesh.shape) == {"subject": 8, "data": 1, "model": 1} and jax.device_count() == 8
    assert subjects.padded_count(3, mesh) == 8
    assert subjects.local_subjects(mesh, 3) == [0, 1, 2]  # one process holds every device
    stacked = subjects.stack_subjects([{"x": np.full(2, i)} for i in range(3)], mesh)
    assert stacked["x"].shape == (8, 2)
    assert [int(v) for v in stacked["x"][:, 0]] == [0, 0, 1, 0, 0, 2, 0, 0]  # padding repeats subject 0
