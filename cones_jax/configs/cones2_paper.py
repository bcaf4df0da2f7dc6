"""Cones 2 layout-guided sampling as the paper describes it (Sec. 3.3, Algorithm 1, Appendix A).

    python sample.py --layout examples/layouts/two_subjects.json --preset paper

Paper setting: SD 2.1-base, 50 DDIM steps, CFG 7.5, every step guided, γ⁺ = 2.5 and the
appendix's printed γ⁻ = −1×10⁻⁵. λ is not given in the paper: the official example's 0.08.
"""

from cones_jax.config import SamplingConfig


def get_config() -> SamplingConfig:
    return SamplingConfig(
        preset="paper",
        scheduler="ddim",
        timestep_spacing=None,           # the model's own scheduler config
        steps=50,
        cfg_scale=7.5,
        self_recurrence=False,
        guidance_steps=50,
        guidance_weight=0.08,
        weight_positive=2.5,
        weight_negative=-1e-5,
        guidance_sigmas="sampler",       # σ_t of the sampler's own schedule
    )
