"""The `official` preset against an independent PyTorch re-implementation of the released
Cones 2 sampling algorithm (LMS order 1 in σ-space, self-recurrence, σ_t from a separate
guidance schedule, Eq. 7 on the conditional branch only, cond/uncond as separate batch-1 calls)."""

import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
F = torch.nn.functional

from tiny_checkpoints import make_sd  # noqa: E402

from cones_jax import artifacts, guidance, sampling  # noqa: E402
from cones_jax.config import load_config  # noqa: E402
from cones_jax.layout import parse_layout  # noqa: E402
from cones_jax.pipeline import load_pipeline  # noqa: E402
from cones_jax.sampler import LayoutSampler, initial_noise, renoise_keys  # noqa: E402

STEPS, GUIDED, LAMBDA, GAMMA_POS, GAMMA_NEG = 3, 2, 0.08, 2.5, -1e8
PROMPT = "a dog and a cat on the beach"


class Cones2Processor:
    """Official-style attention: bias = λ·M·log(1+σ²)·std(S) added to unscaled scores."""

    def __init__(self, state):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = (attn.head_to_batch_dim(f(x)) for f, x in ((attn.to_q, hidden_states), (attn.to_k, ctx),
                                                              (attn.to_v, ctx)))
        scores = q @ k.transpose(-1, -2)
        bias = 0.0
        if encoder_hidden_states is not None and self.state["maps"] is not None:
            w = self.state["maps"][scores.shape[1]]
            bias = LAMBDA * w * math.log(1 + self.state["sigma"] ** 2) * scores.std()
        probs = ((scores + bias) * attn.scale).softmax(dim=-1)
        out = attn.batch_to_head_dim(probs @ v)
        return attn.to_out[1](attn.to_out[0](out))


def torch_official(pipe, ids, residual_pos, delta, maps, noise_nchw, renoise):
    unet, vae, te = pipe.unet, pipe.vae, pipe.text_encoder
    state = {"maps": None, "sigma": 0.0}
    unet.set_attn_processor(Cones2Processor(state))
    with torch.no_grad():
        cond = te(torch.tensor(ids[None]))[0]
        for p in residual_pos:
            cond[0, p] += torch.from_numpy(delta[0])
        uncond = te(torch.tensor(pipe.tokenizer([""], padding="max_length", max_length=77).input_ids))[0]
        sched = diffusers.LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               timestep_spacing="linspace")
        sched.set_timesteps(STEPS)
        gsched = diffusers.LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        gsched.set_timesteps(GUIDED)
        sig = sched.sigmas.double()
        x = noise_nchw * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            for k in range(2 if i < GUIDED else 1):
                inp = (x / ((sig[i] ** 2 + 1) ** 0.5)).float()
                state["maps"], state["sigma"] = (maps, float(gsched.sigmas[i])) if i < GUIDED else (None, 0.0)
                eps_c = unet(inp, t, encoder_hidden_states=cond).sample
                state["maps"] = None
                eps_u = unet(inp, t, encoder_hidden_states=uncond).sample
                eps = (eps_u + 7.5 * (eps_c - eps_u)).double()
                x0 = x - sig[i] * eps
                x = x + (x - x0) / sig[i] * (sig[i + 1] - sig[i])  # LMS of order 1 == Euler
                if i < GUIDED and k == 0:
                    x = x + ((sig[i] ** 2 - sig[i + 1] ** 2) ** 0.5) * renoise[i]
        img = vae.decode(x.float() / vae.config.scaling_factor).sample
        return ((img / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()


def test_official_preset_matches_reference(tmp_path):
    root = str(tmp_path / "sd")
    make_sd(root, "sd1")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(root, safety_checker=None).to(torch.float32)
    sd = load_pipeline(root)
    delta = np.random.RandomState(3).randn(1, 32).astype(np.float32) * 0.5
    res_path = str(tmp_path / "dog.safetensors")
    artifacts.save_residual(res_path, artifacts.Residual(delta, "dog", ()))
    layout = {"prompt": PROMPT, "size": [32, 32],
              "subjects": [{"word": "dog", "box": [0.0, 0.0, 0.5, 1.0], "residual": res_path},
                           {"word": "cat", "box": [0.5, 0.0, 1.0, 1.0]}]}

    # ---- independent construction of the token positions and per-resolution maps
    ids = np.array(pipe.tokenizer(PROMPT, padding="max_length", max_length=77).input_ids)
    pos = {w: [i for i in range(77) if ids[i] == pipe.tokenizer(w).input_ids[1]] for w in ("dog", "cat")}
    full = {}
    for w, cols in (("dog", slice(0, 16)), ("cat", slice(16, 32))):
        m = torch.full((32, 32), GAMMA_NEG)
        m[:, cols] = GAMMA_POS
        full[w] = m
    maps = {}
    for h in (16, 8):
        t = torch.zeros(h * h, 77)
        for w in ("dog", "cat"):
            small = F.interpolate(full[w][None, None], size=(h, h), mode="bilinear", align_corners=True)[0, 0]
            for p in pos[w]:
                t[:, p] += small.reshape(-1)
        maps[h * h] = t

    # ---- ours
    cfg = load_config("official", {"steps": STEPS, "guidance_steps": GUIDED, "guidance_weight": LAMBDA})
    core = LayoutSampler(sd, cfg)
    sched = core.schedule
    inputs = core.inputs([core.prepare(parse_layout(layout, str(tmp_path)))], [0])
    noise = initial_noise(0, (16, 16, 4))[None]
    np.testing.assert_array_equal(np.asarray(inputs.noise), noise)
    sampler = sampling.make_sampler(sd, sampling.SamplerSpec(scheduler="euler", steps=STEPS, self_recurrence=True),
                                    guidance.layout_bias)
    ours = np.asarray(sampler(sd.params, sched, inputs))

    key = renoise_keys([0])[0]
    def renoise_at(i):
        z = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), 0), noise.shape[1:]))
        return torch.from_numpy(z[None].transpose(0, 3, 1, 2).copy()).double()

    renoise = [renoise_at(i) for i in range(GUIDED)]
    want = torch_official(pipe, ids, pos["dog"], delta, maps,
                          torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()).double(), renoise)
    # the reference runs its σ arithmetic in float64 like diffusers' LMS tables; fp32 UNet both sides
    np.testing.assert_allclose(ours, want, atol=5e-4)
    # and guidance made a difference (the test would pass vacuously otherwise)
    plain = sampling.make_sampler(sd, sampling.SamplerSpec(scheduler="euler", steps=STEPS))
    assert np.abs(np.asarray(plain(sd.params, sched, inputs.replace(guidance=None))) - ours).max() > 1e-2
