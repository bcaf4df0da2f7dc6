"""Cones 2 Eq. 6 and Eq. 7 against direct NumPy evaluations of SPEC §3's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cones_jax import guidance
from cones_jax.models.attention import Attention


def np_std(x):
    return x.reshape(x.shape[0], -1).std(axis=-1, ddof=1)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_bias_equals_formula():
    rs = np.random.RandomState(0)
    s = rs.randn(3, 4, 16, 77).astype(np.float32) * 3
    m = rs.choice([2.5, -1e8, 0.0], size=(3, 16, 77)).astype(np.float32)
    w = np.array([0.08, 0.05, 0.0], np.float32)
    sigma = np.float32(3.7)
    got = np.asarray(guidance.edited_attention_bias(jnp.asarray(s), jnp.asarray(m), jnp.asarray(w), jnp.asarray(sigma)))
    want = (w * np.log(1 + sigma ** 2) * np_std(s))[:, None, None, None] * m[:, None]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    assert got.dtype == np.float32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_edited_cross_attention_equals_numpy(dtype):
    """softmax((S + λ·M·log(1+σ²)·std(S))·d^-½)·V on the conditional rows (odd rows of the interleaved
    CFG batch), plain attention on the unconditional ones."""
    rs = np.random.RandomState(1)
    b, q, k, c, e, heads, dh = 2, 16, 77, 32, 24, 4, 8
    attn = Attention(heads, dh, c, dtype=dtype)
    x = rs.randn(2 * b, q, c).astype(np.float32)
    ctx = rs.randn(2 * b, k, e).astype(np.float32)
    params = attn.init(jax.random.PRNGKey(0), x, ctx)["params"]
    maps = rs.choice([2.5, -1e8, 0.0], p=[0.2, 0.2, 0.6], size=(b, q, k)).astype(np.float32)
    g = guidance.LayoutGuidance(maps={"4x4": jnp.asarray(maps)}, weight=jnp.full((b,), 0.08),
                                sigmas=jnp.asarray([5.0, 1.0], jnp.float32))
    out = attn.apply({"params": params}, x, ctx, bias_fn=lambda s, hw: guidance.layout_bias(s, hw, 0, g), hw=(4, 4))

    p = jax.tree_util.tree_map(np.asarray, params)
    qh = (x @ p["to_q"]["kernel"]).reshape(2 * b, q, heads, dh).transpose(0, 2, 1, 3)
    kh = (ctx @ p["to_k"]["kernel"]).reshape(2 * b, k, heads, dh).transpose(0, 2, 1, 3)
    vh = (ctx @ p["to_v"]["kernel"]).reshape(2 * b, k, heads, dh).transpose(0, 2, 1, 3)
    s = qh @ kh.transpose(0, 1, 3, 2)
    bias = np.zeros_like(s)
    eta = 0.08 * np.log(1 + 25.0) * np_std(s[1::2])
    bias[1::2] = eta[:, None, None, None] * maps[:, None]
    probs = softmax((s + bias) * dh ** -0.5)
    heads_out = (probs @ vh).transpose(0, 2, 1, 3).reshape(2 * b, q, heads * dh)
    want = heads_out @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]
    tol = 1e-4 if dtype == jnp.float32 else 0.1
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=tol, rtol=tol)


def test_negative_region_gets_no_attention():
    rs = np.random.RandomState(2)
    b, q, k, c = 1, 16, 77, 32
    attn = Attention(4, 8, c)
    x = rs.randn(2 * b, q, c).astype(np.float32)
    ctx = rs.randn(2 * b, k, 24).astype(np.float32)
    params = attn.init(jax.random.PRNGKey(0), x, ctx)["params"]
    maps = np.zeros((b, q, k), np.float32)
    inside = np.arange(q) < 8
    maps[0, :, 5] = np.where(inside, 2.5, -1e8)  # token 5 belongs to the first 8 query positions
    g = guidance.LayoutGuidance(maps={"4x4": jnp.asarray(maps)}, weight=jnp.full((b,), 0.08),
                                sigmas=jnp.asarray([2.0], jnp.float32))
    _, state = attn.apply({"params": params}, x, ctx, bias_fn=lambda s, hw: guidance.layout_bias(s, hw, 0, g),
                          hw=(4, 4), sow_probs=True, mutable=["intermediates"])
    probs = np.asarray(state["intermediates"]["attn_probs"][0])  # [2B, Q, K], head-averaged; rows (uncond, cond)
    assert probs[1, ~inside, 5].max() < 1e-6  # conditional row: weakened to nothing outside the region
    assert probs[1, inside, 5].min() > probs[0, inside, 5].min()  # strengthened inside
    assert probs[0, ~inside, 5].min() > 1e-4  # the unconditional row is untouched


def test_residual_rows_positions():
    dim = 4
    delta2 = np.arange(8, dtype=np.float32).reshape(2, dim) + 1
    delta1 = np.full((1, dim), 7.0, np.float32)
    rows = guidance.residual_rows(10, dim, [([[2, 3], [6, 7]], delta2), ([[5]], delta1)])
    np.testing.assert_array_equal(rows[2], delta2[0])
    np.testing.assert_array_equal(rows[3], delta2[1])
    np.testing.assert_array_equal(rows[6], delta2[0])  # every occurrence of a repeated word
    np.testing.assert_array_equal(rows[7], delta2[1])
    np.testing.assert_array_equal(rows[5], delta1[0])
    assert not rows[[0, 1, 4, 8, 9]].any()
    # a single-row (official) residual on a two-token word lands on its first sub-word only
    rows = guidance.residual_rows(10, dim, [([[2, 3]], delta1)])
    assert rows[2].any() and not rows[3].any()
    with pytest.raises(ValueError, match="3 rows"):
        guidance.residual_rows(10, dim, [([[2, 3]], np.ones((3, dim)))])
