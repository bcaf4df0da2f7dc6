"""Attention with an additive pre-softmax bias hook, and the SD spatial transformer built on it.

The hook is generic: a cross-attention layer that is given `bias_fn` computes its raw scores
`S = Q·Kᵀ` (unscaled, fp32), asks `bias_fn(S_BxHxQxK, hw)` for an additive bias (anything
broadcastable to S, computed from S itself if it likes), and takes
`softmax((S + bias) · d_head^-½)`. That path needs the scores, so it stays explicit (K = 77 text
tokens keeps it small). Layers given no hook take a memory-efficient kernel chosen per backend by
`choose_implementation`: cuDNN flash attention on NVIDIA GPUs, Pallas splash attention on TPU,
the query-blocked loop on CPU, and XLA's plain path where no kernel takes the shapes.

Submodule names follow the PyTorch module paths so that `cones_jax.convert` maps weights by rule.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.typing import DTypeLike

# (raw scores S [B, H, Q, K] in fp32, (height, width) of the query grid) -> additive bias
BiasFn = Callable[[jax.Array, tuple[int, int]], jax.Array]

# Query rows per step of the CPU attention loop: a [block, K] fp32 score tile (16 MiB at K=4096).
CPU_QUERY_BLOCK = 1024


def _divisor_at_most(n: int, cap: int) -> int:
    return next(c for c in range(min(n, cap), 0, -1) if n % c == 0)


def _local_batch(b: int) -> int:
    """Rows of a batch of `b` that one device holds under the current mesh's "data" axis."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = mesh.shape["data"] if not mesh.empty and "data" in mesh.axis_names else 1
    return max(1, b // shards) if b % shards == 0 else b


def blocked_attention(q_BxQxHxD: jax.Array, k_BxKxHxD: jax.Array, v_BxKxHxD: jax.Array, scale: float,
                      q_block: int = CPU_QUERY_BLOCK) -> jax.Array:
    """softmax(q·kᵀ·scale)·v, one `lax.map` step per (head, query block), the batch kept whole.

    For XLA:CPU. `jax.nn.dot_product_attention` lowers to batched einsums around a [B, H, Q, K]
    score tensor: at 64x64 latents that is 671 MB per layer, freshly allocated (page-faulted) on
    every call, and the batched dots and the softmax over it run ~5x slower than PyTorch's CPU
    flash kernel. Looping over [B, block, K] tiles keeps them in cache and reuses one buffer
    across steps. The loop never indexes the batch axis, so a batch sharded over devices stays
    where it is (indexing a sharded axis would gather it). The block shrinks with the rows a
    device holds, keeping a tile near `q_block` rows. Scores and softmax statistics are fp32;
    the normalisation is applied after the P·V product ([block, D] instead of [block, K] divides).
    """
    b, q_len, h, d = q_BxQxHxD.shape
    _k_len, dv = k_BxKxHxD.shape[1], v_BxKxHxD.shape[-1]
    blk = _divisor_at_most(q_len, max(1, q_block // _local_batch(b)))
    n = q_len // blk
    dt = q_BxQxHxD.dtype
    q_GxBxCxD = (q_BxQxHxD * jnp.asarray(scale, dt)).reshape(b, n, blk, h, d).transpose(3, 1, 0, 2, 4).reshape(
        h * n, b, blk, d)
    kT_HxBxDxK = k_BxKxHxD.transpose(2, 0, 3, 1)
    v_HxBxKxD = v_BxKxHxD.transpose(2, 0, 1, 3)

    def step(args: tuple[jax.Array, jax.Array]):
        i, q_BxCxD = args
        s_BxCxK = jnp.matmul(q_BxCxD, kT_HxBxDxK[i // n], preferred_element_type=jnp.float32)
        e_BxCxK = jnp.exp(s_BxCxK - s_BxCxK.max(axis=-1, keepdims=True))
        o_BxCxD = jnp.matmul(e_BxCxK.astype(v_HxBxKxD.dtype), v_HxBxKxD[i // n], preferred_element_type=jnp.float32)
        return (o_BxCxD / e_BxCxK.sum(axis=-1, keepdims=True)).astype(dt)

    o_GxBxCxD = jax.lax.map(step, (jnp.arange(h * n), q_GxBxCxD))
    return o_GxBxCxD.reshape(h, n, b, blk, dv).transpose(2, 1, 3, 0, 4).reshape(b, q_len, h, dv)


IMPLEMENTATIONS = ("blocked", "xla", "cudnn", "splash")

# Set by `use_implementation` (tests, benchmarks); read when a function is traced.
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("cones_jax_attention", default=None)

# Splash attention tiles both sequence axes; TPU blocks are multiples of 128 rows.
SPLASH_BLOCK = 512
SPLASH_MIN_BLOCK = 128


@contextlib.contextmanager
def use_implementation(name: str | None) -> Iterator[None]:
    """Forces the unbiased attention kernel of everything traced inside (None: choose per backend).

    A function jitted earlier keeps the kernel it was traced with: jit's cache does not see this
    setting, so trace (or build) the function inside the block.
    """
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_implementation() -> str | None:
    return _forced.get()


def choose_implementation(backend: str, dtype: DTypeLike, q_len: int, k_len: int, head_dim: int, *,
                          gpu_capability: tuple[int, int] | None = None) -> str:
    """The unbiased attention kernel for one call: a pure function of the backend and the shapes.

    - cpu: "blocked" (XLA:CPU's fused path builds the whole [B, H, Q, K] score tensor and ran ~5x
      slower than PyTorch's CPU kernel; see `blocked_attention`).
    - gpu: "cudnn" flash attention where cuDNN takes it: fp16/bf16 inputs and a head dim that is a
      multiple of 8, at most 128 (256 from Hopper, compute capability 9.0, on). Otherwise "xla"
      (fp32 attention, the VAE's 512-wide single head).
    - tpu: "splash" (Pallas) where both sequence lengths tile into 128-row blocks; "xla" for the
      rest (the 77-token text keys of unbiased cross-attention, the 8x8 level's 64 queries).
    """
    if backend == "cpu":
        return "blocked"
    if backend in ("gpu", "cuda", "rocm"):
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
        cap = gpu_capability if gpu_capability is not None else (0, 0)
        max_dim = 256 if cap >= (9, 0) else 128
        if backend != "rocm" and half and head_dim % 8 == 0 and head_dim <= max_dim:
            return "cudnn"
        return "xla"
    if backend == "tpu":
        if q_len % SPLASH_MIN_BLOCK == 0 and k_len % SPLASH_MIN_BLOCK == 0:
            return "splash"
        return "xla"
    return "xla"


def _gpu_capability() -> tuple[int, int] | None:
    cap = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return tuple(int(x) for x in str(cap).split(".")[:2]) if cap else None
    except ValueError:
        return None


def _splash_block(n: int) -> int:
    return next(b for b in (SPLASH_BLOCK, 256, SPLASH_MIN_BLOCK) if n % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, k_len: int, interpret: bool):
    """Pallas splash attention over [H, L, D] (one example), full (unmasked) attention."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    bq, bk = _splash_block(q_len), _splash_block(k_len)
    blocks = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                           block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    mask = sm.MultiHeadMask([sm.FullMask((q_len, k_len))] * heads)
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks, interpret=interpret)


def splash_attention(q_BxQxHxD: jax.Array, k_BxKxHxD: jax.Array, v_BxKxHxD: jax.Array, scale: float, *,
                     interpret: bool = False) -> jax.Array:
    """softmax(q·kᵀ·scale)·v with Pallas splash attention (TPU; `interpret` runs it on any backend).

    A Pallas call is opaque to XLA's SPMD partitioner, which would gather a sharded batch onto
    every device; under a mesh with a "data" axis the kernel runs per shard (`shard_map`), so
    sharded sampling stays free of collectives.
    """
    b, q_len, h, _ = q_BxQxHxD.shape
    kernel = jax.vmap(_splash_kernel(h, q_len, k_BxKxHxD.shape[1], interpret))
    dt = q_BxQxHxD.dtype

    def run(q: jax.Array, k: jax.Array, v: jax.Array):
        # splash takes no softmax scale: it is folded into q
        out_BxHxQxD = kernel((q * jnp.asarray(scale, dt)).transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                             v.transpose(0, 2, 1, 3))
        return out_BxHxQxD.transpose(0, 2, 1, 3).astype(dt)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and "data" in mesh.axis_names and mesh.shape["data"] > 1:
        spec = P("data")
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return run(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD)


def dot_product_attention(q_BxQxHxD: jax.Array, k_BxKxHxD: jax.Array, v_BxKxHxD: jax.Array, scale: float,
                          implementation: str | None = None) -> jax.Array:
    """Unbiased softmax(q·kᵀ·scale)·v through the kernel `choose_implementation` picks for this
    backend and these shapes (or `implementation`, or what `use_implementation` forces)."""
    backend = jax.default_backend()
    impl = implementation or forced_implementation() or choose_implementation(
        backend, q_BxQxHxD.dtype, q_BxQxHxD.shape[1], k_BxKxHxD.shape[1], q_BxQxHxD.shape[-1],
        gpu_capability=_gpu_capability() if backend == "gpu" else None)
    if impl == "blocked":
        return blocked_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, scale)
    if impl == "splash":
        return splash_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, scale, interpret=backend != "tpu")
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, scale=scale, implementation="cudnn")
    return jax.nn.dot_product_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, scale=scale, implementation="xla")


class Attention(nn.Module):
    """Multi-head attention as in diffusers' `Attention` (to_q/to_k/to_v, to_out.0)."""

    heads: int
    dim_head: int
    out_dim: int
    qkv_bias: bool = False
    upcast: bool = False  # softmax inputs in fp32 even when computing in half precision
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxQxC: jax.Array, context_BxKxE: jax.Array | None = None, *, bias_fn: BiasFn | None = None,
                 hw: tuple[int, int] = (0, 0), sow_probs: bool = False) -> jax.Array:
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
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(nn.Dense(self.dim_out * 2, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dim: int
    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
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
    def __call__(self, x: jax.Array, context: jax.Array, *, bias_fn: BiasFn | None = None,
                 hw: tuple[int, int] = (0, 0), sow_probs: bool = False) -> jax.Array:
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
    def __call__(self, x_BxHxWxC: jax.Array, context: jax.Array, *, bias_fn: BiasFn | None = None,
                 sow_probs: bool = False) -> jax.Array:
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
