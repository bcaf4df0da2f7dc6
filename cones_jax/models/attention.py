"""Attention with an additive pre-softmax bias hook, and the SD spatial transformer built on it.

The hook is generic: a cross-attention layer that is given `bias_fn` computes its raw scores
`S = Q·Kᵀ` (unscaled, fp32), asks `bias_fn(S_BxHxQxK, hw)` for an additive bias (anything
broadcastable to S, computed from S itself if it likes), and takes
`softmax((S + bias) · d_head^-½)`. Layers given no hook take the fast path: on GPU/TPU
`jax.nn.dot_product_attention` (cuDNN flash attention on GPU where available), on CPU
`blocked_attention` (query-blocked loop; XLA:CPU's fused path is ~5x slower than PyTorch's).

Submodule names follow the PyTorch module paths so that `cones_jax.convert` maps weights by rule.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# (raw scores S [B, H, Q, K] in fp32, (height, width) of the query grid) -> additive bias
BiasFn = Callable[[jax.Array, tuple[int, int]], jax.Array]

# Query rows per step of the CPU attention loop: a [block, K] fp32 score tile (16 MiB at K=4096).
CPU_QUERY_BLOCK = 1024


def _divisor_at_most(n: int, cap: int) -> int:
    return next(c for c in range(min(n, cap), 0, -1) if n % c == 0)


def blocked_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, scale: float, q_block: int = CPU_QUERY_BLOCK):
    """softmax(q·kᵀ·scale)·v, one `lax.map` step per (batch, head, query block).

    For XLA:CPU. `jax.nn.dot_product_attention` lowers to batched einsums around a [B, H, Q, K]
    score tensor: at 64x64 latents that is 671 MB per layer, freshly allocated (page-faulted) on
    every call, and the batched dots and the softmax over it run ~5x slower than PyTorch's CPU
    flash kernel. Looping over [block, K] tiles keeps them in cache, reuses one buffer across
    steps and makes every dot a plain 2-D matmul. Scores and softmax statistics are fp32; the
    normalisation is applied after the P·V product ([block, D] instead of [block, K] divides).
    """
    b, q_len, h, d = q_BxQxHxD.shape
    k_len, dv = k_BxKxHxD.shape[1], v_BxKxHxD.shape[-1]
    blk = _divisor_at_most(q_len, q_block)
    n = q_len // blk
    dt = q_BxQxHxD.dtype
    q_NxCxD = (q_BxQxHxD * jnp.asarray(scale, dt)).transpose(0, 2, 1, 3).reshape(b * h * n, blk, d)
    kT_GxDxK = k_BxKxHxD.transpose(0, 2, 3, 1).reshape(b * h, d, k_len)
    v_GxKxD = v_BxKxHxD.transpose(0, 2, 1, 3).reshape(b * h, k_len, dv)

    def step(args):
        i, q_CxD = args
        s_CxK = jnp.matmul(q_CxD, kT_GxDxK[i // n], preferred_element_type=jnp.float32)
        e_CxK = jnp.exp(s_CxK - s_CxK.max(axis=-1, keepdims=True))
        o_CxD = jnp.matmul(e_CxK.astype(v_GxKxD.dtype), v_GxKxD[i // n], preferred_element_type=jnp.float32)
        return (o_CxD / e_CxK.sum(axis=-1, keepdims=True)).astype(dt)

    o_NxCxD = jax.lax.map(step, (jnp.arange(b * h * n), q_NxCxD))
    return o_NxCxD.reshape(b, h, q_len, dv).transpose(0, 2, 1, 3)


def dot_product_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, scale: float):
    """The fused unbiased path: `blocked_attention` on CPU, `jax.nn.dot_product_attention` elsewhere
    (cuDNN flash attention on GPU where available)."""
    if jax.default_backend() == "cpu":
        return blocked_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, scale)
    return jax.nn.dot_product_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, scale=scale)


class Attention(nn.Module):
    """Multi-head attention as in diffusers' `Attention` (to_q/to_k/to_v, to_out.0)."""

    heads: int
    dim_head: int
    out_dim: int
    qkv_bias: bool = False
    upcast: bool = False  # softmax inputs in fp32 even when computing in half precision
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxQxC, context_BxKxE=None, *, bias_fn: Optional[BiasFn] = None,
                 hw: tuple[int, int] = (0, 0), sow_probs: bool = False):
        inner = self.heads * self.dim_head
        dense = lambda name, bias: nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)
        context = x_BxQxC if context_BxKxE is None else context_BxKxE
        b, q_len, _ = x_BxQxC.shape
        k_len = context.shape[1]
        q_BxQxHxD = dense("to_q", self.qkv_bias)(x_BxQxC).reshape(b, q_len, self.heads, self.dim_head)
        k_BxKxHxD = dense("to_k", self.qkv_bias)(context).reshape(b, k_len, self.heads, self.dim_head)
        v_BxKxHxD = dense("to_v", self.qkv_bias)(context).reshape(b, k_len, self.heads, self.dim_head)
        scale = self.dim_head ** -0.5
        if bias_fn is None and not sow_probs:
            if self.upcast:
                q_BxQxHxD, k_BxKxHxD = q_BxQxHxD.astype(jnp.float32), k_BxKxHxD.astype(jnp.float32)
                v_BxKxHxD = v_BxKxHxD.astype(jnp.float32)
            out_BxQxHxD = dot_product_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, scale)
        else:
            s_BxHxQxK = jnp.einsum("bqhd,bkhd->bhqk", q_BxQxHxD.astype(jnp.float32),
                                   k_BxKxHxD.astype(jnp.float32))
            if bias_fn is not None:
                s_BxHxQxK = s_BxHxQxK + bias_fn(s_BxHxQxK, hw).astype(jnp.float32)
            p_BxHxQxK = jax.nn.softmax(s_BxHxQxK * scale, axis=-1)
            if sow_probs:
                self.sow("intermediates", "attn_probs", p_BxHxQxK.mean(axis=1))
            out_BxQxHxD = jnp.einsum("bhqk,bkhd->bqhd", p_BxHxQxK.astype(v_BxKxHxD.dtype), v_BxKxHxD)
        out_BxQxI = out_BxQxHxD.reshape(b, q_len, inner).astype(self.dtype)
        return nn.Dense(self.out_dim, dtype=self.dtype, name="to_out_0")(out_BxQxI)


class GEGLU(nn.Module):
    dim_out: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(self.dim_out * 2, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dim: int
    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention (the only place the bias hook acts), GEGLU feed-forward."""

    dim: int
    heads: int
    dim_head: int
    upcast: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, *, bias_fn=None, hw=(0, 0), sow_probs=False):
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        attn = lambda name: Attention(self.heads, self.dim_head, self.dim, upcast=self.upcast,
                                      dtype=self.dtype, name=name)
        x = attn("attn1")(ln("norm1")(x)) + x
        x = attn("attn2")(ln("norm2")(x), context, bias_fn=bias_fn, hw=hw, sow_probs=sow_probs) + x
        return FeedForward(self.dim, dtype=self.dtype, name="ff")(ln("norm3")(x)) + x


class Transformer2D(nn.Module):
    """diffusers' `Transformer2DModel` for SD (one block; conv or linear in/out projections)."""

    channels: int
    heads: int
    dim_head: int
    use_linear_projection: bool = False
    upcast: bool = False
    norm_groups: int = 32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC, context, *, bias_fn=None, sow_probs=False):
        b, h, w, c = x_BxHxWxC.shape
        inner = self.heads * self.dim_head
        proj = (lambda n, f: nn.Dense(f, dtype=self.dtype, name=n)) if self.use_linear_projection else (
            lambda n, f: nn.Conv(f, (1, 1), dtype=self.dtype, name=n))
        y = nn.GroupNorm(num_groups=self.norm_groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x_BxHxWxC)
        if self.use_linear_projection:
            y_BxLxI = proj("proj_in", inner)(y.reshape(b, h * w, c))
        else:
            y_BxLxI = proj("proj_in", inner)(y).reshape(b, h * w, inner)
        y_BxLxI = BasicTransformerBlock(inner, self.heads, self.dim_head, upcast=self.upcast, dtype=self.dtype,
                                        name="transformer_blocks_0")(
            y_BxLxI, context, bias_fn=bias_fn, hw=(h, w), sow_probs=sow_probs)
        if self.use_linear_projection:
            y = proj("proj_out", c)(y_BxLxI).reshape(b, h, w, c)
        else:
            y = proj("proj_out", c)(y_BxLxI.reshape(b, h, w, inner))
        return y + x_BxHxWxC
