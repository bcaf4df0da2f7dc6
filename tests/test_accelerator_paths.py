"""The accelerator paths, checked on CPU: the per-backend choice of attention kernel, the Pallas
splash kernel (interpret mode) against diffusers, a sampling loop free of cross-device
collectives on 8 fake devices, one traced UNet per sampler, and the compiled-sampler cache."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_checkpoints import make_sd

from cones_jax import guidance, sampling
from cones_jax.config import load_config
from cones_jax.convert import convert_state_dict
from cones_jax.layout import parse_layout
from cones_jax.models import attention
from cones_jax.pipeline import load_pipeline
from cones_jax.sampler import LayoutSampler, shard_batch

LAYOUT = {"prompt": "a dog and a cat on the beach", "size": [32, 32],
          "subjects": [{"word": "dog", "box": [0.0, 0.0, 0.5, 1.0]}, {"word": "cat", "box": [0.5, 0.0, 1.0, 1.0]}]}
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


@pytest.mark.parametrize("backend, dtype, q, k, d, cap, want", [
    ("cpu", jnp.float32, 4096, 4096, 64, None, "blocked"),
    ("cpu", jnp.bfloat16, 4096, 77, 64, None, "blocked"),
    ("gpu", jnp.bfloat16, 4096, 4096, 64, (8, 0), "cudnn"),
    ("gpu", jnp.float16, 9216, 77, 64, (9, 0), "cudnn"),
    ("gpu", jnp.float32, 4096, 4096, 64, (9, 0), "xla"),  # cuDNN flash attention takes half precision only
    ("gpu", jnp.bfloat16, 256, 256, 160, (8, 0), "xla"),  # SD 1.5's 160-wide heads: Hopper only
    ("gpu", jnp.bfloat16, 256, 256, 160, (9, 0), "cudnn"),
    ("gpu", jnp.bfloat16, 4096, 4096, 512, (9, 0), "xla"),  # the VAE's single 512-wide head
    ("gpu", jnp.bfloat16, 4096, 4096, 36, (9, 0), "xla"),  # not a multiple of 8
    ("tpu", jnp.bfloat16, 4096, 4096, 64, None, "splash"),
    ("tpu", jnp.bfloat16, 4096, 77, 64, None, "xla"),  # text keys do not tile into 128-row blocks
    ("tpu", jnp.float32, 64, 64, 160, None, "xla"),  # the 8x8 level
])
def test_choose_implementation(backend, dtype, q, k, d, cap, want):
    assert attention.choose_implementation(backend, dtype, q, k, d, gpu_capability=cap) == want


def test_forced_implementation_is_scoped_and_checked():
    assert attention.forced_implementation() is None
    with attention.use_implementation("xla"):
        assert attention.forced_implementation() == "xla"
    assert attention.forced_implementation() is None
    with pytest.raises(ValueError, match="unknown attention implementation"):
        with attention.use_implementation("flash3"):
            pass


def _qkv(b, q, k, h, d, seed=0):
    rs = np.random.RandomState(seed)
    return tuple(jnp.asarray(rs.randn(b, n, h, d), jnp.float32) for n in (q, k, k))


@pytest.mark.parametrize("impl", ["blocked", "xla", "splash"])
def test_kernels_match_diffusers_attention(impl):
    """Each unbiased kernel inside our Attention layer against diffusers' Attention (SDPA), fp32."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention as TorchAttention

    b, q_len, c, heads, dim_head = 2, 256, 64, 2, 32
    torch.manual_seed(0)
    ref = TorchAttention(query_dim=c, heads=heads, dim_head=dim_head).eval()
    x = np.random.RandomState(1).randn(b, q_len, c).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    layer = attention.Attention(heads, dim_head, c)
    shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)["params"]
    params = convert_state_dict({k: v.numpy() for k, v in ref.state_dict().items()}, shapes)
    with attention.use_implementation(impl):
        got = np.asarray(jax.jit(layer.apply)({"params": params}, x))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_splash_runs_per_shard_without_collectives():
    """A Pallas call is opaque to the SPMD partitioner; under a data mesh it must run per shard."""
    q, k, v = _qkv(8, 128, 128, 2, 32, seed=3)
    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    data = NamedSharding(mesh, P("data"))
    fn = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, 32 ** -0.5, implementation="splash"))
    with jax.set_mesh(mesh):
        compiled = fn.lower(*(jax.device_put(a, data) for a in (q, k, v))).compile()
    assert not _collectives(compiled.as_text())
    got = compiled(*(jax.device_put(a, data) for a in (q, k, v)))
    want = attention.blocked_attention(q, k, v, 32 ** -0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sd"))
    make_sd(root, "sd1")
    return load_pipeline(root)


def _inputs(sd, tmp_path, preset, seeds, **overrides):
    cfg = load_config(preset, overrides)
    core = LayoutSampler(sd, cfg)
    prep = core.prepare(parse_layout(LAYOUT, str(tmp_path)))
    return cfg, core.schedule, core.inputs([prep] * len(seeds), seeds)


def _collectives(hlo: str) -> dict:
    found = {op: len(re.findall(rf"\b{op}(-start)?\(", hlo)) for op in COLLECTIVES}
    return {op: n for op, n in found.items() if n}


@pytest.mark.parametrize("impl", ["blocked", "xla"])
def test_sharded_sampling_has_no_collectives(tiny, tmp_path, impl):
    """8 images on 8 devices, guided official preset (Euler + self-recurrence) and unguided: each
    image's CFG rows stay on its device, so the compiled sampler moves nothing between devices."""
    sd = tiny
    assert len(jax.local_devices()) == 8, "conftest sets 8 fake CPU devices"
    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    params = jax.device_put(sd.params, NamedSharding(mesh, P()))
    _, sched, inputs = _inputs(sd, tmp_path, "official", list(range(8)), steps=2, guidance_steps=2)
    inputs = shard_batch(inputs, mesh)
    plain = LayoutSampler(sd, load_config("official"), guided=False)
    unguided = shard_batch(plain.inputs([plain.prepare(parse_layout(LAYOUT, str(tmp_path)))] * 8, list(range(8))),
                           mesh)
    cases = {"guided": (sampling.SamplerSpec(scheduler="euler", steps=2, self_recurrence=True), guidance.layout_bias,
                        inputs),
             "unguided": (sampling.SamplerSpec(scheduler="euler", steps=2), None, unguided)}
    with attention.use_implementation(impl), jax.set_mesh(mesh):
        for name, (spec, bias_fn, args) in cases.items():
            compiled = sampling.make_sampler(sd, spec, bias_fn).lower(params, sched, args).compile()
            assert not _collectives(compiled.as_text()), (impl, name, _collectives(compiled.as_text()))
            assert len(compiled(params, sched, args).sharding.device_set) == 8


def test_guided_and_unguided_steps_share_one_unet(tiny, tmp_path):
    """A run guided for some steps traces the UNet once, as many convolutions as an unguided run."""
    sd = tiny
    cfg, sched, inputs = _inputs(sd, tmp_path, "official", [0], steps=3, guidance_steps=2)
    spec = sampling.SamplerSpec(scheduler="euler", steps=3, self_recurrence=True)
    convs = lambda fn, args: str(jax.make_jaxpr(fn)(sd.params, sched, args)).count("conv_general_dilated")
    guided = convs(sampling.make_sampler(sd, spec, guidance.layout_bias), inputs)
    plain = convs(sampling.make_sampler(sd, sampling.SamplerSpec(scheduler="euler", steps=3)),
                  inputs.replace(guidance=None, guided_steps=jnp.int32(0)))
    assert guided == plain > 0
    # and past the guided steps the bias is really off: guiding 2 of 3 steps differs from guiding 3
    fn = sampling.make_sampler(sd, spec, guidance.layout_bias)
    two = np.asarray(fn(sd.params, sched, inputs))
    three = np.asarray(fn(sd.params, sched, inputs.replace(guided_steps=jnp.int32(3))))
    assert np.abs(two - three).max() > 1e-4


def test_compiled_sampler_cache(tiny, tmp_path):
    """A new layout at the same shapes reuses the compiled sampler; a new batch size compiles."""
    sd = tiny
    spec = sampling.SamplerSpec(scheduler="ddim", steps=2)
    _, sched, a = _inputs(sd, tmp_path, "paper", [0, 1], steps=2)
    first = sampling.compile_sampler(sd, spec, guidance.layout_bias, sd.params, sched, a)
    b = a.replace(guidance=a.guidance.replace(weight=a.guidance.weight * 0.5), noise=a.noise[::-1])
    again = sampling.compile_sampler(sd, spec, guidance.layout_bias, sd.params, sched, b)
    assert not first.cached and again.cached and again.fn is first.fn
    _, _, c = _inputs(sd, tmp_path, "paper", [0, 1, 2], steps=2)
    other = sampling.compile_sampler(sd, spec, guidance.layout_bias, sd.params, sched, c)
    assert not other.cached and other.fn is not first.fn
    assert np.abs(np.asarray(first.fn(sd.params, sched, a)) - np.asarray(again.fn(sd.params, sched, b))).max() > 1e-4


def test_second_process_loads_the_sampler_from_the_disk_cache(tiny, tmp_path):
    """What a second run of a command sees: nothing compiled in this process, the sampler on disk."""
    sd = tiny
    spec = sampling.SamplerSpec(scheduler="euler", steps=1)
    _, sched, inputs = _inputs(sd, tmp_path, "paper", [0, 1, 2, 3, 4], steps=1)
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        sampling.compile_sampler(sd, spec, guidance.layout_bias, sd.params, sched, inputs)
        sd.compiled.clear()  # as in a new process
        again = sampling.compile_sampler(sd, spec, guidance.layout_bias, sd.params, sched, inputs)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
    assert again.from_disk and not again.cached
    assert "compilation cache" in again.describe()


def test_cli_runtime_defaults(monkeypatch):
    from cones_jax import cli

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    cli.default_xla_flags()
    assert cli.CPU_XLA_FLAGS in os.environ["XLA_FLAGS"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")  # a user's own flags win
    cli.default_xla_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")  # not on an accelerator
    cli.default_xla_flags()
    assert "XLA_FLAGS" not in os.environ
    cli.enable_compilation_cache()  # keeps the directory the tests set
    assert "jax_tests" in jax.config.jax_compilation_cache_dir or "CONES_JAX_TEST_CACHE" in os.environ
