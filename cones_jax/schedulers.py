"""Noise schedules and samplers (DDIM, Euler, DPM-Solver++ 2M) as pure JAX functions.

Everything that depends only on the config and the number of steps is tabulated once in
float64 numpy by :func:`make_schedule` and stored as float32 arrays in a :class:`Schedule`
pytree. :func:`step` then only indexes those tables, so the step index ``i`` may be a traced
integer (e.g. the counter of a ``jax.lax.fori_loop``).

Numerics follow diffusers 0.42.1 (``DDIMScheduler``, ``LMSDiscreteScheduler`` with order 1 /
``EulerDiscreteScheduler``, ``DPMSolverMultistepScheduler``) with their default solver options.

Noise-level conventions used throughout:

* ``ac`` is the cumulative product of alphas (alpha-bar) of a level.
* ``sigma = sqrt((1 - ac) / ac)`` is the noise level in "sigma space" (x = x0 + sigma * eps),
  which is the space the Euler latent lives in.
* DDIM and DPM-Solver latents live in "VP space" (x = sqrt(ac) * x0 + sqrt(1 - ac) * eps);
  ``Schedule.alphas`` / ``Schedule.stds`` hold sqrt(ac) / sqrt(1 - ac).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cones_jax.errors import ConfigError

KINDS = ("ddim", "euler", "dpmpp_2m")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers sets the terminal alpha-bar of a zero-SNR schedule to this for the sigma-space
# schedulers (Euler, DPM-Solver) so that the first sigma stays finite.
_ZERO_SNR_TERMINAL_AC = 2.0**-24

# Keys that change the noise schedule or the timestep grid in some diffusers scheduler. We only
# implement the value given here, so any other value is rejected instead of silently ignored.
# Solver-level knobs (clip_sample, thresholding, solver_order, ...) are fixed by the sampler
# kind and are ignored.
_REQUIRED_VALUES: dict[str, Any] = {
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "timestep_type": "discrete",
    "interpolation_type": "linear",
}

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Training noise schedule plus the timestep-grid options of a diffusers scheduler config.

    Defaults are Stable Diffusion's (as a loaded ``PNDMScheduler`` config reports them), not the
    constructor defaults of the individual diffusers scheduler classes.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        choices = {
            "beta_schedule": BETA_SCHEDULES,
            "prediction_type": PREDICTION_TYPES,
            "timestep_spacing": TIMESTEP_SPACINGS,
        }
        for key, allowed in choices.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(
                    f"unsupported {key}={_short_repr(value)}; expected one of {allowed}"
                )
        if int(self.num_train_timesteps) < 1:
            raise ConfigError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """Build from a diffusers ``scheduler_config.json`` dict.

        Unknown keys are ignored; keys that would change the schedule in a way this module does
        not implement (e.g. ``trained_betas`` not None, karras sigmas) raise ``ValueError``.
        Missing keys take this class's defaults, so a raw JSON without ``timestep_spacing``
        gets "leading" even where that diffusers class's constructor default is "linspace".
        """
        for key, required in _REQUIRED_VALUES.items():
            if key in d and d[key] != required:
                raise ConfigError(
                    f"unsupported {key}={_short_repr(d[key])}; only {required!r} is implemented"
                )
        # JSON may carry e.g. 1000.0 or 0/1 where the dataclass expects int/bool.
        hints = typing.get_type_hints(cls)
        kwargs = {f.name: hints[f.name](d[f.name]) for f in dataclasses.fields(cls) if f.name in d}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SchedulerConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_config(cfg: SchedulerConfig | Mapping[str, Any]) -> SchedulerConfig:
    return cfg if isinstance(cfg, SchedulerConfig) else SchedulerConfig.from_dict(cfg)


# --------------------------------------------------------------------------------------------
# Training schedule
# --------------------------------------------------------------------------------------------


def _cosine_alpha_bar(t: np.ndarray) -> np.ndarray:
    return np.cos((t + 0.008) / 1.008 * (math.pi / 2)) ** 2


def _betas_float32(cfg: SchedulerConfig) -> np.ndarray:
    """Betas rounded to float32 the way diffusers builds them (its tables are float32)."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return np.linspace(cfg.beta_start, cfg.beta_end, n).astype(np.float32)
    if cfg.beta_schedule == "scaled_linear":
        root = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n).astype(np.float32)
        return root * root  # squared in float32, as diffusers does
    steps = np.arange(n, dtype=np.float64)
    ratio = _cosine_alpha_bar((steps + 1) / n) / _cosine_alpha_bar(steps / n)
    return np.minimum(1.0 - ratio, 0.999).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Alg. 1: shift/scale sqrt(alpha-bar) so the last step has zero SNR.

    Done in float32 (elementwise ops are IEEE-exact in both libraries) because diffusers does,
    and a float64 version drifts from its alpha-bars by ~2e-6 relative.
    """
    f32 = np.float32
    root = np.sqrt(np.cumprod((f32(1.0) - betas).astype(np.float64)).astype(f32))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    ac = root * root
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return f32(1.0) - alphas


def alphas_cumprod(cfg: SchedulerConfig | Mapping[str, Any]) -> np.ndarray:
    """Alpha-bar table ``[T]`` (float64 dtype).

    Betas and alphas are rounded to float32 and the cumulative product rounded to float32 like
    diffusers does, because diffusers' low-noise sigmas (which depend on 1 - ac near ac ~ 1) are
    only float32-accurate and we want to agree with them; everything derived from this table is
    then computed in float64.
    """
    cfg = _as_config(cfg)
    betas = _betas_float32(cfg)
    if cfg.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    alphas = np.float32(1.0) - betas
    # torch.cumprod on CPU accumulates float32 in double and rounds each output.
    ac = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    return ac.astype(np.float64)


def _gather_per_sample(table: Array, t: Array, like: Array) -> Array:
    vals = jnp.asarray(table, dtype=like.dtype)[jnp.asarray(t)]
    return vals.reshape(vals.shape + (1,) * (like.ndim - vals.ndim))


def add_noise(alphas_cumprod_T: np.ndarray | Array, x0: Array, noise: Array, t: Array) -> Array:
    """Forward diffusion ``sqrt(ac_t) * x0 + sqrt(1 - ac_t) * noise``; ``t`` int ``[B]``."""
    ac = _gather_per_sample(alphas_cumprod_T, t, x0)
    return jnp.sqrt(ac) * x0 + jnp.sqrt(1.0 - ac) * noise


def get_velocity(alphas_cumprod_T: np.ndarray | Array, x0: Array, noise: Array, t: Array) -> Array:
    """v-prediction target ``sqrt(ac_t) * noise - sqrt(1 - ac_t) * x0``; ``t`` int ``[B]``."""
    ac = _gather_per_sample(alphas_cumprod_T, t, x0)
    return jnp.sqrt(ac) * noise - jnp.sqrt(1.0 - ac) * x0


def training_target(
    cfg_or_prediction_type: SchedulerConfig | str,
    alphas_cumprod_T: np.ndarray | Array,
    x0: Array,
    noise: Array,
    t: Array,
) -> Array:
    """Model output to regress on for ``add_noise(ac, x0, noise, t)`` (eps, v or x0)."""
    ptype = (
        cfg_or_prediction_type.prediction_type
        if isinstance(cfg_or_prediction_type, SchedulerConfig)
        else cfg_or_prediction_type
    )
    if ptype == "epsilon":
        return noise
    if ptype == "v_prediction":
        return get_velocity(alphas_cumprod_T, x0, noise, t)
    if ptype == "sample":
        return x0
    raise ConfigError(f"unsupported prediction_type={ptype!r}; expected one of {PREDICTION_TYPES}")


# --------------------------------------------------------------------------------------------
# Sampling schedules
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Schedule:
    """Per-step tables of one sampler run with ``n`` steps (all float32 unless noted).

    Level ``i`` is the noise level of the sample entering step ``i``; level ``n`` is the level
    after the final step.

    * ``timesteps [n]``: UNet timestep at step ``i`` (fractional for euler with linspace
      spacing; integer-valued for ddim/dpmpp_2m).
    * ``sigmas [n+1]``: sigma-space noise level ``sqrt((1-ac)/ac)`` of level ``i``. For euler
      these are diffusers' interpolated sigmas with a trailing 0. For dpmpp_2m they are the
      sigmas of ``timesteps`` plus a trailing 0 (``final_sigmas_type="zero"``). For ddim they
      are the sigmas of ``timesteps`` plus the sigma of the final alpha (0 if
      ``set_alpha_to_one``, else that of timestep 0).
    * ``sigmas_next [n]``: level that step ``i`` actually lands on. Equals ``sigmas[1:]``
      except for ddim, whose step always goes to ``t_i - T // n``; with "linspace" (and
      "trailing" when ``T % n != 0``) that is not the next timestep.
    * ``alphas``, ``stds [n+1]``: VP scales ``sqrt(ac)``, ``sqrt(1-ac)`` of level ``i``;
      ``alphas_next``, ``stds_next [n]`` of the landing level.
    * ``renoise_scale``, ``renoise_std [n]``: ``x_i = scale * x_{i+1} + std * eps`` takes a
      sample from the landing level of step ``i`` back to level ``i`` (see :func:`renoise`).
    * ``dpm_cx``, ``dpm_c0``, ``dpm_c1 [n]``, ``dpm_second_order [n]`` (bool): DPM-Solver++
      update coefficients (zeros for other kinds).
    * ``init_sigma []``: std of the initial noise.
    """

    timesteps: Array
    sigmas: Array
    sigmas_next: Array
    alphas: Array
    stds: Array
    alphas_next: Array
    stds_next: Array
    renoise_scale: Array
    renoise_std: Array
    dpm_cx: Array
    dpm_c0: Array
    dpm_c1: Array
    dpm_second_order: Array
    init_sigma: Array
    kind: str = flax.struct.field(pytree_node=False, default="ddim")
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


@flax.struct.dataclass
class SamplerState:
    """Multistep memory. ``prev_x0``/``has_prev`` are None for single-step kinds."""

    prev_x0: Any = None
    has_prev: Any = None


def _leading_grid(num_points: int, ratio: int, steps_offset: int) -> np.ndarray:
    return (np.arange(0, num_points) * ratio).round()[::-1].astype(np.float64) + steps_offset


def _trailing_grid(num_train: int, n: int) -> np.ndarray:
    # Float-step arange exactly as diffusers uses it (its length can differ from n).
    return np.arange(num_train, 0, -num_train / n).round() - 1.0


def _timestep_grid(kind: str, cfg: SchedulerConfig, n: int) -> np.ndarray:
    """Timesteps (high to low, float64) of diffusers' ``set_timesteps`` for each scheduler."""
    T, spacing = cfg.num_train_timesteps, cfg.timestep_spacing
    if kind == "dpmpp_2m":
        # DPM-Solver lays out n + 1 points and drops the last one for linspace/leading.
        if spacing == "linspace":
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy()
        if spacing == "leading":
            return _leading_grid(n + 1, T // (n + 1), cfg.steps_offset)[:-1]
        return _trailing_grid(T, n)
    if spacing == "linspace":
        grid = np.linspace(0, T - 1, n)[::-1].copy()
        # DDIM rounds to integers, Euler keeps the fractional timesteps.
        return grid.round() if kind == "ddim" else grid
    if spacing == "leading":
        return _leading_grid(n, T // n, cfg.steps_offset)
    return _trailing_grid(T, n)


def _sigma_of_ac(ac: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.sqrt((1.0 - ac) / ac)


def _vp_scales_of_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    alpha = 1.0 / np.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def _check_timesteps(ts: np.ndarray, num_train: int, kind: str) -> None:
    if ts.size == 0 or ts.min() < 0 or ts.max() > num_train - 1:
        raise ConfigError(
            f"{kind} timesteps {ts.tolist()} fall outside [0, {num_train - 1}]; "
            "check num_steps, steps_offset and timestep_spacing"
        )


def _ddim_tables(cfg: SchedulerConfig, ac: np.ndarray, n: int) -> dict[str, np.ndarray]:
    T = cfg.num_train_timesteps
    ts = _timestep_grid("ddim", cfg, n).astype(np.int64)
    _check_timesteps(ts, T, "ddim")
    final_ac = 1.0 if cfg.set_alpha_to_one else ac[0]
    # diffusers steps by the nominal ratio T // n, not to the next grid point.
    prev = ts - T // n
    ac_t = ac[ts]
    ac_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final_ac)
    ac_levels = np.concatenate([ac_t, [final_ac]])
    alphas, stds = np.sqrt(ac_levels), np.sqrt(1.0 - ac_levels)
    alphas_next, stds_next = np.sqrt(ac_prev), np.sqrt(1.0 - ac_prev)
    with np.errstate(divide="ignore", invalid="ignore"):
        renoise_scale = np.sqrt(ac_t / ac_prev)
    return dict(
        timesteps=ts.astype(np.float64),
        sigmas=_sigma_of_ac(ac_levels),
        sigmas_next=_sigma_of_ac(ac_prev),
        alphas=alphas,
        stds=stds,
        alphas_next=alphas_next,
        stds_next=stds_next,
        renoise_scale=renoise_scale,
        renoise_std=np.sqrt(np.maximum(1.0 - ac_t / ac_prev, 0.0)),
        init_sigma=np.float64(1.0),
    )


def _sigma_space_levels(sigma_table: np.ndarray, ts: np.ndarray) -> np.ndarray:
    sig = np.interp(ts, np.arange(sigma_table.shape[0]), sigma_table)
    return np.concatenate([sig, [0.0]])


def _vp_tables_from_sigmas(sig: np.ndarray) -> dict[str, np.ndarray]:
    alphas, stds = _vp_scales_of_sigma(sig)
    return dict(
        sigmas=sig,
        sigmas_next=sig[1:],
        alphas=alphas,
        stds=stds,
        alphas_next=alphas[1:],
        stds_next=stds[1:],
    )


def _euler_tables(cfg: SchedulerConfig, ac: np.ndarray, n: int) -> dict[str, np.ndarray]:
    T = cfg.num_train_timesteps
    # The UNet sees float32 timesteps; interpolate at exactly those values.
    ts = _timestep_grid("euler", cfg, n).astype(np.float32).astype(np.float64)
    _check_timesteps(ts, T, "euler")
    sig = _sigma_space_levels(_sigma_of_ac(ac), ts)
    tables = _vp_tables_from_sigmas(sig)
    # diffusers uses sigma_max for linspace/trailing but sqrt(sigma_max^2 + 1) for leading.
    if cfg.timestep_spacing == "leading":
        init = math.sqrt(sig[0] ** 2 + 1.0)
    else:
        init = sig[0]
    tables.update(
        timesteps=ts,
        renoise_scale=np.ones(ts.shape[0]),
        renoise_std=np.sqrt(np.maximum(sig[:-1] ** 2 - sig[1:] ** 2, 0.0)),
        init_sigma=np.float64(init),
    )
    return tables


def _dpm_tables(cfg: SchedulerConfig, ac: np.ndarray, n: int) -> dict[str, np.ndarray]:
    T = cfg.num_train_timesteps
    # lambda_min_clipped = -inf by default, so the grid always extends to T.
    ts = _timestep_grid("dpmpp_2m", cfg, n).astype(np.int64)
    _check_timesteps(ts, T, "dpmpp_2m")
    n_eff = ts.shape[0]
    sig = _sigma_space_levels(_sigma_of_ac(ac), ts.astype(np.float64))
    tables = _vp_tables_from_sigmas(sig)

    s_cur, s_next = sig[:-1], sig[1:]
    alpha_next, std_next = tables["alphas_next"], tables["stds_next"]
    # lambda = log(alpha / std) = -log(sigma), so exp(-h) = sigma_next / sigma_cur. Written as a
    # ratio, the final step to sigma = 0 (h = inf) gives x_next = x0 without inf/nan.
    cx = std_next / tables["stds"][:-1]
    c0 = alpha_next * (1.0 - s_next / s_cur)
    # diffusers (solver_order=2, lower_order_final=True, euler_at_final=False,
    # final_sigmas_type="zero"): step 0 is first order because there is no history yet, and the
    # last step is always first order because final_sigmas_type == "zero" alone forces it, so
    # the `len(timesteps) < 15` condition never matters with these defaults.
    second = np.zeros(n_eff, dtype=bool)
    second[1:-1] = True
    # Midpoint 2M: x_next = cx*x + c0*D0 + 0.5*c0*D1 with D0 = m0, D1 = (m0 - m1) * h / h_prev.
    idx = np.nonzero(second)[0]
    h = np.log(s_cur[idx] / s_next[idx])
    h_prev = np.log(sig[idx - 1] / sig[idx])
    c1 = np.zeros(n_eff)
    c1[idx] = 0.5 * c0[idx] * h / h_prev
    tables.update(
        timesteps=ts.astype(np.float64),
        renoise_scale=tables["alphas"][:-1] / alpha_next,
        renoise_std=np.sqrt(np.maximum(s_cur**2 - s_next**2, 0.0)) * tables["alphas"][:-1],
        dpm_cx=cx,
        dpm_c0=c0,
        dpm_c1=c1,
        dpm_second_order=second,
        init_sigma=np.float64(1.0),
    )
    return tables


def make_schedule(kind: str, cfg: SchedulerConfig | Mapping[str, Any], num_steps: int) -> Schedule:
    """Tabulate a ``kind`` sampler with ``num_steps`` steps (see :class:`Schedule`).

    The table length is the length of diffusers' timestep grid, which for "trailing" spacing
    can differ from ``num_steps`` (it uses a float-step ``arange``).
    """
    if kind not in KINDS:
        raise ConfigError(f"unsupported scheduler kind={kind!r}; expected one of {KINDS}")
    cfg = _as_config(cfg)
    n = int(num_steps)
    if not 1 <= n <= cfg.num_train_timesteps:
        raise ConfigError(f"num_steps must be in [1, {cfg.num_train_timesteps}], got {num_steps}")
    ac = alphas_cumprod(cfg)
    if kind == "ddim":
        tables = _ddim_tables(cfg, ac, n)
    else:
        if cfg.rescale_betas_zero_snr:
            ac = ac.copy()
            ac[-1] = _ZERO_SNR_TERMINAL_AC
        tables = (_euler_tables if kind == "euler" else _dpm_tables)(cfg, ac, n)
    n_eff = tables["timesteps"].shape[0]
    for key in ("dpm_cx", "dpm_c0", "dpm_c1"):
        tables.setdefault(key, np.zeros(n_eff))
    tables.setdefault("dpm_second_order", np.zeros(n_eff, dtype=bool))
    arrays = {
        k: jnp.asarray(v, dtype=jnp.bool_ if k == "dpm_second_order" else jnp.float32)
        for k, v in tables.items()
    }
    return Schedule(**arrays, kind=kind, prediction_type=cfg.prediction_type)


# --------------------------------------------------------------------------------------------
# Sampling steps
# --------------------------------------------------------------------------------------------


def _at(table: Array, i: int | Array, dtype: Any) -> Array:
    return table[i].astype(dtype)


def init_noise_sigma(schedule: Schedule) -> Array:
    """Scale for unit Gaussian noise to get the initial latent."""
    return schedule.init_sigma


def scale_model_input(schedule: Schedule, x: Array, i: int | Array) -> Array:
    """UNet input at step ``i``: Euler latents are in sigma space, so rescale to unit variance."""
    if schedule.kind != "euler":
        return x
    sigma = _at(schedule.sigmas, i, x.dtype)
    return x / jnp.sqrt(sigma * sigma + 1.0)


def init_state(schedule: Schedule, x: Array) -> SamplerState:
    """Initial sampler memory for a latent shaped like ``x``."""
    if schedule.kind != "dpmpp_2m":
        return SamplerState()
    return SamplerState(prev_x0=jnp.zeros_like(x), has_prev=jnp.zeros((), dtype=jnp.bool_))


def _ddim_x0_eps(
    schedule: Schedule, model_output: Array, i: int | Array, x: Array
) -> tuple[Array, Array]:
    a = _at(schedule.alphas, i, x.dtype)
    s = _at(schedule.stds, i, x.dtype)
    ptype = schedule.prediction_type
    if ptype == "epsilon":
        return (x - s * model_output) / a, model_output
    if ptype == "v_prediction":
        return a * x - s * model_output, a * model_output + s * x
    x0 = model_output
    return x0, (x - a * x0) / s


def predict_x0(schedule: Schedule, model_output: Array, i: int | Array, x: Array) -> Array:
    """Denoised estimate at step ``i`` from the raw model output and the (unscaled) latent."""
    ptype = schedule.prediction_type
    if ptype == "sample":
        return model_output
    if schedule.kind == "ddim":
        return _ddim_x0_eps(schedule, model_output, i, x)[0]
    if schedule.kind == "euler":
        sigma = _at(schedule.sigmas, i, x.dtype)
        if ptype == "epsilon":
            return x - sigma * model_output
        var1 = sigma * sigma + 1.0
        return model_output * (-sigma / jnp.sqrt(var1)) + x / var1
    a = _at(schedule.alphas, i, x.dtype)
    s = _at(schedule.stds, i, x.dtype)
    if ptype == "epsilon":
        return (x - s * model_output) / a
    return a * x - s * model_output


def step(
    schedule: Schedule, state: SamplerState, model_output: Array, i: int | Array, x: Array
) -> tuple[Array, SamplerState]:
    """Advance ``x`` from level ``i`` to ``sigmas_next[i]``; pure, so a step can be redone.

    ``model_output`` is the UNet output for ``scale_model_input(schedule, x, i)`` at
    ``schedule.timesteps[i]``. Returns the new latent and the new sampler state. As in
    diffusers, DPM-Solver's first step taken from a fresh state is first order, also when
    sampling starts mid-schedule.
    """
    dtype = x.dtype
    if schedule.kind == "ddim":
        x0, eps = _ddim_x0_eps(schedule, model_output, i, x)
        x_next = _at(schedule.alphas_next, i, dtype) * x0 + _at(schedule.stds_next, i, dtype) * eps
        return x_next, state
    if schedule.kind == "euler":
        sigma = _at(schedule.sigmas, i, dtype)
        derivative = (x - predict_x0(schedule, model_output, i, x)) / sigma
        dt = _at(schedule.sigmas, i + 1, dtype) - sigma
        return x + derivative * dt, state
    x0 = predict_x0(schedule, model_output, i, x)
    use_second = jnp.logical_and(schedule.dpm_second_order[i], state.has_prev)
    c1 = jnp.where(use_second, _at(schedule.dpm_c1, i, dtype), jnp.zeros((), dtype))
    # The correction is multiplied by c1 = 0 on first-order steps, so prev_x0 must be finite.
    x_next = (
        _at(schedule.dpm_cx, i, dtype) * x
        + _at(schedule.dpm_c0, i, dtype) * x0
        + c1 * (x0 - state.prev_x0)
    )
    return x_next, SamplerState(prev_x0=x0, has_prev=jnp.ones((), dtype=jnp.bool_))


def renoise(schedule: Schedule, x_next: Array, i: int | Array, noise: Array) -> Array:
    """Take the output of step ``i`` back to level ``i`` with fresh unit noise.

    For euler this is ``x_next + sqrt(sigma_i^2 - sigma_{i+1}^2) * noise``; for ddim/dpmpp_2m
    the VP equivalent ``sqrt(ac_i/ac_next) * x_next + sqrt(1 - ac_i/ac_next) * noise``.
    """
    scale = _at(schedule.renoise_scale, i, x_next.dtype)
    std = _at(schedule.renoise_std, i, x_next.dtype)
    return scale * x_next + std * noise
