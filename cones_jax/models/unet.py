"""The Stable Diffusion 1.x / 2.x conditional UNet (diffusers' `UNet2DConditionModel`) in Flax.

NHWC throughout. The prediction type (ε or v) is the scheduler's business: the network is the same.
Every cross-attention (attn2) accepts the generic bias hook of `cones_jax.models.attention`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cones_jax.fileio import CheckpointError
from cones_jax.models.attention import BiasFn, Transformer2D
from cones_jax.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    conv3x3,
    timestep_embedding,
)

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers config keys whose value must be this (or absent) for the SD 1.x/2.x architecture we build
_REQUIRED = {
    "act_fn": "silu", "center_input_sample": False, "class_embed_type": None, "addition_embed_type": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "dual_cross_attention": False, "encoder_hid_dim": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "mid_block_scale_factor": 1, "num_class_embeds": None,
    "only_cross_attention": False, "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
    "time_cond_proj_dim": None, "timestep_post_act": None, "transformer_layers_per_block": 1,
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "cross_attention_norm": None,
    "attention_type": "default", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "class_embeddings_concat": False, "projection_class_embeddings_input_dim": None,
    "reverse_transformer_layers_per_block": None, "mid_block_only_cross_attention": None,
    "encoder_hid_dim_type": None, "addition_time_embed_dim": None,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    heads: tuple[int, ...] = (5, 10, 20, 20)  # per down block (diffusers' `attention_head_dim`)
    cross_attention_dim: int = 1024
    use_linear_projection: bool = True
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    sample_size: int = 64

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Reads diffusers' `unet/config.json`; rejects what our SD 1.x/2.x UNet does not build."""
        for key, want in _REQUIRED.items():
            got = d.get(key, want)
            if got != want and not (isinstance(want, (int, float)) and isinstance(got, (int, float)) and got == want):
                raise CheckpointError(f"unet config: {key}={got!r} is not supported (Stable Diffusion 1.x/2.x "
                                      f"UNets have {want!r})")
        n = len(d.get("block_out_channels", cls.block_out_channels))
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n
        down = tuple(d.get("down_block_types", cls.down_block_types))
        up = tuple(d.get("up_block_types", cls.up_block_types))
        for t in down:
            if t not in _DOWN:
                raise CheckpointError(f"unet config: down block type {t!r} is not supported (use {' or '.join(_DOWN)})")
        for t in up:
            if t not in _UP:
                raise CheckpointError(f"unet config: up block type {t!r} is not supported (use {' or '.join(_UP)})")
        cad = d.get("cross_attention_dim", 768)
        if isinstance(cad, (list, tuple)):
            raise CheckpointError("unet config: a per-block cross_attention_dim list is not supported")
        lpb = d.get("layers_per_block", 2)
        if isinstance(lpb, (list, tuple)):
            raise CheckpointError("unet config: a per-block layers_per_block list is not supported")
        cfg = cls(
            in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
            block_out_channels=tuple(d.get("block_out_channels", cls.block_out_channels)),
            down_block_types=down, up_block_types=up, layers_per_block=lpb, heads=heads,
            cross_attention_dim=cad, use_linear_projection=bool(d.get("use_linear_projection", False)),
            upcast_attention=bool(d.get("upcast_attention", False)),
            norm_num_groups=d.get("norm_num_groups", 32), norm_eps=d.get("norm_eps", 1e-5),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True), freq_shift=d.get("freq_shift", 0),
            downsample_padding=d.get("downsample_padding", 1), sample_size=d.get("sample_size", 64))
        if not (len(cfg.down_block_types) == len(cfg.up_block_types) == n == len(cfg.heads)):
            raise CheckpointError("unet config: block_out_channels, down/up block types and attention heads "
                                  "must have the same length")
        for c, h in zip(cfg.block_out_channels, cfg.heads):
            if c % h:
                raise CheckpointError(f"unet config: {c} channels cannot be split into {h} attention heads")
        return cfg


def cross_attention_resolutions(config: UNetConfig, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """The (h, w) latent grids at which a UNet of `config` cross-attends, finest first, one per level.

    Level k runs at the latent size halved k times (each `Downsample2D` is a 3x3 stride-2 conv, so
    it rounds up). A level cross-attends when its down block or its mirrored up block (up block
    n-1-k) is a CrossAttn block; the coarsest level always does, in the mid block.
    """
    n = len(config.block_out_channels)
    h, w = latent_hw
    out = []
    for k in range(n):
        if (config.down_block_types[k] == "CrossAttnDownBlock2D" or k == n - 1
                or config.up_block_types[n - 1 - k] == "CrossAttnUpBlock2D"):
            out.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return out


class _Blocks(nn.Module):
    """One down/mid/up block of the UNet: resnets, optional transformers, optional resampler."""

    kind: str  # "down", "mid" or "up"
    channels: int
    n_layers: int
    heads: int
    cross_attention: bool
    resample: bool
    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, temb: jax.Array, context: jax.Array, skips: list[jax.Array],
                 kw: dict[str, Any]) -> jax.Array:
        cfg, dt, ch = self.config, self.dtype, self.channels
        # Rematerialised layers keep only their inputs for the backward pass. Attention layers are
        # rematerialised only without a bias hook or sown maps (training), whose Python callables
        # and side outputs a checkpointed call cannot take.
        plain_attn = kw.get("bias_fn") is None and not kw.get("sow_probs")
        resnet_cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        attn_cls = nn.remat(Transformer2D) if self.remat and plain_attn else Transformer2D
        resnet = lambda j: resnet_cls(ch, cfg.norm_num_groups, cfg.norm_eps, dtype=dt, name=f"resnets_{j}")
        layer = lambda j: attn_cls(ch, self.heads, ch // self.heads, cfg.use_linear_projection,
                                   cfg.upcast_attention, cfg.norm_num_groups, dtype=dt, name=f"attentions_{j}")
        attn = lambda j: ((lambda x, c: layer(j)(x, c)) if plain_attn else (lambda x, c: layer(j)(x, c, **kw)))
        if self.kind == "mid":
            h = resnet(0)(h, temb)
            h = attn(0)(h, context)
            return resnet(1)(h, temb)
        for j in range(self.n_layers):
            if self.kind == "up":
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = resnet(j)(h, temb)
            if self.cross_attention:
                h = attn(j)(h, context)
            if self.kind == "down":
                skips.append(h)
        if self.resample and self.kind == "down":
            h = Downsample2D(ch, cfg.downsample_padding, dtype=dt, name="downsamplers_0")(h)
            skips.append(h)
        elif self.resample:
            h = Upsample2D(ch, dtype=dt, name="upsamplers_0")(h)
        return h


class UNet2DConditionModel(nn.Module):
    """`remat=True` rematerialises every resnet and (unbiased) transformer layer in the backward pass:
    far less activation memory for training through the UNet, for about one more forward pass."""

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, sample_BxHxWxC: jax.Array, timesteps: jax.Array, context_BxLxE: jax.Array, *,
                 cross_attn_bias: BiasFn | None = None, sow_attention: bool = False) -> jax.Array:
        """ε/v prediction for latents `sample` at (possibly fractional) `timesteps` ([B] or scalar).

        `cross_attn_bias(S_BxHxQxK, (h, w))` is handed to every cross-attention layer; see
        `cones_jax.models.attention`. With `sow_attention`, each cross-attention layer sows its
        head-averaged attention probabilities into the "intermediates" collection.
        """
        cfg, dt = self.config, self.dtype
        b = sample_BxHxWxC.shape[0]
        n = len(cfg.block_out_channels)
        factor = 2 ** (n - 1)
        if sample_BxHxWxC.shape[1] % factor or sample_BxHxWxC.shape[2] % factor:
            raise ValueError(f"latent height and width must be multiples of {factor}, got {sample_BxHxWxC.shape[1:3]}")
        t_B = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
        c0 = cfg.block_out_channels[0]
        temb = timestep_embedding(t_B, c0, cfg.flip_sin_to_cos, cfg.freq_shift).astype(dt)
        temb = TimestepEmbedding(4 * c0, dtype=dt, name="time_embedding")(temb)
        context_BxLxE = context_BxLxE.astype(dt)
        kw = dict(bias_fn=cross_attn_bias, sow_probs=sow_attention)

        h = conv3x3(c0, "conv_in", dt)(sample_BxHxWxC.astype(dt))
        skips = [h]
        for i, (kind, ch) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
            h = _Blocks("down", ch, cfg.layers_per_block, cfg.heads[i], kind == "CrossAttnDownBlock2D", i < n - 1,
                        cfg, dt, self.remat, name=f"down_blocks_{i}")(h, temb, context_BxLxE, skips, kw)
        h = _Blocks("mid", cfg.block_out_channels[-1], 1, cfg.heads[-1], True, False, cfg, dt, self.remat,
                    name="mid_block")(h, temb, context_BxLxE, skips, kw)
        heads_up = tuple(reversed(cfg.heads))
        for i, (kind, ch) in enumerate(zip(cfg.up_block_types, reversed(cfg.block_out_channels))):
            h = _Blocks("up", ch, cfg.layers_per_block + 1, heads_up[i], kind == "CrossAttnUpBlock2D", i < n - 1,
                        cfg, dt, self.remat, name=f"up_blocks_{i}")(h, temb, context_BxLxE, skips, kw)

        h = nn.silu(nn.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=dt,
                                 name="conv_norm_out")(h))
        return conv3x3(cfg.out_channels, "conv_out", dt)(h)

    def param_shapes(self, latent_hw: tuple[int, int] = (8, 8), context_len: int = 77) -> dict[str, Any]:
        """The params tree as shape/dtype structs, from `jax.eval_shape` (no weights are made)."""
        x = jax.ShapeDtypeStruct((1, *latent_hw, self.config.in_channels), jnp.float32)
        c = jax.ShapeDtypeStruct((1, context_len, self.config.cross_attention_dim), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.float32)
        return jax.eval_shape(lambda x, t, c: self.init(jax.random.PRNGKey(0), x, t, c), x, t, c)["params"]
