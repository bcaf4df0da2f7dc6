"""Cones 2 sampling-time guidance: residual injection (Eq. 6) and edited cross-attention (Eq. 7).

Everything here produces arrays that the jitted sampler takes as inputs, so a new prompt,
residual set or layout at the same shapes never recompiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cones_jax.errors import ArtifactError
from cones_jax.sampling import cfg_batch, cfg_halves

Array = jax.Array


def residual_rows(seq_len: int, dim: int, placements: Sequence[tuple[Sequence[Sequence[int]], np.ndarray]]
                  ) -> np.ndarray:
    """Cones 2, Eq. 6: the additive term `Δ` at the subject tokens of one prompt, [seq_len, dim].

    `placements` holds, per subject, the token positions of every occurrence of its word (each
    occurrence a list of sub-word positions) and its residual of shape [n, dim]. A residual with
    one row per sub-word (what `cones_jax.residual` trains) lands row by row; a single-row
    residual (the official release's format) lands on the first sub-word of each occurrence,
    which is where the official code adds it, so imported residuals behave as they did there.
    """
    out = np.zeros((seq_len, dim), np.float32)
    for occurrences, delta in placements:
        delta = np.asarray(delta, np.float32).reshape(-1, dim)
        for positions in occurrences:
            if delta.shape[0] == len(positions):
                out[list(positions)] += delta
            elif delta.shape[0] == 1:
                out[positions[0]] += delta[0]
            else:
                raise ArtifactError(f"a residual with {delta.shape[0]} rows cannot be placed on a word of "
                                 f"{len(positions)} tokens; it was trained for another word or tokenizer")
    return out


def eta(weight: Array, sigma: Array, std_scores: Array) -> Array:
    """Cones 2, η(t) = λ · log(1 + σ_t²) · std(S), the strength of the attention edit at step t."""
    return weight * jnp.log1p(sigma * sigma) * std_scores


def edited_attention_bias(scores_BxHxQxK: Array, maps_BxQxK: Array, weight_B: Array, sigma: Array) -> Array:
    """Cones 2, Eq. 7: the additive pre-softmax bias `η(t)·M` of one cross-attention call.

    The layer then takes `softmax((S + η(t)·M) · d^-½)`. `std(S)` is one scalar per example over
    all heads, queries and keys of this call (unbiased, as `torch.std`), computed in fp32.
    """
    s = scores_BxHxQxK.astype(jnp.float32)
    std_B = jnp.std(s.reshape(s.shape[0], -1), axis=-1, ddof=1)
    eta_B = eta(weight_B.astype(jnp.float32), sigma.astype(jnp.float32), std_B)
    return eta_B[:, None, None, None] * maps_BxQxK.astype(jnp.float32)[:, None, :, :]


@flax.struct.dataclass
class LayoutGuidance:
    """Traced inputs of layout guidance for a batch of B images.

    maps:    "{h}x{w}" -> [B, h*w, L] γ-valued maps per cross-attention resolution (0 in the
             columns of non-subject tokens); see `cones_jax.layout.attention_maps`.
    weight:  [B] λ (`guidance_weight`); 0 turns guidance off for that image.
    sigmas:  [n] σ_t used in η(t) at sampling step i (official: a separate schedule of
             `guidance_steps` steps; paper: the sampler's own σ).
    """

    maps: dict
    weight: Array
    sigmas: Array


def layout_bias(scores_2BxHxQxK: Array, hw: tuple[int, int], i: Array, g: LayoutGuidance) -> Array:
    """The sampler's bias function: Eq. 7 on the conditional rows of a CFG batch, 0 on the rest.

    The batch is `sampling.cfg_batch`'s: image k's unconditional row at 2k, conditional at 2k+1.
    """
    key = f"{hw[0]}x{hw[1]}"
    if key not in g.maps:
        raise KeyError(f"no layout map for the {key} cross-attention resolution (have {sorted(g.maps)})")
    _, cond_BxHxQxK = cfg_halves(scores_2BxHxQxK)
    bias_Bx1xQxK = edited_attention_bias(cond_BxHxQxK, g.maps[key], g.weight, g.sigmas[i])
    return cfg_batch(jnp.zeros_like(bias_Bx1xQxK), bias_Bx1xQxK)
