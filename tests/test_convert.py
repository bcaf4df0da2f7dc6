"""The inverse converter (`convert.to_state_dict`, Flax -> PyTorch names and layouts): round trips
through `convert_state_dict` for each of our modules, PyTorch's own key set and shapes, and its
shape checks."""

import jax
import numpy as np
import pytest
from tiny_checkpoints import VAE_CONFIG, text_encoder_config, unet_config

from cones_jax import convert
from cones_jax.fileio import CheckpointError
from cones_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer, text_encoder_rename, text_encoder_shapes
from cones_jax.models.unet import UNet2DConditionModel, UNetConfig
from cones_jax.models.vae import AutoencoderKL, VAEConfig


def _config(kind: str) -> dict:
    if kind.startswith("unet"):
        return unet_config(kind[-3:])
    return dict(VAE_CONFIG, layers_per_block=1) if kind == "vae" else text_encoder_config("sd1", 600)


def _shapes(kind: str, config: dict | None = None):
    config = config or _config(kind)
    if kind.startswith("unet"):
        return UNet2DConditionModel(UNetConfig.from_dict(config)).param_shapes()
    if kind == "vae":
        return AutoencoderKL(VAEConfig.from_dict(config)).param_shapes()
    return text_encoder_shapes(CLIPTextTransformer(CLIPTextConfig.from_dict(config)))


def _random(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


KINDS = ["unet_sd1", "unet_sd2", "vae", "text"]


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_the_forward_converter(kind):
    shapes = _shapes(kind)
    params = _random(shapes)
    prefix = "text_model." if kind == "text" else ""
    state = convert.to_state_dict(params, prefix)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in state.values())
    back = convert.convert_state_dict(state, shapes, rename=text_encoder_rename if kind == "text" else (lambda k: k))
    flat, flat_back = convert.flatten(params), convert.flatten(back)
    assert flat.keys() == flat_back.keys()
    for k in flat:
        np.testing.assert_array_equal(flat_back[k], flat[k], err_msg="/".join(k))


@pytest.mark.parametrize("kind", KINDS)
def test_keys_and_shapes_are_pytorchs(kind):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import diffusers
    import transformers

    torch.manual_seed(0)
    if kind.startswith("unet"):
        ref = diffusers.UNet2DConditionModel(**_config(kind))
    elif kind == "vae":
        ref = diffusers.AutoencoderKL(**_config(kind))
    else:
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_config(kind)))
    # transformers 5 names CLIPTextModel's tensors without the "text_model." of its checkpoints
    want = {k.removeprefix("text_model."): tuple(v.shape) for k, v in ref.state_dict().items()
            if not k.endswith("position_ids")}
    got = {k: v.shape for k, v in convert.to_state_dict(_random(_shapes(kind))).items()}
    assert got == want


def test_shape_checks_name_the_tensor():
    params = _random(_shapes("unet_sd1"))
    template = convert.state_dict_template(params)
    key = "conv_in.weight"
    with pytest.raises(CheckpointError, match=r"mis-shaped .*conv_in/kernel gives"):
        convert.params_to_state_dict(params, dict(template, **{key: (1, 2, 3, 3)}), component="unet")
    with pytest.raises(CheckpointError, match="no Flax parameter: extra.weight"):
        convert.params_to_state_dict(params, dict(template, **{"extra.weight": (1,)}))
    with pytest.raises(CheckpointError, match="no key takes: conv_in/bias"):
        convert.params_to_state_dict(params, {k: v for k, v in template.items() if k != "conv_in.bias"})


def test_path_to_torch_key_inverts_torch_key_to_path():
    for key in ("down_blocks.0.resnets.1.conv1.weight", "time_embedding.linear_1.bias",
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight"):
        path = convert.torch_key_to_path(key)
        assert convert.path_to_torch_key(path[:-1] + ("kernel",)) == key.rsplit(".", 1)[0] + ".weight"
        assert convert.path_to_torch_key(path) == key
