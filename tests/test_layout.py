"""Layout files -> region masks -> per-resolution Cones 2 attention maps; official config import; errors."""

import glob
import json
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tiny_checkpoints import make_tokenizer

from cones_jax import layout as L

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples", "layouts")
SD_EXAMPLES = os.path.join(EXAMPLES, "stable_diffusion")
EXAMPLE_FILES = sorted(os.path.relpath(p, EXAMPLES) for p in glob.glob(os.path.join(EXAMPLES, "**", "*.json"),
                                                                        recursive=True))
RESOLUTIONS = [(64, 64), (32, 32), (16, 16), (8, 8)]  # a 512x512 image, latent /1, /2, /4, /8
NEG = -1e8


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("layout_tok")))


def torch_resize(x, h, w):
    return F.interpolate(torch.from_numpy(np.asarray(x, np.float32))[None, None], size=(h, w), mode="bilinear",
                         align_corners=True)[0, 0].numpy()


def official_maps(gammas, token_seqs, ids_row, resolutions):
    """The official `_tokens_img_attention_weight`, re-done with torch: += at every match of each subject's tokens."""
    row = [int(i) for i in ids_row]
    out = {}
    for h, w in resolutions:
        ret = torch.zeros((h * w, len(row)), dtype=torch.float32)
        for gamma, seq in zip(gammas, token_seqs):
            for idx in range(len(row)):
                if row[idx:idx + len(seq)] == seq:
                    ret[:, idx:idx + len(seq)] += torch.from_numpy(torch_resize(gamma, h, w)).reshape(-1, 1).repeat(
                        1, len(seq))
        out[f"{h}x{w}"] = ret.numpy()
    return out


def one_line_error(excinfo, field):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert field in msg, (field, msg)
    return msg


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", [((512, 768), (64, 96)), ((64, 48), (8, 6)), ((100, 60), (13, 8)),
                                     ((7, 5), (19, 23)), ((8, 8), (64, 64)), ((1, 5), (3, 4)), ((5, 6), (1, 1))])
def test_resize_bilinear_aligned_matches_torch(src, dst):
    rng = np.random.default_rng(0)
    x = rng.random(src, dtype=np.float32)
    np.testing.assert_allclose(L.resize_bilinear_aligned(x, *dst), torch_resize(x, *dst), rtol=0, atol=1e-6)
    g = np.where(rng.random(src) > 0.5, 2.5, NEG).astype(np.float32)  # a γ map: float32 rounding only
    np.testing.assert_allclose(L.resize_bilinear_aligned(g, *dst), torch_resize(g, *dst), rtol=1e-6, atol=1e-5)


def test_attention_resolutions():
    assert L.attention_resolutions(512, 512) == RESOLUTIONS
    assert L.attention_resolutions(768, 512) == [(96, 64), (48, 32), (24, 16), (12, 8)]


def test_box_left_half(tok):
    lay = L.parse_layout({"prompt": "a dog on the beach", "weight_negative": NEG,
                          "subjects": [{"word": "dog", "box": [0, 0, 0.5, 1]}]}, "/tmp")
    masks = L.region_masks(lay, 512, 512)
    assert masks.shape == (1, 512, 512) and masks[0, :, :256].all() and not masks[0, :, 256:].any()
    gammas = L.gamma_maps(lay, masks, lay.weight_negative)
    assert gammas.dtype == np.float32 and set(np.unique(gammas)) == {np.float32(2.5), np.float32(NEG)}
    ids = tok.encode(lay.prompt)[0]
    positions = L.subject_positions(lay, tok)
    assert positions == [[2]] == [L.token_positions(tok, ids, "dog")]
    maps = L.attention_maps(gammas, positions, len(ids), RESOLUTIONS)
    assert sorted(maps) == sorted(f"{h}x{w}" for h, w in RESOLUTIONS)
    for h, w in RESOLUTIONS:
        m = maps[f"{h}x{w}"]
        assert m.shape == (h * w, 77) and m.dtype == np.float32
        col = m[:, 2].reshape(h, w)
        np.testing.assert_allclose(col[:, :w // 2], 2.5, rtol=1e-6)
        np.testing.assert_array_equal(col[:, w // 2:], np.float32(NEG))
        assert not np.delete(m, 2, axis=1).any()
    ref = official_maps(gammas, [tok.word_ids("dog")], ids, RESOLUTIONS)
    for k in maps:
        np.testing.assert_allclose(maps[k], ref[k], rtol=1e-6, atol=1e-5)


def test_box_px_and_rounding():
    lay = L.parse_layout({"prompt": "a cat", "size": [64, 128],
                          "subjects": [{"word": "cat", "box_px": [32, 16, 96, 48]}]}, "/tmp")
    assert lay.subjects[0].box == (0.25, 0.25, 0.75, 0.75) and lay.size == (64, 128)
    m = L.region_masks(lay, 64, 128)[0]
    assert m[16:48, 32:96].all() and m.sum() == 32 * 64
    tiny = L.parse_layout({"prompt": "a cat", "subjects": [{"word": "cat", "box": [0.5, 0.5, 0.501, 0.501]}]}, "/")
    assert L.region_masks(tiny, 8, 8).sum() == 1  # a box always covers at least one pixel


def test_mask_images(tmp_path, tok):
    grey = np.zeros((32, 32), np.uint8)
    grey[:16, 16:] = 200  # top-right quadrant, > 50%
    grey[16:, :16] = 100  # < 50%: outside
    Image.fromarray(grey).save(tmp_path / "dog.png")
    rgba = np.zeros((64, 64, 4), np.uint8)  # RGBA: the alpha channel decides (colour is black everywhere)
    rgba[32:, :32, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "cat.png")
    path = tmp_path / "layout.json"
    path.write_text(json.dumps({"prompt": "a dog and a cat", "weight_negative": -5.0,
                                "subjects": [{"word": "dog", "mask": "dog.png", "strength": 3},
                                             {"word": "cat", "mask": "cat.png"}]}))
    lay = L.load_layout(str(path))
    assert lay.subjects[0].mask_path == str(tmp_path / "dog.png") and lay.subjects[0].strength == 3.0
    masks = L.region_masks(lay, 512, 512)
    want_dog = np.zeros((512, 512), bool)
    want_dog[:256, 256:] = True
    want_cat = np.zeros((512, 512), bool)
    want_cat[256:, :256] = True
    np.testing.assert_array_equal(masks[0], want_dog)
    np.testing.assert_array_equal(masks[1], want_cat)
    gammas = L.gamma_maps(lay, masks)  # weight_negative from the layout
    ids = tok.encode(lay.prompt)[0]
    positions = L.subject_positions(lay, tok)
    assert positions == [[2], [5]]
    maps = L.attention_maps(gammas, positions, 77, RESOLUTIONS)
    ref = official_maps(gammas, [tok.word_ids("dog"), tok.word_ids("cat")], ids, RESOLUTIONS)
    for h, w in RESOLUTIONS:
        m = maps[f"{h}x{w}"]
        np.testing.assert_allclose(m, ref[f"{h}x{w}"], rtol=1e-6, atol=1e-6)
        dog, cat = m[:, 2].reshape(h, w), m[:, 5].reshape(h, w)
        np.testing.assert_allclose(dog[:h // 2, w // 2:], 3.0, rtol=1e-6)
        np.testing.assert_allclose(dog[h // 2:, :], -5.0, rtol=1e-6)
        np.testing.assert_allclose(cat[h // 2:, :w // 2], 2.5, rtol=1e-6)
        np.testing.assert_allclose(cat[:h // 2, :], -5.0, rtol=1e-6)
        assert not np.delete(m, [2, 5], axis=1).any()


def _color_map(path, size=512, aa_pixels=0):
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, size // 2 - 1, size - 1), fill=(255, 0, 0))  # left half: dog
    d.rectangle((size // 2, 0, size - 1, size // 2 - 1), fill=(255, 192, 0))  # top right: teddy bear
    for i in range(aa_pixels):  # anti-aliasing-like blends along an edge
        img.putpixel((size // 2 + i % (size // 2), size // 2 + i // (size // 2)), (255, 200, 40))
    img.save(path)


def test_color_map(tmp_path, tok):
    _color_map(tmp_path / "map.png")
    obj = {"prompt": "a dog and a teddy bear on the beach", "color_map": "map.png", "weight_negative": NEG,
           "subjects": [{"word": "dog", "color": "#ff0000"}, {"word": "teddy bear", "color": [255, 192, 0]}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lay = L.parse_layout(obj, str(tmp_path))
    assert lay.subjects[1].color == (255, 192, 0) and lay.color_map_path == str(tmp_path / "map.png")
    masks = L.region_masks(lay, 512, 512)
    assert masks[0][:, :256].all() and not masks[0][:, 256:].any()
    assert masks[1][:256, 256:].all() and masks[1].sum() == 256 * 256
    positions = L.subject_positions(lay, tok)
    assert positions == [[2], [5, 6]]  # "teddy bear": both sub-words
    gammas = L.gamma_maps(lay, masks, NEG)
    maps = L.attention_maps(gammas, positions, 77, RESOLUTIONS)
    ids = tok.encode(lay.prompt)[0]
    ref = official_maps(gammas, [tok.word_ids("dog"), tok.word_ids("teddy bear")], ids, RESOLUTIONS)
    for h, w in RESOLUTIONS:
        m = maps[f"{h}x{w}"]
        np.testing.assert_allclose(m, ref[f"{h}x{w}"], rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(m[:, 5], m[:, 6])
        bear = m[:, 5].reshape(h, w)
        np.testing.assert_allclose(bear[:h // 2 - 1, w // 2 + 1:], 2.5, rtol=1e-6)
        assert (bear[h // 2 + 1:, :] < -1e7).all() and (bear[:, :w // 2 - 1] < -1e7).all()
        assert not np.delete(m, [2, 5, 6], axis=1).any()
    # A colour map of another size is resized with NEAREST: same regions.
    _color_map(tmp_path / "small.png", size=64)
    small = L.parse_layout(dict(obj, color_map="small.png"), str(tmp_path))
    np.testing.assert_array_equal(L.region_masks(small, 512, 512), masks)


def test_color_map_near_misses_warn(tmp_path):
    _color_map(tmp_path / "map.png", aa_pixels=300)
    obj = {"prompt": "a dog and a teddy bear", "color_map": "map.png",
           "subjects": [{"word": "dog", "color": "255,0,0"}, {"word": "teddy bear", "color": "255,192,0"}]}
    with pytest.warns(L.LayoutWarning, match=r"300 pixels.*anti-alias"):
        lay = L.parse_layout(obj, str(tmp_path))
    assert not L.region_masks(lay, 512, 512)[:, 256:, 256:].any()  # near misses are background


def test_multi_token_and_repeated_words(tok):
    assert len(tok.word_ids("corgi")) > 1  # the tiny tokenizer spells unknown words in pieces
    lay = L.parse_layout({"prompt": "a corgi and a dog, a dog and a teddy bear",
                          "subjects": [{"word": "corgi", "box": [0, 0, 0.3, 1]},
                                       {"word": "dog", "box": [0.35, 0, 0.65, 1]},
                                       {"word": "teddy bear", "box": [0.7, 0, 1, 1]}]}, "/tmp")
    ids = tok.encode(lay.prompt)[0]
    n = len(tok.word_ids("corgi"))
    positions = L.subject_positions(lay, tok)
    assert positions[0] == list(range(2, 2 + n))
    dog = tok.word_ids("dog")[0]
    assert positions[1] == [i for i, t in enumerate(ids) if t == dog] and len(positions[1]) == 2
    assert [ids[p] for p in positions[2]] == tok.word_ids("teddy bear")
    masks = L.region_masks(lay, 64, 64)
    gammas = L.gamma_maps(lay, masks, NEG)
    maps = L.attention_maps(gammas, positions, 77, [(8, 8), (4, 4)])
    for key, m in maps.items():
        for s, pos in enumerate(positions):
            want = L.resize_bilinear_aligned(gammas[s], *map(int, key.split("x"))).reshape(-1)
            for p in pos:
                np.testing.assert_array_equal(m[:, p], want)
        used = [p for pos in positions for p in pos]
        assert not np.delete(m, used, axis=1).any()


def test_overlap_warns_and_maps_are_independent(tok):
    lay = L.parse_layout({"prompt": "a dog and a cat", "subjects": [{"word": "dog", "box": [0, 0, 0.6, 1]},
                                                                    {"word": "cat", "box": [0.4, 0, 1, 1]}]}, "/")
    with pytest.warns(L.LayoutWarning, match=r"'dog'.*'cat'.*overlap"):
        masks = L.region_masks(lay, 10, 10)
    g = L.gamma_maps(lay, masks, NEG)
    assert (g[0][:, 4:6] == 2.5).all() and (g[1][:, 4:6] == 2.5).all()  # both strengthened in the overlap
    assert (g[0][:, 6:] == NEG).all() and (g[1][:, :4] == NEG).all()


def test_official_config(tmp_path, tok):
    _color_map(tmp_path / "layout.png")
    (tmp_path / "residuals").mkdir()
    for name in ("dog", "mug"):
        (tmp_path / "residuals" / f"{name}.pt").write_bytes(b"x")
    mug_n = len(tok.word_ids("mug"))  # the tiny tokenizer spells "mug" in pieces, so "dog" is not at 5 here
    assert mug_n > 1
    dog_at = 4 + mug_n  # <start> a mug... and a dog
    entry = {"prompt": "a mug and a dog on the beach",
             "residual_dict": {"dog": "residuals/dog.pt", "mug": "residuals/mug.pt",
                               "barn": "residuals/barn.pt"},
             "color_context": {"255,192,0": ["mug", 2.5], "#ff0000": ["dog", 3.0]},
             "guidance_steps": 50, "guidance_weight": 0.08, "weight_negative": -1e8,
             "layout": "layout.png", "subject_list": [["mug", 2], ["dog", dog_at]]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps([entry, dict(entry, prompt="a dog and a mug", subject_list=[["dog", 2]])]))
    lay = L.load_layout(str(path), tokenizer=tok, check_residuals=True)
    assert lay.format == "official" and lay.prompt == entry["prompt"]
    assert (lay.guidance_steps, lay.guidance_weight, lay.weight_negative) == (50, 0.08, -1e8)
    assert [(s.word, s.strength, s.color, s.token_indices) for s in lay.subjects] == [
        ("mug", 2.5, (255, 192, 0), (2,)), ("dog", 3.0, (255, 0, 0), (dog_at,))]
    assert lay.subjects[1].residual == str(tmp_path / "residuals" / "dog.pt")
    assert lay.color_map_path == str(tmp_path / "layout.png")
    assert L.subject_positions(lay, tok) == [list(range(2, 2 + mug_n)), [dog_at]]  # all of mug's sub-words
    masks = L.region_masks(lay, 512, 512)
    assert masks[1][:, :256].all() and masks[0].sum() == 256 * 256
    # index= picks another entry; a word missing from subject_list gets no residual, as in the official code.
    second = L.load_layout(str(path), index=1)
    assert second.prompt == "a dog and a mug" and second.subjects[0].residual is None
    assert second.subjects[1].residual is not None
    # A hand-typed index that is off (5 would be right with CLIP's "mug" token, not here) is an error.
    bad = dict(entry, subject_list=[["mug", 2], ["dog", 5]])
    with pytest.raises(L.LayoutError) as e:
        L.parse_layout([bad], str(tmp_path), tokenizer=tok)
    msg = one_line_error(e, "subject_list")
    assert "'dog'" in msg and f"token index {dog_at}" in msg and "says 5" in msg
    lay_bad = L.parse_layout([bad], str(tmp_path))  # no tokenizer: checked later, when positions are found
    with pytest.raises(L.LayoutError, match="subject_list"):
        L.subject_positions(lay_bad, tok)


def test_official_example_file(tok):
    lay = L.load_layout(os.path.join(SD_EXAMPLES, "official_format.json"), tokenizer=tok)
    assert [s.token_indices for s in lay.subjects] == [(2,), (5,)]


def test_yaml(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "l.yaml").write_text("prompt: a dog\nsubjects:\n  - {word: dog, box: [0, 0, 0.5, 0.5]}\n")
    assert L.load_layout(str(tmp_path / "l.yaml")).subjects[0].box == (0, 0, 0.5, 0.5)


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_examples_load_and_draw(name, tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lay = L.load_layout(os.path.join(EXAMPLES, name), tokenizer=tok)
        maps = L.layout_maps(lay, tok, 128, 128, weight_negative=NEG)
    assert maps.masks.any(axis=(1, 2)).all() and sorted(maps.maps) == ["16x16", "2x2", "4x4", "8x8"]
    img = L.draw_layout(Image.new("RGB", (128, 128), (0, 0, 0)), lay, maps.masks)
    assert img.size == (128, 128) and np.asarray(img).any()


@pytest.mark.parametrize("folder", [EXAMPLES, SD_EXAMPLES])
def test_example_counts(folder):
    names = ("one_subject.json", "two_subjects.json", "three_subjects.json", "four_subjects.json")
    assert [len(L.load_layout(os.path.join(folder, f)).subjects) for f in names] == [1, 2, 3, 4]


def test_draw_layout_outlines_in_distinct_colours():
    lay = L.parse_layout({"prompt": "a dog and a cat", "subjects": [{"word": "dog", "box": [0, 0, 0.5, 1]},
                                                                    {"word": "cat", "box": [0.5, 0, 1, 1]}]}, "/")
    masks = L.region_masks(lay, 64, 64)
    img = np.asarray(L.draw_layout(Image.new("RGB", (128, 128), (0, 0, 0)), lay, masks))  # masks are resized
    assert img.shape == (128, 128, 3)
    left, right = tuple(img[100, 0]), tuple(img[100, 127])  # outline pixels, below the labels
    assert left != right and left != (0, 0, 0) and right != (0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Bad inputs: each a LayoutError with a one-line message naming the field.

def _sub(**kw):
    return {"prompt": "a dog and a cat on the beach", "subjects": [dict({"word": "dog"}, **kw)]}


BAD = {
    "unknown top key": ({"prompt": "a dog", "subject": [], "subjects": []}, "subject"),
    "unknown subject key": (_sub(boxx=[0, 0, 1, 1]), "subjects[0].boxx"),
    "missing prompt": ({"subjects": [{"word": "dog", "box": [0, 0, 1, 1]}]}, "prompt"),
    "empty prompt": (dict(_sub(box=[0, 0, 1, 1]), prompt="  "), "prompt"),
    "missing subjects": ({"prompt": "a dog"}, "subjects"),
    "empty subjects": ({"prompt": "a dog", "subjects": []}, "subjects"),
    "subject not an object": ({"prompt": "a dog", "subjects": ["dog"]}, "subjects[0]"),
    "no region": (_sub(), "subjects[0]"),
    "two regions": (_sub(box=[0, 0, 1, 1], color="#ff0000"), "subjects[0]"),
    "box out of range": (_sub(box=[0, 0, 1.5, 1]), "subjects[0].box"),
    "box negative": (_sub(box=[-0.1, 0, 0.5, 1]), "subjects[0].box"),
    "box x1 <= x0": (_sub(box=[0.6, 0, 0.2, 1]), "subjects[0].box: x1 must be > x0 (got 0.6, 0.2)"),
    "box y1 <= y0": (_sub(box=[0, 0.5, 1, 0.5]), "subjects[0].box: y1 must be > y0"),
    "box wrong length": (_sub(box=[0, 0, 1]), "subjects[0].box"),
    "box not numbers": (_sub(box=["0", 0, 1, 1]), "subjects[0].box"),
    "box_px without size": (_sub(box_px=[0, 0, 10, 10]), "subjects[0].box_px"),
    "box_px outside": (dict(_sub(box_px=[0, 0, 600, 10]), size=[512, 512]), "subjects[0].box_px"),
    "strength a string": (_sub(box=[0, 0, 1, 1], strength="high"), "subjects[0].strength"),
    "strength a bool": (_sub(box=[0, 0, 1, 1], strength=True), "subjects[0].strength"),
    "strength nan": (_sub(box=[0, 0, 1, 1], strength=float("nan")), "subjects[0].strength"),
    "word empty": ({"prompt": "a dog", "subjects": [{"word": "  ", "box": [0, 0, 1, 1]}]}, "subjects[0].word"),
    "word missing": ({"prompt": "a dog", "subjects": [{"box": [0, 0, 1, 1]}]}, "subjects[0].word"),
    "word not a string": ({"prompt": "a dog", "subjects": [{"word": 3, "box": [0, 0, 1, 1]}]}, "subjects[0].word"),
    "mask missing": (_sub(mask="nope.png"), "subjects[0].mask"),
    "mask unreadable": (_sub(mask="garbage.png"), "subjects[0].mask"),
    "mask empty": (_sub(mask="black.png"), "subjects[0].mask"),
    "color without map": (_sub(color="#ff0000"), "subjects[0].color"),
    "color bad string": (dict(_sub(color="red"), color_map="map.png"), "subjects[0].color"),
    "color out of range": (dict(_sub(color=[300, 0, 0]), color_map="map.png"), "subjects[0].color"),
    "color matches nothing": (dict(_sub(color="#00ff00"), color_map="map.png"), "subjects[0].color"),
    "color map missing": (dict(_sub(color="#ff0000"), color_map="none.png"), "color_map"),
    "size not multiple of 8": (dict(_sub(box=[0, 0, 1, 1]), size=[500, 512]), "size"),
    "size wrong shape": (dict(_sub(box=[0, 0, 1, 1]), size=512), "size"),
    "weight_negative a string": (dict(_sub(box=[0, 0, 1, 1]), weight_negative="-1e8"), "weight_negative"),
    "guidance_steps negative": (dict(_sub(box=[0, 0, 1, 1]), guidance_steps=-1), "guidance_steps"),
    "not an object": ("a dog", "layout"),
    "official: no color_context": ([{"prompt": "a dog", "layout": "map.png"}], "color_context"),
    "official: no layout": ([{"prompt": "a dog", "color_context": {"255,0,0": ["dog", 2.5]}}], "layout"),
    "official: bad colour key": ([{"prompt": "a dog", "layout": "map.png",
                                   "color_context": {"255,0": ["dog", 2.5]}}], "color_context['255,0']"),
    "official: subject without colour": ([{"prompt": "a dog and a cat", "layout": "map.png",
                                           "color_context": {"255,0,0": ["dog", 2.5]},
                                           "residual_dict": {"dog": "d.pt", "cat": "c.pt"},
                                           "subject_list": [["dog", 2], ["cat", 5]]}], "subject_list[1]"),
    "official: no residual": ([{"prompt": "a dog", "layout": "map.png", "color_context": {"255,0,0": ["dog", 2.5]},
                                "subject_list": [["dog", 2]]}], "residual_dict"),
    "official: unknown key": ([{"prompt": "a dog", "layout": "map.png", "color_context": {"255,0,0": ["dog", 2]},
                                "edit_tokens": []}], "edit_tokens"),
    "official: index out of range": ([], "[]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs(case, tmp_path):
    obj, field = BAD[case]
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    Image.new("L", (8, 8), 0).save(tmp_path / "black.png")
    _color_map(tmp_path / "map.png", size=32)
    with pytest.raises(L.LayoutError) as e:
        L.parse_layout(obj, str(tmp_path), source=str(tmp_path / "layout.json"))
    msg = one_line_error(e, field)
    assert msg.startswith(str(tmp_path / "layout.json"))


def test_bad_inputs_needing_the_tokenizer(tmp_path, tok):
    lay = L.parse_layout(_sub(box=[0, 0, 1, 1], word="dogs"), "/")
    with pytest.raises(L.LayoutError) as e:
        L.subject_positions(lay, tok)
    assert "does not occur in the prompt" in one_line_error(e, "subjects[0].word 'dogs'")
    with pytest.raises(L.LayoutError) as e:
        L.token_positions(tok, tok.encode("a cat")[0], "dog", field="subjects[3].word")
    one_line_error(e, "subjects[3].word")
    long = L.parse_layout({"prompt": "a dog " * 60, "subjects": [{"word": "dog", "box": [0, 0, 1, 1]}]}, "/")
    with pytest.raises(L.LayoutError) as e:
        L.subject_positions(long, tok)
    assert "122 tokens" in one_line_error(e, "prompt")
    with pytest.raises(L.LayoutError) as e:
        L.check_prompt_length(tok, "a dog " * 60, field="negative_prompt")
    one_line_error(e, "negative_prompt")
    with pytest.raises(L.LayoutError) as e:
        L.parse_layout(_sub(box=[0, 0, 1, 1], word="cow"), "/", tokenizer=tok)
    one_line_error(e, "subjects[0].word")


def test_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text('{"prompt": "a dog",\n "subjects": [}')
    with pytest.raises(L.LayoutError) as e:
        L.load_layout(str(tmp_path / "bad.json"))
    assert "line 2" in one_line_error(e, "bad.json")
    with pytest.raises(L.LayoutError) as e:
        L.load_layout(str(tmp_path / "missing.json"))
    one_line_error(e, "missing.json")
    (tmp_path / "r.json").write_text(json.dumps(_sub(box=[0, 0, 1, 1], residual="res/dog.safetensors")))
    assert L.load_layout(str(tmp_path / "r.json")).subjects[0].residual == str(tmp_path / "res/dog.safetensors")
    with pytest.raises(L.LayoutError) as e:
        L.load_layout(str(tmp_path / "r.json"), check_residuals=True)
    one_line_error(e, "subjects[0].residual")


def test_same_word_twice_warns():
    with pytest.warns(L.LayoutWarning, match="both use the word 'dog'"):
        L.parse_layout({"prompt": "a dog and a dog", "subjects": [{"word": "dog", "box": [0, 0, 0.5, 1]},
                                                                  {"word": "dog", "box": [0.5, 0, 1, 1]}]}, "/")
