"""CLIP text tower (the Stable Diffusion text encoder) in Flax, loadable from a transformers export.

SD 1.x uses OpenAI's CLIP ViT-L/14 text tower (quick-GELU); SD 2.x uses OpenCLIP ViT-H's (GELU, 23
layers in diffusers' export). Both are the same pre-LayerNorm causal transformer:

    x = token_embedding(ids) + position_embedding(arange(L))
    for each layer: x += attn(ln1(x)) ; x += mlp(ln2(x))
    last_hidden_state = final_layer_norm(x)

Submodules are named after the PyTorch module paths (`encoder/layers_3/self_attn/q_proj`) so that
`cones_jax.convert` maps a checkpoint onto them by rule. The residual stream and every LayerNorm are
kept in float32 whatever the computation dtype; matmuls run in `dtype`, attention softmax in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cones_jax.fileio import CheckpointError

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# Defaults of transformers' CLIPTextConfig, used only for keys a config.json leaves out.
_DEFAULTS = dict(max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """Reads a transformers `text_encoder/config.json` dict; unrelated keys are ignored."""
        model_type = d.get("model_type")
        if model_type is not None and model_type != "clip_text_model":
            raise CheckpointError(f"text_encoder config: model_type {model_type!r} is not supported "
                                  "(expected 'clip_text_model', a CLIP text tower)")
        values = {}
        for key in _REQUIRED:
            if key not in d:
                raise CheckpointError(f"text_encoder config: missing key {key!r}")
        for f in dataclasses.fields(cls):
            value = d.get(f.name)
            if value is None:
                value = _DEFAULTS.get(f.name)
            if f.name == "hidden_act":
                if value not in _ACTIVATIONS:
                    raise CheckpointError(f"text_encoder config: hidden_act {value!r} is not supported "
                                          f"(supported: {', '.join(_ACTIVATIONS)})")
            elif f.name == "layer_norm_eps":
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                    raise CheckpointError(f"text_encoder config: layer_norm_eps {value!r} is not a positive number")
                value = float(value)
            else:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise CheckpointError(f"text_encoder config: {f.name} {value!r} is not a non-negative integer")
            values[f.name] = value
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings"):
            if values[key] < 1:
                raise CheckpointError(f"text_encoder config: {key} must be at least 1, got {values[key]}")
        if values["hidden_size"] % values["num_attention_heads"]:
            raise CheckpointError(f"text_encoder config: hidden_size {values['hidden_size']} is not divisible by "
                                  f"num_attention_heads {values['num_attention_heads']}")
        return cls(**values)


class CLIPEmbeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, ids_BxL: jax.Array) -> jax.Array:
        cfg = self.config
        L = ids_BxL.shape[1]
        tok_BxLxD = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.float32, name="token_embedding")(ids_BxL)
        pos_table = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=jnp.float32,
                             name="position_embedding")
        pos_LxD = pos_table(jnp.arange(L, dtype=jnp.int32))
        return tok_BxLxD + pos_LxD[None]


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.config
        B, L, D = x_BxLxD.shape
        H, Dh = cfg.num_attention_heads, cfg.head_dim
        dense = lambda name: nn.Dense(D, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        x_BxLxD = x_BxLxD.astype(self.dtype)
        q_BxLxHxDh = dense("q_proj")(x_BxLxD).reshape(B, L, H, Dh)
        k_BxLxHxDh = dense("k_proj")(x_BxLxD).reshape(B, L, H, Dh)
        v_BxLxHxDh = dense("v_proj")(x_BxLxD).reshape(B, L, H, Dh)
        s_BxHxLxL = jnp.einsum("bqhd,bkhd->bhqk", q_BxLxHxDh, k_BxLxHxDh,
                               preferred_element_type=jnp.float32) * (1.0 / math.sqrt(Dh))
        causal_LxL = jnp.tril(jnp.ones((L, L), dtype=bool))
        s_BxHxLxL = jnp.where(causal_LxL[None, None], s_BxHxLxL, jnp.finfo(jnp.float32).min)
        p_BxHxLxL = jax.nn.softmax(s_BxHxLxL, axis=-1).astype(self.dtype)
        o_BxLxHxDh = jnp.einsum("bhqk,bkhd->bqhd", p_BxHxLxL, v_BxLxHxDh)
        return dense("out_proj")(o_BxLxHxDh.reshape(B, L, D))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.config
        h_BxLxF = nn.Dense(cfg.intermediate_size, dtype=self.dtype, param_dtype=jnp.float32,
                           name="fc1")(x_BxLxD.astype(self.dtype))
        h_BxLxF = _ACTIVATIONS[cfg.hidden_act](h_BxLxF)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, name="fc2")(h_BxLxF)


def _layer_norm(cfg: CLIPTextConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.config
        h_BxLxD = _layer_norm(cfg, "layer_norm1")(x_BxLxD.astype(jnp.float32))
        x_BxLxD = x_BxLxD + CLIPAttention(cfg, self.dtype, name="self_attn")(h_BxLxD).astype(jnp.float32)
        h_BxLxD = _layer_norm(cfg, "layer_norm2")(x_BxLxD)
        return x_BxLxD + CLIPMLP(cfg, self.dtype, name="mlp")(h_BxLxD).astype(jnp.float32)


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        layer_cls = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        for i in range(self.config.num_hidden_layers):
            x_BxLxD = layer_cls(self.config, self.dtype, name=f"layers_{i}")(x_BxLxD)
        return x_BxLxD


class CLIPTextTransformer(nn.Module):
    """CLIP text tower. Params are float32; `dtype` is the matmul dtype (LayerNorms, softmax and the
    residual stream stay float32). Outputs are float32.

    `__call__(input_ids [B, L] int32)` returns {"last_hidden_state": [B, L, D] after the final
    LayerNorm, "pooled": [B, D] at the end-of-text token}. Attention is causal with no padding
    mask, as in the SD pipelines. `remat=True` rematerialises each layer in the backward pass.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids: jax.Array, *, deterministic: bool = True) -> dict[str, jax.Array]:
        del deterministic  # CLIP's text tower has no dropout at the SD settings
        cfg = self.config
        ids_BxL = jnp.asarray(input_ids).astype(jnp.int32)
        if ids_BxL.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {ids_BxL.shape}")
        B, L = ids_BxL.shape
        if L > cfg.max_position_embeddings:
            raise ValueError(f"input_ids has {L} tokens, more than max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        x_BxLxD = CLIPEmbeddings(cfg, name="embeddings")(ids_BxL)
        x_BxLxD = CLIPEncoder(cfg, self.dtype, self.remat, name="encoder")(x_BxLxD)
        last_BxLxD = _layer_norm(cfg, "final_layer_norm")(x_BxLxD)
        # transformers' rule: configs with the legacy eos_token_id 2 take the highest id in the row
        # (the end token is the last CLIP vocab entry); otherwise the first end-token position.
        if cfg.eos_token_id == 2:
            eos_B = jnp.argmax(ids_BxL, axis=-1)
        else:
            eos_B = jnp.argmax((ids_BxL == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled_BxD = last_BxLxD[jnp.arange(B), eos_B]
        return {"last_hidden_state": last_BxLxD, "pooled": pooled_BxD}


def text_encoder_rename(key: str) -> str | None:
    """Checkpoint key -> our canonical PyTorch-style key, or None for keys we drop."""
    if key.startswith("text_model."):
        key = key[len("text_model."):]
    if key.endswith("position_ids") or key.startswith("text_projection."):
        return None
    return key


def text_encoder_shapes(module: CLIPTextTransformer) -> dict:
    """The params tree as ShapeDtypeStructs (no weights are created)."""
    ids = jax.ShapeDtypeStruct((1, module.config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), ids)["params"]
