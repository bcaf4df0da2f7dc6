"""Cones 2 layout-guided sampling as the released code does it (ali-vilab/Cones-V2).

    python sample.py --layout examples/layouts/two_subjects.json --preset official

Released setting: SD 2.1 (768, v-prediction); the constants below are model-independent.
Costs two UNet batches per guided step (self-recurrence).
"""

from cones_jax.config import SamplingConfig


def get_config() -> SamplingConfig:
    return SamplingConfig(
        preset="official",
        scheduler="euler",               # LMS of order 1 in σ-space, float timesteps
        timestep_spacing="linspace",     # what LMSDiscreteScheduler.from_config gave the official code
        steps=50,
        cfg_scale=7.5,
        self_recurrence=True,            # redo each guided step after re-noising to its level
        guidance_steps=50,               # steps [0, guidance_steps) are guided
        guidance_weight=0.08,            # λ (the example config; 0.05–0.10 recommended)
        weight_positive=2.5,             # γ⁺ default, per subject overridable
        weight_negative=-1e8,            # γ⁻ everywhere outside the subject's region
        guidance_sigmas="separate",      # σ_t from a scaled-linear LMS schedule of guidance_steps steps
    )
