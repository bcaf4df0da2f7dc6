"""Whole-folder loading and few-step txt2img against diffusers' StableDiffusionPipeline."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tiny_checkpoints import make_sd  # noqa: E402

from cones_jax import sampling, schedulers  # noqa: E402
from cones_jax.fileio import CheckpointError  # noqa: E402
from cones_jax.pipeline import load_pipeline  # noqa: E402
from cones_jax.sampler import renoise_keys  # noqa: E402

PROMPTS = ["a photo of a dog", "a red cat sitting on the beach"]
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny_sd(request, tmp_path_factory):
    root = str(tmp_path_factory.mktemp(f"sd_{request.param}"))
    make_sd(root, request.param)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(root, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return root, pipe, load_pipeline(root)


def sample_inputs(sd, prompts, noise, cfg=7.5):
    ids = jnp.asarray(sd.tokenizer.encode(prompts))
    return sampling.SampleInputs(
        prompt_ids=ids, negative_ids=jnp.asarray(sd.tokenizer.encode([""] * len(prompts))),
        token_residuals=jnp.zeros(ids.shape + (sd.text_encoder.config.hidden_size,)),
        noise=jnp.asarray(noise), cfg_scale=jnp.float32(cfg), renoise_keys=renoise_keys(range(len(prompts))))


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_txt2img_matches_diffusers(tiny_sd, kind):
    root, pipe, sd = tiny_sd
    steps = 4
    noise = np.random.RandomState(0).randn(2, 16, 16, 4).astype(np.float32)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[kind]).from_config(pipe.scheduler.config)
    with torch.no_grad():
        want = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=7.5, height=32, width=32, output_type="np",
                    latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())).images
    sample = sampling.make_sampler(sd, sampling.SamplerSpec(scheduler=kind, steps=steps))
    got = np.asarray(sample(sd.params, schedulers.make_schedule(kind, sd.scheduler, steps),
                            sample_inputs(sd, PROMPTS, noise)))
    # fp32 images in [0, 1]; observed max error ~1e-5 after 4 CFG steps and the VAE decode
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


def test_text_embeddings_match_pipeline_encode(tiny_sd):
    _, pipe, sd = tiny_sd
    with torch.no_grad():
        want, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    got = sampling.encode_text(sd.text_encoder, sd.params["text_encoder"], jnp.asarray(sd.tokenizer.encode(PROMPTS)))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5, rtol=1e-5)


def test_debug_path_equals_jitted(tiny_sd):
    _, _, sd = tiny_sd
    noise = np.random.RandomState(1).randn(1, 16, 16, 4).astype(np.float32)
    spec = sampling.SamplerSpec(scheduler="euler", steps=2)
    sched = schedulers.make_schedule("euler", sd.scheduler, 2)
    inputs = sample_inputs(sd, PROMPTS[:1], noise)
    a = sampling.make_sampler(sd, spec)(sd.params, sched, inputs)
    b = sampling.make_sampler(sd, spec, debug=True)(sd.params, sched, inputs)
    # XLA fuses differently under jit: ~3e-5 differences in [0, 1] images
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad_base"))
    make_sd(root, "sd1")
    return root


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a diffusers checkpoint folder") as e:
        load_pipeline(str(tmp_path))
    _one_line(e)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pipeline(str(tmp_path / "nope"))


def test_missing_component(sd1_folder, tmp_path):
    root = _copy(sd1_folder, tmp_path / "m")
    shutil.rmtree(os.path.join(root, "vae"))
    with pytest.raises(CheckpointError, match="no vae/ component") as e:
        load_pipeline(root)
    _one_line(e)


def test_truncated_safetensors(sd1_folder, tmp_path):
    root = _copy(sd1_folder, tmp_path / "t")
    path = os.path.join(root, "unet", "diffusion_pytorch_model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_pipeline(root)
    assert "diffusion_pytorch_model.safetensors" in _one_line(e)


def test_unsupported_unet_config(sd1_folder, tmp_path):
    root = _copy(sd1_folder, tmp_path / "u")
    path = os.path.join(root, "unet", "config.json")
    cfg = json.load(open(path))
    cfg["addition_embed_type"] = "text_time"  # SDXL
    json.dump(cfg, open(path, "w"))
    with pytest.raises(CheckpointError, match="addition_embed_type") as e:
        load_pipeline(root)
    _one_line(e)


def test_pickle_weights_are_refused(sd1_folder, tmp_path):
    root = _copy(sd1_folder, tmp_path / "p")
    os.remove(os.path.join(root, "vae", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(root, "vae", "diffusion_pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle.*safetensors") as e:
        load_pipeline(root)
    _one_line(e)


def _fingerprint_as_shipped(tree):
    """`pipeline.fingerprint_params` as the shipped artifacts were made with it: their fingerprints
    must not change."""
    import hashlib

    from cones_jax.convert import flatten

    h = hashlib.sha256()
    for path, leaf in sorted(flatten(tree).items()):
        h.update("/".join(path).encode() + str(tuple(leaf.shape)).encode())
        if leaf.size <= 1 << 20:
            h.update(np.asarray(leaf, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def test_fingerprints_are_of_the_weights_as_stored(sd1_folder):
    """Computed while converting, before the cast: an fp32 model loaded in fp32 keeps the fingerprints
    that artifacts carry, and loaded in bf16 has the same ones."""
    from cones_jax.pipeline import fingerprint_params

    sd32 = load_pipeline(sd1_folder, components=("unet", "text_encoder"))
    for name in ("unet", "text_encoder"):
        want = _fingerprint_as_shipped(sd32.params[name])
        assert getattr(sd32, f"{name}_fingerprint") == fingerprint_params(sd32.params[name]) == want
    bf = load_pipeline(sd1_folder, dtype="bf16", components=("unet", "text_encoder"))
    assert jax.tree.leaves(bf.params["unet"])[0].dtype == jnp.bfloat16
    assert (bf.unet_fingerprint, bf.text_encoder_fingerprint) == (sd32.unet_fingerprint, sd32.text_encoder_fingerprint)
    assert _fingerprint_as_shipped(bf.params["unet"]) != sd32.unet_fingerprint  # what the cast params give


def test_fp16_variant_and_dtype_cast(sd1_folder, tmp_path):
    root = _copy(sd1_folder, tmp_path / "v")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(root, safety_checker=None, torch_dtype=torch.float16)
    pipe.save_pretrained(os.path.join(root, "fp16"), variant="fp16", safe_serialization=True)
    fp16_root = os.path.join(root, "fp16")
    assert os.path.isfile(os.path.join(fp16_root, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    sd16 = load_pipeline(fp16_root, variant="fp16", dtype="fp32")
    sd32 = load_pipeline(root, dtype="fp32")
    a = jax.tree_util.tree_leaves(sd16.params["unet"])
    b = jax.tree_util.tree_leaves(sd32.params["unet"])
    assert all(x.dtype == jnp.float32 for x in a)
    assert max(float(jnp.abs(x - y).max()) for x, y in zip(a, b)) < 2e-3  # fp16 rounding only
    bf = load_pipeline(root, dtype="bf16", components=("unet",))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(bf.params["unet"]))
