"""CLIP text encoder and tokenizer: parity with transformers on tiny random checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_checkpoints import make_text_encoder, make_tokenizer, text_encoder_config

from cones_jax.fileio import CheckpointError, load_safetensors, save_safetensors
from cones_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer, text_encoder_rename
from cones_jax.pipeline import load_text_encoder
from cones_jax.tokenizer import load_tokenizer, write_clip_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LONG_PROMPT = " ".join(["a photo of a big red dog sitting next to a small blue cat on the beach"] * 8)
PROMPTS = [
    "a photo of a dog",
    "A rendering of a teddybear, sitting in the forest!",
    "",
    "a dog and a dog and a dog",
    LONG_PROMPT,
]
KINDS = {"sd1": "eos", "sd2": "!"}


@pytest.fixture(scope="module", params=sorted(KINDS))
def checkpoint(request, tmp_path_factory):
    """A tiny model folder (tokenizer/ + text_encoder/) and the PyTorch reference model."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    tok = make_tokenizer(str(root / "tokenizer"), KINDS[kind])
    ref = make_text_encoder(str(root / "text_encoder"), kind, tok.vocab_size, seed=1 if kind == "sd1" else 2)
    module, params = load_text_encoder(str(root / "text_encoder"))
    config = module.config
    return dict(kind=kind, root=root, tok=tok, ref=ref, module=module, params=params, config=config)


def _reference(ref, ids):
    with torch.no_grad():
        out = ref(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def test_matches_transformers(checkpoint):
    tok, module, params = checkpoint["tok"], checkpoint["module"], checkpoint["params"]
    ids = tok.encode(PROMPTS)
    out = module.apply({"params": params}, jnp.asarray(ids))
    ref_last, ref_pooled = _reference(checkpoint["ref"], ids)
    assert out["last_hidden_state"].shape == (len(PROMPTS), 77, 32)
    assert out["last_hidden_state"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out["last_hidden_state"]), ref_last, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["pooled"]), ref_pooled, atol=1e-5, rtol=1e-5)


def test_config_read(checkpoint):
    cfg = checkpoint["config"]
    if checkpoint["kind"] == "sd1":
        assert (cfg.hidden_act, cfg.num_hidden_layers, cfg.eos_token_id) == ("quick_gelu", 2, checkpoint["tok"].eos_id)
    else:
        assert (cfg.hidden_act, cfg.num_hidden_layers, cfg.eos_token_id) == ("gelu", 3, 2)


def test_jit_equals_eager(checkpoint):
    tok, module, params = checkpoint["tok"], checkpoint["module"], checkpoint["params"]
    ids = jnp.asarray(tok.encode(PROMPTS[:3]))
    eager = module.apply({"params": params}, ids)
    jitted = jax.jit(module.apply)({"params": params}, ids)
    for key in ("last_hidden_state", "pooled"):
        np.testing.assert_allclose(np.asarray(jitted[key]), np.asarray(eager[key]), atol=1e-6, rtol=1e-6)


def test_remat_same_values_and_grads(checkpoint):
    tok, module, params = checkpoint["tok"], checkpoint["module"], checkpoint["params"]
    ids = jnp.asarray(tok.encode(PROMPTS[:2]))
    remat = CLIPTextTransformer(checkpoint["config"], remat=True)

    def loss(p, m):
        out = m.apply({"params": p}, ids)
        return jnp.sum(out["last_hidden_state"] ** 2) + jnp.sum(out["pooled"])

    v0, g0 = jax.value_and_grad(loss)(params, module)
    v1, g1 = jax.value_and_grad(loss)(params, remat)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_close(checkpoint):
    tok, params = checkpoint["tok"], checkpoint["params"]
    ids = jnp.asarray(tok.encode(PROMPTS[:2]))
    ref = checkpoint["module"].apply({"params": params}, ids)["last_hidden_state"]
    out = CLIPTextTransformer(checkpoint["config"], dtype=jnp.bfloat16).apply({"params": params}, ids)
    assert out["last_hidden_state"].dtype == jnp.float32
    err = np.abs(np.asarray(out["last_hidden_state"]) - np.asarray(ref))
    assert err.max() < 0.25 and err.mean() < 0.03


def _resave(src_dir, dst_dir, edit):
    """Copies a text_encoder folder, rewriting its tensors with `edit(dict) -> dict`."""
    os.makedirs(dst_dir, exist_ok=True)
    shutil.copy(os.path.join(src_dir, "config.json"), dst_dir)
    state, _ = load_safetensors(os.path.join(src_dir, "model.safetensors"))
    save_safetensors(os.path.join(dst_dir, "model.safetensors"), edit({k: np.array(v) for k, v in state.items()}))


def test_keys_with_and_without_prefix_load(checkpoint, tmp_path):
    src = str(checkpoint["root"] / "text_encoder")
    keys = list(load_safetensors(os.path.join(src, "model.safetensors"))[0])
    assert not any(k.startswith("text_model.") for k in keys)  # transformers 5 writes no prefix

    def prefixed(state):
        out = {"text_model." + k: v for k, v in state.items()}
        out["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]  # old exports keep it
        out["text_projection.weight"] = np.zeros((16, 32), np.float32)  # CLIPTextModelWithProjection
        return out

    _resave(src, str(tmp_path / "prefixed"), prefixed)
    _, params = load_text_encoder(str(tmp_path / "prefixed"))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(checkpoint["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rename():
    assert text_encoder_rename("text_model.encoder.layers.3.mlp.fc1.weight") == "encoder.layers.3.mlp.fc1.weight"
    assert text_encoder_rename("final_layer_norm.bias") == "final_layer_norm.bias"
    assert text_encoder_rename("text_model.embeddings.position_ids") is None
    assert text_encoder_rename("text_projection.weight") is None


def test_bad_weights_raise_naming_the_key(checkpoint, tmp_path):
    src = str(checkpoint["root"] / "text_encoder")
    key = "encoder.layers.1.mlp.fc1.weight"

    def misshape(state):
        state[key] = state[key][:-1]
        return state

    _resave(src, str(tmp_path / "misshaped"), misshape)
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight"):
        load_text_encoder(str(tmp_path / "misshaped"))

    _resave(src, str(tmp_path / "missing"), lambda s: {k: v for k, v in s.items() if k != "final_layer_norm.bias"})
    with pytest.raises(CheckpointError, match="final_layer_norm/bias"):
        load_text_encoder(str(tmp_path / "missing"))

    _resave(src, str(tmp_path / "extra"), lambda s: dict(s, **{"encoder.layers.9.mlp.fc1.weight": s[key]}))
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.9"):
        load_text_encoder(str(tmp_path / "extra"))


def test_config_errors():
    good = text_encoder_config("sd1", 600)
    extra = dict(good, architectures=["CLIPTextModel"], torch_dtype="float32")
    assert CLIPTextConfig.from_dict(extra).vocab_size == 600
    with pytest.raises(CheckpointError, match="hidden_act"):
        CLIPTextConfig.from_dict(dict(good, hidden_act="relu"))
    with pytest.raises(CheckpointError, match="hidden_size"):
        CLIPTextConfig.from_dict({k: v for k, v in good.items() if k != "hidden_size"})
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        CLIPTextConfig.from_dict(dict(good, num_attention_heads=5))
    with pytest.raises(CheckpointError, match="model_type"):
        CLIPTextConfig.from_dict(dict(good, model_type="t5"))
    assert CLIPTextConfig.from_dict(dict(good, hidden_act="gelu_pytorch_tanh")).hidden_act == "gelu_pytorch_tanh"


def _hf_tokenizer(folder):
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _hf_encode(hf, prompts, max_length=77):
    return np.asarray(hf(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids)


def test_tokenizer_matches_transformers(checkpoint):
    tok, folder = checkpoint["tok"], checkpoint["root"] / "tokenizer"
    hf = _hf_tokenizer(folder)
    prompts = PROMPTS + ["Hello!!  World", "a photo of a zorblax's 3 dogs", "café\tnaïve\nthe <|endoftext|> end"]
    ids = tok.encode(prompts)
    assert ids.dtype == np.int32 and ids.shape == (len(prompts), 77)
    np.testing.assert_array_equal(ids, _hf_encode(hf, prompts))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length) == (
        hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.model_max_length)
    if checkpoint["kind"] == "sd2":
        assert tok.pad_id == 0
    else:
        assert tok.pad_id == tok.eos_id == tok.vocab_size - 1
    # Truncation keeps the end token last; the untruncated length is what n_tokens reports.
    long_row = tok.encode(LONG_PROMPT)[0]
    assert long_row[0] == tok.bos_id and long_row[-1] == tok.eos_id
    assert tok.n_tokens(LONG_PROMPT) == len(hf(LONG_PROMPT).input_ids) > 77
    assert tok.n_tokens("a photo of a dog") == 7
    np.testing.assert_array_equal(tok.encode("a photo of a dog"), ids[:1])


def test_tokenizer_json_folder_and_added_tokens(checkpoint, tmp_path):
    hf = _hf_tokenizer(checkpoint["root"] / "tokenizer")
    hf.add_tokens(["<sks>"])
    hf.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "tokenizer.json") and not os.path.isfile(tmp_path / "vocab.json")
    ours = load_tokenizer(str(tmp_path))
    prompts = ["a <sks> dog on the beach", "a photo of a <sks>", LONG_PROMPT]
    np.testing.assert_array_equal(ours.encode(prompts), _hf_encode(hf, prompts))
    assert ours.word_ids("<sks>") == [hf.convert_tokens_to_ids("<sks>")]


def test_short_max_length(tmp_path):
    tok = make_tokenizer(str(tmp_path), "!", max_length=8)
    hf = _hf_tokenizer(tmp_path)
    prompts = ["a photo of a dog on the beach in the city", "a dog"]
    ids = tok.encode(prompts)
    np.testing.assert_array_equal(ids, _hf_encode(hf, prompts, max_length=8))
    assert ids.shape == (2, 8)


def test_word_ids_and_find_word(checkpoint):
    tok = checkpoint["tok"]
    assert len(tok.word_ids("dog")) == 1
    multi = tok.word_ids("zorblax")
    assert len(multi) > 1
    row = tok.encode("a photo of a zorblax next to a dog and a zorblax")[0]
    found = tok.find_word(row, "zorblax")
    assert len(found) == 2 and all(len(f) == len(multi) for f in found)
    for positions in found:
        assert [int(row[p]) for p in positions] == multi
    assert found[0][0] == 5  # BOS a photo of a -> position 5

    row = tok.encode("a dog and a dog, and a dog")[0]
    assert tok.find_word(row, "dog") == [[2], [5], [9]]
    assert tok.find_word(row, "Dog") == [[2], [5], [9]]  # lower-cased like the prompt
    assert tok.find_word(row, "cat") == []
    phrase = tok.find_word(tok.encode("the teddy bear sitting")[0], "teddy bear")
    assert phrase == [[2, 3]]
    # Padding never matches, even when the pad token is the word ("!" in SD 2.x).
    assert tok.find_word(tok.encode("a dog")[0], "!") == []
    with pytest.raises(ValueError, match="tokenises to nothing"):
        tok.word_ids("   ")


def test_decode_round_trip(checkpoint):
    tok = checkpoint["tok"]
    for text in ["a photo of a dog", "a zorblax on the beach , sitting"]:
        assert tok.decode(tok.encode(text)[0]) == text


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path / "empty"))
    folder = tmp_path / "broken"
    write_clip_tokenizer(str(folder), ["dog"])
    (folder / "vocab.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="vocab.json"):
        load_tokenizer(str(folder))


def test_write_clip_tokenizer_layout(tmp_path):
    tok = write_clip_tokenizer(str(tmp_path), ["dog", "dog", "sunflower", "teddy bear"], pad_token="!")
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert max(vocab, key=vocab.get) == "<|endoftext|>" and vocab["<|startoftext|>"] == len(vocab) - 2
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (len(vocab) - 2, len(vocab) - 1, 0)
    for word in ["dog", "sunflower", "teddy", "bear"]:
        assert len(tok.word_ids(word)) == 1, word
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version") and lines[1] == "d o"  # most frequent word first
    limited = write_clip_tokenizer(str(tmp_path / "limited"), ["dog", "dog", "sunflower"], max_merges=4)
    assert len(limited.word_ids("dog")) == 1 and len(limited.word_ids("sunflower")) > 1
