"""Stable Diffusion's AutoencoderKL (diffusers layout) in Flax, NHWC, images in [-1, 1]."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from cones_jax.fileio import CheckpointError
from cones_jax.models.attention import dot_product_attention
from cones_jax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv3x3


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        """Reads diffusers' `vae/config.json` (AutoencoderKL)."""
        for key, want in (("act_fn", "silu"), ("latents_mean", None), ("latents_std", None)):
            if d.get(key, want) != want:
                raise CheckpointError(f"vae config: {key}={d[key]!r} is not supported (expected {want!r})")
        n = len(d.get("block_out_channels", cls.block_out_channels))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = d.get(key, [want] * n)
            if list(types) != [want] * n:
                raise CheckpointError(f"vae config: {key}={types!r} is not supported (expected {want} blocks)")
        return cls(
            in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
            latent_channels=d.get("latent_channels", 4),
            block_out_channels=tuple(d.get("block_out_channels", cls.block_out_channels)),
            layers_per_block=d.get("layers_per_block", 2), norm_num_groups=d.get("norm_num_groups", 32),
            scaling_factor=float(d.get("scaling_factor", 0.18215)),
            shift_factor=float(d.get("shift_factor") or 0.0),
            use_quant_conv=bool(d.get("use_quant_conv", True)),
            use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(d.get("mid_block_add_attention", True)))


class _SpatialSelfAttention(nn.Module):
    """The VAE's single-head self-attention over all pixels, with GroupNorm and a residual."""

    channels: int
    groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        b, h, w, c = x_BxHxWxC.shape
        y_BxLxC = nn.GroupNorm(num_groups=self.groups, epsilon=1e-6, dtype=self.dtype, name="group_norm")(
            x_BxHxWxC).reshape(b, h * w, 1, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y_BxLxC) for n in ("to_q", "to_k", "to_v"))
        # fp32 softmax, as diffusers' upcast_softmax for this layer
        out = dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), c ** -0.5)
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out.astype(self.dtype).reshape(b, h * w, c))
        return out.reshape(b, h, w, c) + x_BxHxWxC


class _MidBlock(nn.Module):
    channels: int
    groups: int
    attention: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name="resnets_0")(x)
        if self.attention:
            x = _SpatialSelfAttention(self.channels, self.groups, dtype=self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name="resnets_1")(x)


class _Block(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets then an optional resampler."""

    channels: int
    n_layers: int
    groups: int
    resample: str | None  # "down", "up" or None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.n_layers):
            x = ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.resample == "down":
            x = Downsample2D(self.channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


def _out(x: jax.Array, features: int, groups: int, dtype: DTypeLike):
    x = nn.silu(nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, name="conv_norm_out")(x))
    return conv3x3(features, "conv_out", dtype)(x)


class Encoder(nn.Module):
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, g = self.config, self.config.norm_num_groups
        n = len(cfg.block_out_channels)
        x = conv3x3(cfg.block_out_channels[0], "conv_in", self.dtype)(x)
        for i, ch in enumerate(cfg.block_out_channels):
            x = _Block(ch, cfg.layers_per_block, g, "down" if i < n - 1 else None, self.dtype,
                       name=f"down_blocks_{i}")(x)
        x = _MidBlock(cfg.block_out_channels[-1], g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
        return _out(x, 2 * cfg.latent_channels, g, self.dtype)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, g = self.config, self.config.norm_num_groups
        n = len(cfg.block_out_channels)
        x = conv3x3(cfg.block_out_channels[-1], "conv_in", self.dtype)(z)
        x = _MidBlock(cfg.block_out_channels[-1], g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
        for i, ch in enumerate(reversed(cfg.block_out_channels)):
            x = _Block(ch, cfg.layers_per_block + 1, g, "up" if i < n - 1 else None, self.dtype,
                       name=f"up_blocks_{i}")(x)
        return _out(x, cfg.out_channels, g, self.dtype)


class AutoencoderKL(nn.Module):
    """`encode(images) -> (mean, std)` of the latent Gaussian; `decode(latents) -> images`.

    Latents here are unscaled; multiply by `config.scaling_factor` (after subtracting
    `shift_factor`) to get what the UNet sees, as diffusers pipelines do (`scale_latents`).
    """

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)

    def encode(self, images_BxHxWx3: jax.Array) -> tuple[jax.Array, jax.Array]:
        moments = self.encoder(images_BxHxWx3.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents_BxhxwxC: jax.Array) -> jax.Array:
        z = latents_BxhxwxC.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)

    def param_shapes(self, hw: tuple[int, int] = (16, 16)) -> dict[str, Any]:
        x = jax.ShapeDtypeStruct((1, *hw, self.config.in_channels), jnp.float32)
        return jax.eval_shape(lambda x: self.init(jax.random.PRNGKey(0), x), x)["params"]


def scale_latents(config: VAEConfig, latents: jax.Array) -> jax.Array:
    """VAE latent -> the UNet's latent space."""
    return (latents - config.shift_factor) * config.scaling_factor


def unscale_latents(config: VAEConfig, latents: jax.Array) -> jax.Array:
    return latents / config.scaling_factor + config.shift_factor


_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_rename(key: str) -> str | None:
    """Old diffusers VAE checkpoints name the mid-block attention query/key/value/proj_attn."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in _LEGACY:
        return ".".join(parts[:-2] + [_LEGACY[parts[-2]], parts[-1]])
    return key
