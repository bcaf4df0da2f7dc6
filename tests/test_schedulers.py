"""Schedulers against diffusers 0.42.1 (DDIM, LMS order 1 / Euler, DPM-Solver++ 2M)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from cones_jax import schedulers as S  # noqa: E402

# diffusers' own numpy-2 deprecation noise, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Trajectory tolerance: diffusers computes its per-step scalars in float32 torch, we tabulate
# them in float64 and round once, so the two agree to float32 rounding that compounds over steps.
TRAJ_TOL = dict(rtol=1e-5, atol=1e-5)

SD21_CONFIG = json.loads(
    """{"_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": false,
    "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null}"""
)


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _config_dict(prediction_type="epsilon", spacing="leading", **overrides):
    d = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        rescale_betas_zero_snr=False,
    )
    d.update(overrides)
    return d


def _diffusers_scheduler(kind, d, euler_class="lms"):
    if kind == "ddim":
        return diffusers.DDIMScheduler.from_config(d)
    if kind == "euler":
        cls = (
            diffusers.LMSDiscreteScheduler
            if euler_class == "lms"
            else diffusers.EulerDiscreteScheduler
        )
        d = {
            k: v
            for k, v in d.items()
            if not (cls is diffusers.LMSDiscreteScheduler and k == "rescale_betas_zero_snr")
        }
        return cls.from_config(d)
    return diffusers.DPMSolverMultistepScheduler.from_config(d)


def _fake_model(x: np.ndarray, t: float) -> np.ndarray:
    # Depends on x so that any discrepancy feeds back into later steps.
    return (0.1 * x + np.sin(t / 100.0)).astype(np.float32)


def _latent(seed=0):
    return np.random.default_rng(seed).standard_normal((2, 4, 8, 8)).astype(np.float32)


def _run_diffusers(kind, sched, n, noise, euler_class="lms", start=0):
    """Sample from step `start`; a mid-schedule start takes `noise` as the latent as is."""
    sched.set_timesteps(n)
    if start == 0:
        x = torch.from_numpy(noise) * sched.init_noise_sigma
    else:
        x = torch.from_numpy(noise)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
    inputs, xs = [], []
    for t in sched.timesteps[start:]:
        x_in = sched.scale_model_input(x, t)
        m = torch.from_numpy(_fake_model(x_in.numpy(), float(t)))
        kwargs = {"order": 1} if (kind == "euler" and euler_class == "lms") else {}
        x = sched.step(m, t, x, **kwargs).prev_sample
        inputs.append(x_in.numpy())
        xs.append(x.numpy())
    return inputs, xs


def _run_ours(schedule, noise, start=0):
    x = jnp.asarray(noise)
    if start == 0:
        x = x * S.init_noise_sigma(schedule)
    state = S.init_state(schedule, x)
    inputs, xs = [], []
    for i in range(start, schedule.num_steps):
        x_in = S.scale_model_input(schedule, x, i)
        m = jnp.asarray(_fake_model(np.asarray(x_in), float(schedule.timesteps[i])))
        x, state = S.step(schedule, state, m, i, x)
        inputs.append(np.asarray(x_in))
        xs.append(np.asarray(x))
    return inputs, xs


def _assert_trajectories_close(ours, ref, traj_tol):
    inputs, xs = ours
    ref_inputs, ref_xs = ref
    assert len(xs) == len(ref_xs)
    for k, (a, b, ia, ib) in enumerate(zip(xs, ref_xs, inputs, ref_inputs, strict=True)):
        np.testing.assert_allclose(ia, ib, err_msg=f"model input at step {k}", **traj_tol)
        np.testing.assert_allclose(a, b, err_msg=f"x after step {k}", **traj_tol)


def _compare(kind, d, n, euler_class="lms", traj_tol=TRAJ_TOL):
    sched = _diffusers_scheduler(kind, d, euler_class)
    schedule = S.make_schedule(kind, S.SchedulerConfig.from_dict(d), n)
    noise = _latent()
    ref = _run_diffusers(kind, sched, n, noise, euler_class)

    ts = np.asarray(schedule.timesteps)
    if kind == "euler":
        np.testing.assert_allclose(ts, sched.timesteps.numpy(), rtol=1e-6, atol=0)
        np.testing.assert_allclose(
            np.asarray(schedule.sigmas), sched.sigmas.numpy(), rtol=2e-6, atol=0
        )
    else:
        assert np.all(ts == np.round(ts))
        np.testing.assert_array_equal(ts.astype(np.int64), sched.timesteps.numpy())
    if kind == "dpmpp_2m":
        np.testing.assert_allclose(
            np.asarray(schedule.sigmas), sched.sigmas.numpy(), rtol=2e-6, atol=0
        )
    np.testing.assert_allclose(
        float(S.init_noise_sigma(schedule)), float(sched.init_noise_sigma), rtol=1e-6, atol=0
    )

    _assert_trajectories_close(_run_ours(schedule, noise), ref, traj_tol)


@pytest.mark.parametrize("n", [4, 10, 20])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", S.KINDS)
def test_matches_diffusers(kind, prediction_type, spacing, n):
    _compare(kind, _config_dict(prediction_type, spacing), n)


@pytest.mark.parametrize(
    "kind,n,overrides",
    [
        ("ddim", 7, dict(set_alpha_to_one=True)),
        ("ddim", 10, dict(prediction_type="sample")),
        ("ddim", 10, dict(beta_schedule="linear")),
        (
            "ddim",
            10,
            dict(
                rescale_betas_zero_snr=True,
                prediction_type="v_prediction",
                timestep_spacing="trailing",
            ),
        ),
        ("euler", 10, dict(prediction_type="sample")),
        ("dpmpp_2m", 10, dict(prediction_type="sample")),
        ("dpmpp_2m", 1, {}),
        ("dpmpp_2m", 2, {}),
        ("dpmpp_2m", 3, dict(timestep_spacing="linspace")),
        ("dpmpp_2m", 16, {}),
        (
            "dpmpp_2m",
            10,
            dict(
                rescale_betas_zero_snr=True,
                prediction_type="v_prediction",
                timestep_spacing="trailing",
            ),
        ),
        ("dpmpp_2m", 10, dict(beta_schedule="squaredcos_cap_v2")),
    ],
)
def test_matches_diffusers_extra(kind, n, overrides):
    _compare(kind, _config_dict(**overrides), n)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(timestep_spacing="linspace"),
        dict(timestep_spacing="leading", prediction_type="v_prediction"),
    ],
)
def test_euler_matches_euler_discrete(overrides):
    _compare("euler", _config_dict(**overrides), 10, euler_class="euler")


def test_euler_zero_snr_matches_euler_discrete():
    # sigma_max = sqrt(2**24 - 1) sits almost exactly between two float32 values: diffusers gets
    # 4096.0 from torch's pow, we get the correctly rounded 4095.99976. The first step then
    # cancels x (~4096 * noise) down to ~0.4% of its size, amplifying that 6e-8 relative
    # difference (and ordinary float32 rounding) ~200x, hence the looser tolerance.
    d = _config_dict(
        timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True
    )
    _compare("euler", d, 10, euler_class="euler", traj_tol=dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("kind", S.KINDS)
def test_mid_schedule_start_matches_diffusers(kind):
    # img2img-style: a fresh state at step 3 (DPM-Solver must take a first-order step there).
    d = _config_dict("v_prediction", "leading")
    schedule = S.make_schedule(kind, S.SchedulerConfig.from_dict(d), 10)
    latent = 3.0 * _latent(4)
    ref = _run_diffusers(kind, _diffusers_scheduler(kind, d), 10, latent, start=3)
    _assert_trajectories_close(_run_ours(schedule, latent, start=3), ref, TRAJ_TOL)


@pytest.mark.parametrize("kind", S.KINDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fori_loop_matches_python_loop(kind, prediction_type):
    schedule = S.make_schedule(kind, S.SchedulerConfig(prediction_type=prediction_type), 10)
    noise = jnp.asarray(_latent(1))

    def model(x, t):
        return 0.1 * x + jnp.sin(t / 100.0)

    def one_step(i, carry):
        x, state = carry
        m = model(S.scale_model_input(schedule, x, i), schedule.timesteps[i])
        return S.step(schedule, state, m, i, x)

    @jax.jit
    def sample(sch, noise):
        x = noise * S.init_noise_sigma(sch)

        def body(i, carry):
            x, state = carry
            m = model(S.scale_model_input(sch, x, i), sch.timesteps[i])
            return S.step(sch, state, m, i, x)

        return jax.lax.fori_loop(0, sch.num_steps, body, (x, S.init_state(sch, x)))[0]

    carry = (noise * S.init_noise_sigma(schedule), S.init_state(schedule, noise))
    for i in range(schedule.num_steps):
        carry = one_step(i, carry)
    np.testing.assert_allclose(
        np.asarray(sample(schedule, noise)), np.asarray(carry[0]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(beta_schedule="linear"),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(rescale_betas_zero_snr=True),
    ],
)
def test_alphas_cumprod_matches_diffusers(overrides):
    d = _config_dict(**overrides)
    ref = diffusers.DDPMScheduler.from_config(d).alphas_cumprod.numpy()
    ours = S.alphas_cumprod(S.SchedulerConfig.from_dict(d))
    assert ours.dtype == np.float64 and ours.shape == (1000,)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def test_add_noise_and_velocity_match_ddpm():
    d = _config_dict()
    ref = diffusers.DDPMScheduler.from_config(d)
    ac = S.alphas_cumprod(S.SchedulerConfig.from_dict(d))
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    t = np.array([0, 517, 999], dtype=np.int64)
    tx0, tnoise, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    jx0, jnoise, jt = jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t.astype(np.int32))

    noisy = S.add_noise(ac, jx0, jnoise, jt)
    np.testing.assert_allclose(
        np.asarray(noisy), ref.add_noise(tx0, tnoise, tt).numpy(), rtol=1e-6, atol=1e-6
    )
    vel = S.get_velocity(ac, jx0, jnoise, jt)
    np.testing.assert_allclose(
        np.asarray(vel), ref.get_velocity(tx0, tnoise, tt).numpy(), rtol=1e-6, atol=1e-6
    )

    np.testing.assert_array_equal(
        np.asarray(S.training_target("epsilon", ac, jx0, jnoise, jt)), noise
    )
    np.testing.assert_array_equal(np.asarray(S.training_target("sample", ac, jx0, jnoise, jt)), x0)
    v_cfg = S.SchedulerConfig(prediction_type="v_prediction")
    np.testing.assert_array_equal(
        np.asarray(S.training_target(v_cfg, ac, jx0, jnoise, jt)), np.asarray(vel)
    )


@pytest.mark.parametrize("kind", S.KINDS)
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_renoise_inverts_noise_levels(kind, spacing):
    schedule = S.make_schedule(kind, S.SchedulerConfig(timestep_spacing=spacing), 10)
    sig = np.asarray(schedule.sigmas, dtype=np.float64)
    scale = np.asarray(schedule.renoise_scale, dtype=np.float64)
    std = np.asarray(schedule.renoise_std, dtype=np.float64)
    sig_next = np.asarray(schedule.sigmas_next, dtype=np.float64)
    if kind == "euler":
        np.testing.assert_allclose(scale, 1.0)
        np.testing.assert_allclose(std, np.sqrt(sig[:-1] ** 2 - sig[1:] ** 2), rtol=1e-5)
    else:
        a, s = (
            np.asarray(schedule.alphas, np.float64)[:-1],
            np.asarray(schedule.stds, np.float64)[:-1],
        )
        an, sn = (
            np.asarray(schedule.alphas_next, np.float64),
            np.asarray(schedule.stds_next, np.float64),
        )
        # Re-noised sample must have level i's signal scale and total noise variance.
        np.testing.assert_allclose(scale * an, a, rtol=1e-5)
        np.testing.assert_allclose(scale**2 * sn**2 + std**2, s**2, rtol=1e-5)
    if kind != "ddim" or spacing == "leading":
        np.testing.assert_allclose(sig_next, sig[1:], rtol=1e-6)
    else:
        # diffusers' DDIM steps to t - T // n (999 -> 899), not to the next grid point (888).
        assert not np.allclose(sig_next, sig[1:])
    x = jnp.ones((1, 4, 2, 2))
    out = S.renoise(schedule, x, jnp.int32(3), jnp.zeros_like(x))
    np.testing.assert_allclose(np.asarray(out), scale[3], rtol=1e-6)


def test_predict_x0_recovers_clean_sample():
    rng = np.random.default_rng(3)
    x0 = jnp.asarray(rng.standard_normal((1, 4, 4, 4)), dtype=jnp.float32)
    eps = jnp.asarray(rng.standard_normal((1, 4, 4, 4)), dtype=jnp.float32)
    for kind in S.KINDS:
        for ptype in S.PREDICTION_TYPES:
            sch = S.make_schedule(kind, S.SchedulerConfig(prediction_type=ptype), 10)
            i = 4
            a, s = sch.alphas[i], sch.stds[i]
            if kind == "euler":
                x = x0 + sch.sigmas[i] * eps  # sigma-space latent
            else:
                x = a * x0 + s * eps
            out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[ptype]
            np.testing.assert_allclose(
                np.asarray(S.predict_x0(sch, out, i, x)), np.asarray(x0), atol=2e-5
            )


def test_from_dict_accepts_sd21_config(tmp_path):
    cfg = S.SchedulerConfig.from_dict(SD21_CONFIG)
    assert cfg == S.SchedulerConfig(prediction_type="v_prediction")
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD21_CONFIG))
    assert S.SchedulerConfig.from_json(path) == cfg


@pytest.mark.parametrize(
    "key,value",
    [
        ("beta_schedule", "sigmoid_wiggle"),
        ("prediction_type", "flow_prediction"),
        ("timestep_spacing", "karras"),
        ("trained_betas", [0.1, 0.2]),
        ("use_karras_sigmas", True),
    ],
)
def test_from_dict_rejects_unsupported(key, value):
    with pytest.raises(ValueError, match=key) as info:
        S.SchedulerConfig.from_dict({**SD21_CONFIG, key: value})
    assert "\n" not in str(info.value)
    if isinstance(value, str):
        assert value in str(info.value)


def test_make_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        S.make_schedule("pndm", S.SchedulerConfig(), 10)
    with pytest.raises(ValueError, match="num_steps"):
        S.make_schedule("ddim", S.SchedulerConfig(), 0)
