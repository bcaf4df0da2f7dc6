"""`cross_attention_resolutions` against the UNet itself: the grids it names are exactly those at
which a traced UNet hands its cross-attention scores to the bias hook."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from tiny_checkpoints import unet_config

from cones_jax import layout
from cones_jax.demo import base_model
from cones_jax.models.unet import UNet2DConditionModel, UNetConfig, cross_attention_resolutions

# SD 2.x's block layout (cross-attention at every level) with a few channels.
SD2_SHAPE = dataclasses.replace(UNetConfig(), block_out_channels=(8, 8, 8, 8), heads=(2, 2, 2, 2),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=16)
# A level whose up block alone cross-attends (level 1), and one where neither block does (level 2).
MIXED = dataclasses.replace(SD2_SHAPE, down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * 3,
                            up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))

CONFIGS = {
    "tiny_sd1": UNetConfig.from_dict(unet_config("sd1")),
    "tiny_sd2": UNetConfig.from_dict(unet_config("sd2")),
    "sd2_shape": SD2_SHAPE,
    "mixed": MIXED,
    "demo": UNetConfig.from_dict(base_model.UNET),
}


def traced_resolutions(config: UNetConfig, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """The (h, w) each cross-attention call hands the bias hook, checked against its query length,
    finest first (no weights are made: the UNet is only traced)."""
    seen = set()

    def bias(s_BxHxQxK, hw):
        assert s_BxHxQxK.shape[2] == hw[0] * hw[1]  # the hook's grid is the layer's query grid
        seen.add(tuple(int(v) for v in hw))
        return jnp.zeros((), s_BxHxQxK.dtype)

    unet = UNet2DConditionModel(config)
    x = jax.ShapeDtypeStruct((1, *latent_hw, config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    c = jax.ShapeDtypeStruct((1, 7, config.cross_attention_dim), jnp.float32)
    jax.eval_shape(lambda x, t, c: unet.init_with_output(jax.random.PRNGKey(0), x, t, c, cross_attn_bias=bias),
                   x, t, c)
    return sorted(seen, reverse=True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_resolutions_are_where_the_unet_cross_attends(name):
    config = CONFIGS[name]
    factor = 2 ** (len(config.block_out_channels) - 1)
    for latent_hw in ((config.sample_size, config.sample_size), (3 * factor, 2 * factor)):
        want = traced_resolutions(config, latent_hw)
        assert want, "the UNet should cross-attend somewhere"
        assert cross_attention_resolutions(config, latent_hw) == want, latent_hw


def test_callers_use_the_one_rule():
    demo = UNetConfig.from_dict(base_model.UNET)
    side = demo.sample_size
    assert base_model.cross_attention_sides(UNet2DConditionModel(demo)) == tuple(
        h for h, _ in traced_resolutions(demo, (side, side)))
    assert layout.attention_resolutions(256, 128, vae_scale_factor=8, unet=MIXED) == traced_resolutions(MIXED, (32, 16))
