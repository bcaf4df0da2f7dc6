"""The fidelity gates' generators and scoring (cones_jax.demo.fidelity), on renders of the shapes world:
seeded layouts and prompts with the properties the gates need, scores that reach the detector's
ceiling on renders that follow the layouts and fail on renders that do not."""

import dataclasses
import itertools
import os

import numpy as np
import pytest

from cones_jax.demo import detect, evaluate, fidelity, world

DETECTOR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "demo_world", "detector.safetensors")
DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "demo_model")
COUNTS = {2: 6, 3: 6, 4: 6}


@pytest.fixture(scope="module")
def det():
    return detect.load_detector(DETECTOR)


def _in_corner(box) -> bool:
    m = fidelity.MARGIN + 1e-3
    return (box[0] <= m or box[2] >= 1 - m) and (box[1] <= m or box[3] >= 1 - m)


def test_layout_set_is_seeded_and_has_small_corner_and_unequal_boxes():
    cases = fidelity.layout_set(fidelity.DEV_SEED, COUNTS)
    assert cases == fidelity.layout_set(fidelity.DEV_SEED, COUNTS)
    assert cases != fidelity.layout_set(fidelity.HELD_OUT_SEED, COUNTS)
    assert fidelity.DEV_SEED != fidelity.HELD_OUT_SEED
    # asking for more layouts keeps the first ones
    assert fidelity.layout_set(fidelity.DEV_SEED, {2: 2, 3: 2, 4: 2}) == (
        cases[:2] + cases[6:8] + cases[12:14])
    assert [len(c.objects) for c in cases] == [2] * 6 + [3] * 6 + [4] * 6
    for case in cases:
        shapes = [s for s, _ in case.objects]
        colours = [c for _, c in case.objects]
        assert len(set(shapes)) == len(shapes) and len(set(colours)) == len(colours)
        sides = [b[2] - b[0] for b in case.boxes]
        for box, side in zip(case.boxes, sides):
            assert 0 < box[0] < box[2] < 1 and 0 < box[1] < box[3] < 1
            assert abs((box[3] - box[1]) - side) < 1e-3  # square
            assert fidelity.MIN_SIDE - 1e-3 <= side <= fidelity.MAX_SIDE + 1e-3
        for a, b in itertools.combinations(case.boxes, 2):
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
        assert max(sides) >= fidelity.UNEQUAL * min(sides) - 1e-3
        if len(case.objects) >= 3:
            assert min(sides) <= fidelity.SMALL_SIDE + 1e-3
        assert any(_in_corner(b) for b in case.boxes)
        centres = [(b[0] + b[2]) / 2 for b in case.boxes]
        assert centres == sorted(centres)  # box order: left to right
        phrases = [f"a {c} {s}" for s, c in case.objects]
        assert case.prompt == world.join_phrases(phrases) + " on a grey background"
    # the set as a whole: small boxes, boxes in corners and boxes off them
    boxes = [b for c in cases for b in c.boxes]
    assert sum(b[2] - b[0] <= 0.25 for b in boxes) >= 6
    assert 0 < sum(map(_in_corner, boxes)) < len(boxes)


def test_layout_of_case_guides_each_shape_word_to_its_box():
    case = fidelity.layout_set(fidelity.DEV_SEED, {3: 1})[0]
    lay = fidelity.layout_of_case(case, strength=2.5)
    assert lay.prompt == case.prompt and lay.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert [(s.word, s.box, s.strength) for s in lay.subjects] == [
        (shape, box, 2.5) for (shape, _), box in zip(case.objects, case.boxes)]
    assert lay.guidance_weight is None  # λ comes from the sampling config
    half = fidelity.layout_of_case(case, strength=2.5, box_scale=0.5)
    for sub, (x0, y0, x1, y1) in zip(half.subjects, case.boxes):
        qx, qy = (x1 - x0) / 4, (y1 - y0) / 4
        assert sub.box == pytest.approx((x0 + qx, y0 + qy, x1 - qx, y1 - qy))
    assert evaluate.preset_config("official")["guidance_weight"] == evaluate.GUIDANCE_WEIGHT
    assert evaluate.preset_config("official", {"guidance_weight": 0.5}, steps=4)["guidance_weight"] == 0.5


def test_size_words_name_the_world_size_nearest_each_box():
    # the world draws small objects 13-17 px and big ones 23-29 px of 64
    assert [fidelity.size_word(s) for s in (0.18, 0.25, 0.29, 0.33, 0.4, 0.5)] == ["small"] * 3 + ["big"] * 3
    plain = fidelity.layout_set(fidelity.DEV_SEED, {3: 4})
    sized = fidelity.layout_set(fidelity.DEV_SEED, {3: 4}, size_words=True)
    assert [(c.objects, c.boxes) for c in plain] == [(c.objects, c.boxes) for c in sized]  # the prompts alone differ
    for case in sized:
        words = [fidelity.size_word(b[2] - b[0]) for b in case.boxes]
        assert "small" in words  # every layout of 3 has a box of at most 0.25
        phrases = [f"a {w} {c} {s}" for w, (s, c) in zip(words, case.objects)]
        assert case.prompt == world.join_phrases(phrases) + " on a grey background"
        lay = fidelity.layout_of_case(case, strength=1.0)
        assert [s.word for s in lay.subjects] == [s for s, _ in case.objects]
    with pytest.raises(ValueError, match="2 size words for 1 objects"):
        fidelity.objects_prompt((("star", "red"),), sizes=["big", "small"])


def test_multi_object_prompts_name_distinct_coloured_objects():
    sets = fidelity.multi_object_prompts(4, 10, fidelity.DEV_SEED)
    assert sets == fidelity.multi_object_prompts(4, 10, fidelity.DEV_SEED)
    assert sets[:3] == fidelity.multi_object_prompts(4, 3, fidelity.DEV_SEED)
    assert sets != fidelity.multi_object_prompts(4, 10, fidelity.HELD_OUT_SEED)
    assert len(set(sets)) > 5
    for objs in sets:
        assert len(objs) == 4
        assert len({s for s, _ in objs}) == 4 and len({c for _, c in objs}) == 4
        assert all(s in world.SHAPES and c in world.COLOURS for s, c in objs)
    assert fidelity.objects_prompt((("star", "red"), ("circle", "blue"))) == (
        "a red star and a blue circle on a grey background")
    with pytest.raises(ValueError):
        fidelity.multi_object_prompts(8, 1, 0)


def test_ground_truth_renders_are_placed_and_sized(det):
    cases = fidelity.layout_set(fidelity.DEV_SEED, {2: 4, 3: 4, 4: 4})
    truth = fidelity.ground_truth_check(det, cases, [0, 1])
    for k in (2, 3, 4):
        # an object at 60% of a 0.18 box (7 px) can fall under detect.find_boxes' smallest blob
        assert truth[k]["all_placed"] >= 0.75 and truth[k]["placement"] >= 0.9, truth
        # objects at 60-90% of their box's side: areas 0.36-0.81 of the box, median 0.56
        assert 0.45 <= truth[k]["area_ratio"] <= 0.65, truth
    full = fidelity.ground_truth_check(det, cases, [0, 1], fill=(0.8, 1.0))
    assert all(0.5 <= full[k]["area_ratio"] <= 1.2 and full[k]["all_placed"] == 1.0 for k in full), full
    dots = fidelity.ground_truth_check(det, cases, [0], fill=(0.3, 0.4))
    assert all(d["area_ratio"] < 0.5 or np.isnan(d["area_ratio"]) for d in dots.values()), dots


def _render(things, seed=0):
    return world.render(world.Scene(tuple(things), "grey", seed=seed))


def _things_in_boxes(objects, boxes):
    out = []
    for (shape, colour), box in zip(objects, boxes):
        x0, y0, x1, y1 = (v * world.IMAGE_SIZE for v in box)
        side = 0.9 * (x1 - x0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        out.append(world.Thing(shape, colour).with_box((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)))
    return out


def test_swapped_recoloured_or_missing_objects_are_not_placed(det):
    case = fidelity.LayoutCase((("star", "red"), ("circle", "blue"), ("square", "yellow")),
                               ((0.02, 0.02, 0.4, 0.4), (0.5, 0.1, 0.9, 0.5), (0.3, 0.6, 0.66, 0.96)))
    right = fidelity.score_layout_image(det, _render(_things_in_boxes(case.objects, case.boxes)), case)
    assert right["all_placed"] == 1.0 and len(right["area_ratios"]) == 3
    assert all(0.6 <= r <= 1.1 for r in right["area_ratios"]), right
    swapped = case.objects[1], case.objects[0], case.objects[2]
    got = fidelity.score_layout_image(det, _render(_things_in_boxes(swapped, case.boxes)), case)
    assert got["all_placed"] == 0.0 and got["placement"] == pytest.approx(1 / 3), got
    recoloured = (("star", "blue"), ("circle", "red"), ("square", "yellow"))
    got = fidelity.score_layout_image(det, _render(_things_in_boxes(recoloured, case.boxes)), case)
    assert got["all_placed"] == 0.0 and got["placement"] == pytest.approx(1 / 3), got
    got = fidelity.score_layout_image(det, _render(_things_in_boxes(case.objects[:2], case.boxes[:2])), case)
    assert got["all_placed"] == 0.0 and got["placement"] == pytest.approx(2 / 3) and len(got["area_ratios"]) == 2
    # an object in the right place but the size of a dot keeps its place and reads small
    small = _things_in_boxes(case.objects, case.boxes)
    x0, y0, x1, y1 = small[0].box
    small[0] = small[0].with_box((x0 + 5, y0 + 5, x1 - 5, y1 - 5))
    got = fidelity.score_layout_image(det, _render(small), case)
    assert got["all_placed"] == 1.0 and got["area_ratios"][0] < 0.5, got


def test_text_alignment_scoring_on_renders(det):
    assert fidelity.names_every_object([{"shape": "star", "colour": "red"}, {"shape": "ring", "colour": "blue"}],
                                       (("star", "red"),))
    assert not fidelity.names_every_object([{"shape": "star", "colour": "blue"}], (("star", "red"),))
    aligned = wrong = missing = 0
    for i, objs in enumerate(fidelity.multi_object_prompts(2, 12, fidelity.DEV_SEED)):
        rng = np.random.default_rng(i)
        things = world.place_things(rng, [world.Thing(s, c, size="big") for s, c in objs])
        if len(things) < len(objs):
            continue
        aligned += fidelity.text_aligned(det, _render(things, i), objs)
        other = next(c for c in world.COLOURS if c not in {c for _, c in objs})
        wrong += fidelity.text_aligned(det, _render([dataclasses.replace(things[0], colour=other)] + things[1:], i),
                                       objs)
        missing += fidelity.text_aligned(det, _render(things[1:], i), objs)
    assert aligned >= 10 and wrong == 0 and missing == 0, (aligned, wrong, missing)


def test_single_object_scoring_reports_each_shape(det):
    truth = [(s, c) for s in world.SHAPES for c in ("red", "blue")]
    box = (18.0, 18.0, 44.0, 44.0)
    images = [_render([world.Thing(s, c).with_box(box)], i) for i, (s, c) in enumerate(truth)]
    got = evaluate.score_single_objects(det, images, truth)
    assert got["colour_and_shape"] == 1.0 and got["samples"] == len(truth)
    assert got["per_shape"] == {s: 1.0 for s in world.SHAPES}
    # every star drawn as a heart: only the star's share falls
    images = [_render([world.Thing("heart" if s == "star" else s, c).with_box(box)], i)
              for i, (s, c) in enumerate(truth)]
    got = evaluate.score_single_objects(det, images, truth)
    assert got["per_shape"]["star"] == 0.0
    assert all(v == 1.0 for s, v in got["per_shape"].items() if s != "star")
    assert got["shape"] == pytest.approx(1 - 1 / len(world.SHAPES))


def test_gate_table_marks_each_gate():
    per_k = {2: {"all_placed": 0.95, "placement": 0.97, "area_ratio": 0.8, "images": 8},
             3: {"all_placed": 0.5, "placement": 0.8, "area_ratio": 0.7, "images": 8},
             4: {"all_placed": 0.8, "placement": 0.9, "area_ratio": float("nan"), "images": 8}}
    measured = {"single": {"colour_and_shape": 0.9796, "per_shape": {"star": 0.9, "circle": 1.0}},
                "text": {2: {"aligned": 0.9}, 4: {"aligned": 0.5}},
                "placement": {"official": per_k, "unguided": per_k}, "minutes": 1.5}
    rows = {r[0]: r for r in fidelity.gate_rows(measured)}
    assert rows["single object: colour and shape"][1:] == ("97.9%", "≥ 98%", "FAIL")
    assert rows["single object: shape, worst shape (star)"][1:] == ("90.0%", "≥ 95%", "FAIL")
    assert rows["text alignment, 2 objects (unguided)"][3] == "pass"
    assert rows["text alignment, 4 objects (unguided)"][3] == "FAIL"
    assert rows["placement, official, 2 objects: all placed"][3] == "pass"
    assert rows["placement, official, 3 objects: all placed"][3] == "FAIL"
    assert rows["placement, official, 4 objects: all placed"][3] == "pass"
    assert rows["placement, unguided, 3 objects: all placed"][2:] == ("near chance", "")
    assert rows["placement, official: median area ratio, 2 / 3 / 4 objects"][3] == "FAIL"  # none placed at 4
    table = fidelity.format_table(fidelity.gate_rows(measured))
    assert table.startswith("| gate | measured | goal | |") and "| elapsed | 1.5 min |" in table


@pytest.mark.parametrize("argv, message", [
    (["--layouts", "test"], "invalid choice: 'test'"),
    (["--layout-seed", "90210"], "is a named set's seed; use --layouts instead"),
    (["--counts", "5=2"], "objects per layout 2-4"),
    (["--counts", "2:3"], "is not like 2=8,3=8,4=8"),
    (["--seeds", "0"], "--seeds 0 must be at least 1"),
    (["--set", "self_recurence=False"], "has no key 'self_recurence'"),
])
def test_cli_refuses_bad_arguments_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        fidelity.main(["--model", "/nonexistent"] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err
    assert err.strip().splitlines()[-1].startswith("fidelity") or "error:" in err.strip().splitlines()[-1]
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_placement_runs_on_the_demo_model(det):
    """A smoke run of the sampling path: one 2-object layout, one seed, 4 steps."""
    from cones_jax.pipeline import load_pipeline

    sd = load_pipeline(DEMO_MODEL)
    cases = fidelity.layout_set(fidelity.DEV_SEED, {2: 1})
    got = fidelity.placement(sd, det, cases, [0], "official", guided=True, steps=4)
    assert set(got) == {2} and got[2]["images"] == 1
    assert 0.0 <= got[2]["placement"] <= 1.0


@pytest.mark.parametrize("scale", ["0", "1.5"])
def test_guide_box_scale_outside_0_1_is_refused_before_loading(scale, capsys):
    with pytest.raises(SystemExit) as e:
        fidelity.main(["--model", "/nonexistent", "--guide-box-scale", scale])
    assert e.value.code == 2 and "--guide-box-scale" in capsys.readouterr().err
