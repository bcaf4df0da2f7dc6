"""The layout app without a browser: the page's state <-> layout files (the round trip is exact and
`sample.py`'s parser reads what the page writes), and the engine behind Generate on the demo model
(one compiled sampler for new layouts, prompts and seeds; bad input as a `ConesError` the page
shows; nothing written outside the output folder). tests/test_app_browser.py drives the page itself."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cones_jax import artifacts
from cones_jax.app import state
from cones_jax.errors import ConesError, LayoutError
from cones_jax.layout import load_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a star and a heart on a grey background"


def two_boxes():
    return [state.Box((0.02, 0.2, 0.48, 0.8), "star", "demo:sunny", 2.5),
            state.Box((0.52, 0.2, 0.98, 0.8), "heart", "demo:dotty", None)]


def settings(**kw):
    return state.Settings(**{"prompt": PROMPT, "guidance_weight": 0.3, "steps": 2, "seeds": (0,), **kw})


# ---------------------------------------------------------------------------------------------
# state: pure Python


def test_layout_json_round_trip_is_exact_and_sample_reads_it(tmp_path):
    uploaded = tmp_path / "mine.safetensors"
    artifacts.save_residual(str(uploaded), artifacts.Residual(np.ones((1, 96), np.float32), "square", (5,)))
    boxes = two_boxes() + [state.Box((0.1234, 0.0, 1.0, 0.3333), "grey", str(uploaded), 1.75)]
    s = settings(negative_prompt="blurry", seeds=(3, 1, 4), cfg_scale=5.0, preset="paper",
                 kept={"size": [64, 64], "guidance_steps": 2})
    text = state.layout_json(boxes, s)
    path = tmp_path / "layout.json"
    path.write_text(text)

    lay = load_layout(str(path), check_residuals=True)  # what sample.py --layout does with it
    assert [sub.box for sub in lay.subjects] == [b.box for b in boxes]
    assert [sub.word for sub in lay.subjects] == ["star", "heart", "grey"]
    assert [sub.strength for sub in lay.subjects] == [2.5, None, 1.75]
    assert lay.subjects[0].residual == state.demo_residuals()["demo:sunny"]
    assert lay.subjects[2].residual == str(uploaded)
    assert (lay.prompt, lay.negative_prompt, lay.guidance_weight, lay.size) == (PROMPT, "blurry", 0.3, (64, 64))

    back_boxes, back = state.from_layout(json.loads(text), str(tmp_path))
    assert back_boxes == boxes and back == s  # the page shows what it wrote: demo names stay demo names
    assert state.layout_json(back_boxes, back) == text


def test_canvas_value_round_trip():
    boxes = two_boxes()
    value = state.canvas_json(boxes, "data:image/png;base64,AAAA")
    assert state.boxes_from_canvas(value) == boxes
    assert state.background_of(value) == "data:image/png;base64,AAAA"
    renamed = state.with_subjects(boxes, ["dog", "cat"], ["", "demo:boxy"], [None, 3.0])
    assert [(b.word, b.residual, b.strength) for b in renamed] == [("dog", "", None), ("cat", "demo:boxy", 3.0)]
    with pytest.raises(LayoutError, match="box 1"):
        state.boxes_from_canvas('{"boxes": [{"box": [0, 0, "x", 1]}]}')


def test_the_bundled_demo_layout_loads_into_the_page():
    from cones_jax.bundled import resolve_layout

    path = resolve_layout("demo:two_subjects")
    with open(path) as f:
        obj = json.load(f)
    boxes, s = state.from_layout(obj, os.path.dirname(path))
    assert [b.residual for b in boxes] == ["demo:sunny", "demo:dotty"]
    assert s.prompt == obj["prompt"] and s.guidance_weight == 0.3


@pytest.mark.parametrize("boxes, match", [
    ([], "no box"),
    ([state.Box((0.2, 0.2, 0.2, 0.6), "star")], "zero size"),
    ([state.Box((0.2, 0.5, 0.6, 0.5), "star")], "zero size"),
    ([state.Box((0.2, 0.2, 1.5, 0.6), "star")], "outside the image"),
    ([state.Box((0.2, 0.2, 0.6, 0.6), " ")], "give its subject's word"),
])
def test_boxes_the_page_refuses(boxes, match):
    with pytest.raises(LayoutError, match=match):
        state.check_boxes(boxes)


def test_the_page_refuses_layouts_it_cannot_draw():
    with pytest.raises(LayoutError, match="box_px"):
        state.from_layout({"prompt": "a dog", "size": [64, 64], "subjects": [{"word": "dog", "box_px": [0, 0, 8, 8]}]},
                          ".")
    with pytest.raises(LayoutError, match="official"):
        state.from_layout([{"prompt": "a dog"}], ".")
    with pytest.raises(LayoutError, match="seeds"):
        state.parse_seeds("1 two")


def test_a_background_reaches_the_canvas_with_its_exact_colours(tmp_path):
    import base64
    import io

    from PIL import Image

    from cones_jax.app.ui import data_url

    colours = np.zeros((700, 900, 3), np.uint8)
    colours[:, 450:] = (255, 0, 0)
    Image.fromarray(colours).save(tmp_path / "map.png")
    url = data_url(str(tmp_path / "map.png"))
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as img:
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    assert max(img.size) == 512 and {tuple(p) for p in np.unique(pixels, axis=0)} == {(0, 0, 0), (255, 0, 0)}


def test_gradio_stays_out_of_the_core():
    # only cones_jax.app imports gradio, behind an ImportError guard (tests/test_dependencies.py)
    code = "import sys, cones_jax, cones_jax.generate, cones_jax.sampler, cones_jax.app.state; " \
           "print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
    for folder, _, files in os.walk(os.path.join(ROOT, "cones_jax")):
        for f in files:
            if f.endswith(".py") and "gradio" in open(os.path.join(folder, f)).read():
                assert os.path.join("cones_jax", "app") in folder, f"{folder}/{f} mentions gradio"


def test_without_gradio_the_app_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import cones_jax.app.ui as ui
    from cones_jax.app import main

    monkeypatch.setattr(ui, "gr", None)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # restored after: make_app sets it
    assert main(["--out-dir", str(tmp_path / "out")]) == 2
    assert "pip install 'cones_jax[app]'" in capsys.readouterr().err


def test_cones_jax_dispatches_its_commands(capsys):
    from cones_jax.app import cli_main

    assert cli_main([]) == 2
    assert cli_main(["nope"]) == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["app", "--help"])
    assert e.value.code == 0 and "--share" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the engine behind Generate, on the demo model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from cones_jax.app.engine import Engine
    from cones_jax.bundled import demo_model

    return Engine(demo_model(), str(tmp_path_factory.mktemp("app") / "out"), batch=1)


def files_under(folder):
    return {os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs}


def test_generate_reuses_one_compiled_sampler(engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may appear here
    heard = []
    first = engine.generate(two_boxes(), settings(), attention=True, progress=lambda d, n: heard.append((d, n)))
    assert heard[-1] == (2, 2)
    assert len(first.images) == 1 and first.images[0][0].size == (256, 256)  # 64 px shown 4x
    assert [c for _, c in first.heatmaps] == ["seed 0: star", "seed 0: heart"]
    # a new layout, prompt, seeds (as many), λ, γ⁺ and CFG scale: sampling time only
    moved = [state.Box((0.5, 0.1, 0.9, 0.5), "heart", "", 4.0), state.Box((0.0, 0.5, 0.4, 0.9), "star", "", None)]
    second = engine.generate(moved, settings(prompt="a heart and a star", seeds=(7,), guidance_weight=0.1,
                                             cfg_scale=3.0), attention=True)
    assert second.compile_seconds == 0.0
    wrong_word = [state.Box((0.1, 0.1, 0.5, 0.5), "heart", "demo:sunny")]  # sunny was trained for "star"
    told = engine.generate(wrong_word, settings(), attention=True)
    assert told.compile_seconds == 0.0 and any("trained for the word 'star'" in n for n in told.notes), told.notes
    third = engine.generate(two_boxes(), settings(seeds=(1, 2)), attention=True)
    assert third.compile_seconds == 0.0 and len(third.images) == 2
    assert not list(tmp_path.iterdir())
    assert all(f.startswith(engine.out_dir + os.sep) for f in first.files + second.files + third.files)
    assert all(os.path.isfile(f) for f in third.files)


def test_bad_input_is_a_message_and_writes_nothing(engine, tmp_path):
    before = files_under(engine.out_dir)
    other = tmp_path / "other_model.safetensors"  # trained on another text encoder
    artifacts.save_residual(str(other), artifacts.Residual(np.ones((1, 96), np.float32), "star", (5,),
                                                           text_encoder="0123456789abcdef"))
    wide = tmp_path / "wide.safetensors"  # another model's width
    artifacts.save_residual(str(wide), artifacts.Residual(np.ones((1, 1024), np.float32), "star", (5,)))
    cases = [
        ([], settings(), "no box"),
        ([state.Box((0.1, 0.1, 0.1, 0.5), "star")], settings(), "zero size"),
        ([state.Box((0.1, 0.1, 0.5, 0.5), "hart")], settings(), "'hart' does not occur in the prompt"),
        ([state.Box((0.1, 0.1, 0.5, 0.5), "star", str(other))], settings(), r"box 1: residual: .*another base model"),
        ([state.Box((0.1, 0.1, 0.5, 0.5), "star", str(wide))], settings(), r"residual.*1024"),
        ([state.Box((0.1, 0.1, 0.5, 0.5), "star", "demo:nobody")], settings(), "no such demo subject"),
        ([state.Box((0.1, 0.1, 0.5, 0.5), "star")], settings(seeds=(1, 1)), "seeds"),
        ([state.Box((0.1, 0.1, 0.5, 0.5), "star")], settings(steps=0), "steps"),
        ([state.Box((0.1, 0.1, 0.5, 0.5), "star")], settings(preset="nope"), "nope"),
    ]
    for boxes, s, match in cases:
        with pytest.raises(ConesError, match=match):
            engine.generate(boxes, s)
    assert files_under(engine.out_dir) == before
    assert engine.word_problems(PROMPT, ["star", "hart", ""]) == [
        engine.word_problems(PROMPT, ["hart"])[0].replace("box 1", "box 2"), "box 3: give its subject's word"]
    assert engine.word_problems(PROMPT, ["star", "heart"]) == []


def test_concurrent_requests_queue(engine):
    # the web server may call in from several threads; the engine's lock takes them one at a time
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(engine.generate, two_boxes(), settings(seeds=(s,))) for s in range(3)]
        results = [r.result(timeout=300) for r in runs]
    assert [len(r.images) for r in results] == [1, 1, 1]
    assert len({os.path.dirname(r.files[0]) for r in results}) == 3  # each run its own folder


def test_saved_layout_reads_back(engine):
    path = engine.save_layout(two_boxes(), settings())
    assert path.startswith(os.path.join(engine.out_dir, "layouts") + os.sep)
    boxes, s = engine.read_layout(path, state.Settings())
    assert boxes == two_boxes() and s == settings()
    assert [sub.box for sub in load_layout(path).subjects] == [b.box for b in two_boxes()]

