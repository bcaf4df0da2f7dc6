"""UNet and VAE against diffusers PyTorch on the same tiny random weights, and the bias hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tiny_checkpoints import make_unet, make_vae  # noqa: E402

from cones_jax.fileio import CheckpointError  # noqa: E402
from cones_jax.models.unet import UNetConfig  # noqa: E402
from cones_jax.pipeline import load_unet, load_vae  # noqa: E402

# fp32 on CPU: the observed max error is ~5e-6 for outputs of magnitude ~2; a wrong transpose,
# head split or missing scale gives errors of order 1.
ATOL, RTOL = 1e-4, 1e-4


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def unet(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param) / "unet")
    ref = make_unet(folder, request.param, cross_attention_dim=48)
    module, params = load_unet(folder)
    return ref, module, params


def _inputs(seed=0, b=2, hw=16, ctx=48):
    rs = np.random.RandomState(seed)
    return (rs.randn(b, hw, hw, 4).astype(np.float32), np.array([10.0, 500.5], np.float32)[:b],
            rs.randn(b, 7, ctx).astype(np.float32))


def test_unet_matches_diffusers(unet):
    ref, module, params = unet
    x, t, c = _inputs()
    with torch.no_grad():
        want = nhwc(ref(nchw(x), torch.from_numpy(t), torch.from_numpy(c)).sample)
    got = np.asarray(jax.jit(module.apply)({"params": params}, x, t, c))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
    # a latent size that is not square still works (any multiple of the downsampling factor)
    x2 = np.random.RandomState(1).randn(1, 8, 24, 4).astype(np.float32)
    with torch.no_grad():
        want2 = nhwc(ref(nchw(x2), torch.tensor([3.0]), torch.from_numpy(c[:1])).sample)
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, x2, np.float32(3.0), c[:1])), want2,
                               atol=ATOL, rtol=RTOL)


def test_zero_bias_is_the_unbiased_output(unet):
    _, module, params = unet
    x, t, c = _inputs()
    plain = jax.jit(module.apply)({"params": params}, x, t, c)
    calls = []

    def zero_bias(s, hw):
        calls.append((s.shape, hw))
        assert s.dtype == jnp.float32
        return jnp.zeros_like(s)

    biased = jax.jit(lambda p: module.apply(p, x, t, c, cross_attn_bias=zero_bias))({"params": params})
    # the hook path (einsum + softmax) and the fused path round differently: ~1e-6 of outputs of size ~2
    np.testing.assert_allclose(np.asarray(biased), np.asarray(plain), atol=5e-6, rtol=1e-6)
    # every cross-attention layer called the hook, with the spatial size of its query grid
    n_cross = sum(1 for path in jax.tree_util.tree_flatten_with_path(params)[0]
                  if "attn2" in jax.tree_util.keystr(path[0]) and "to_q" in jax.tree_util.keystr(path[0]))
    assert len(calls) == n_cross and all(s[2] == hw[0] * hw[1] and s[3] == 7 for s, hw in calls)


def test_bias_is_differentiable_and_changes_output():
    from cones_jax.models.attention import Attention
    rs = np.random.RandomState(0)
    attn = Attention(2, 8, 16)
    x, c = rs.randn(1, 16, 16).astype(np.float32), rs.randn(1, 7, 12).astype(np.float32)
    params = attn.init(jax.random.PRNGKey(0), x, c)["params"]

    def out(scale):
        return attn.apply({"params": params}, x, c, hw=(4, 4),
                          bias_fn=lambda s, hw: scale * jnp.ones_like(s).at[..., 0].set(-1.0)).sum()

    g = jax.jit(jax.grad(out))(1.0)
    assert np.isfinite(g) and abs(float(g)) > 0
    assert float(jnp.abs(out(0.0) - out(3.0))) > 1e-3


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("vae") / "vae")
    ref = make_vae(folder)
    module, params = load_vae(folder)
    return ref, module, params


def test_vae_matches_diffusers(vae):
    ref, module, params = vae
    x = np.random.RandomState(0).randn(2, 32, 24, 3).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(nchw(x)).latent_dist
        decoded = ref.decode(dist.mean).sample
    mean, std = module.apply({"params": params}, x, method=module.encode)
    np.testing.assert_allclose(np.asarray(mean), nhwc(dist.mean), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(std), nhwc(dist.std), atol=ATOL, rtol=RTOL)
    got = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))(params, nhwc(dist.mean))
    np.testing.assert_allclose(np.asarray(got), nhwc(decoded), atol=ATOL, rtol=RTOL)
    assert module.config.scaling_factor == ref.config.scaling_factor


@pytest.mark.parametrize("key,value,message", [
    ("class_embed_type", "timestep", "class_embed_type"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"], "SimpleCrossAttnDownBlock2D"),
    ("addition_embed_type", "text_time", "addition_embed_type"),
    ("cross_attention_dim", [32, 32], "cross_attention_dim"),
])
def test_unsupported_unet_config_is_one_line_error(key, value, message):
    from tiny_checkpoints import unet_config
    cfg = dict(unet_config("sd1"), **{key: value})
    with pytest.raises(CheckpointError, match=message) as e:
        UNetConfig.from_dict(cfg)
    assert "\n" not in str(e.value)


def test_unet_remat_same_params_outputs_and_grads():
    from tiny_checkpoints import unet_config

    from cones_jax.models.unet import UNet2DConditionModel, UNetConfig

    cfg = UNetConfig.from_dict(unet_config("sd2", 32))
    plain, remat = UNet2DConditionModel(cfg), UNet2DConditionModel(cfg, remat=True)
    assert jax.tree.map(lambda s: s.shape, plain.param_shapes()) == jax.tree.map(lambda s: s.shape,
                                                                                 remat.param_shapes())
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    c = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 32))
    # jitted: op-by-op dispatch of a UNet's forward and backward takes minutes on a small CPU
    params = jax.jit(plain.init)(jax.random.PRNGKey(2), x, jnp.ones((2,)), c)["params"]

    def loss(module, params, c):
        return jnp.mean(jnp.square(module.apply({"params": params}, x, jnp.array([10.0, 500.0]), c)))

    (v_plain, g_plain), (v_remat, g_remat) = (
        jax.jit(jax.value_and_grad(lambda p, c, m=m: loss(m, p, c), argnums=1))(params, c) for m in (plain, remat))
    np.testing.assert_allclose(v_remat, v_plain, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_remat), np.asarray(g_plain), atol=1e-6)
