"""Convolutional building blocks shared by the UNet and the VAE (NHWC, PyTorch-path names)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

if TYPE_CHECKING:
    from flax.typing import PaddingLike


def conv3x3(features: int, name: str, dtype: DTypeLike, stride: int = 1,
            padding: PaddingLike = ((1, 1), (1, 1))) -> nn.Conv:
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=padding, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with an optional time-embedding shift and a 1x1 shortcut."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, temb_BxT: jax.Array | None = None) -> jax.Array:
        gn = lambda name: nn.GroupNorm(num_groups=self.groups, epsilon=self.eps, dtype=self.dtype, name=name)
        h = conv3x3(self.out_channels, "conv1", self.dtype)(nn.silu(gn("norm1")(x_BxHxWxC)))
        if temb_BxT is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb_BxT))
            h = h + t[:, None, None, :]
        h = conv3x3(self.out_channels, "conv2", self.dtype)(nn.silu(gn("norm2")(h)))
        if x_BxHxWxC.shape[-1] != self.out_channels:
            x_BxHxWxC = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x_BxHxWxC)
        return x_BxHxWxC + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `padding=0` is the VAE's variant: pad right/bottom by one, then VALID."""

    channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            pad = ((0, 0), (0, 0))
        else:
            pad = ((self.padding, self.padding),) * 2
        return conv3x3(self.channels, "conv", self.dtype, stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(self.channels, "conv", self.dtype)(x)


def timestep_embedding(t_B: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' `Timesteps`."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args_BxF = t_B.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args_BxF), jnp.cos(args_BxF)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x))
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(x)
