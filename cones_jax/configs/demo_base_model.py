"""The demo base model's training recipe: a small Stable Diffusion of the shapes world.

    python -m cones_jax.demo.base_model --workdir /tmp/demo_run --out examples/demo_model [--set steps=30000]

Hardware and time: the bundled model took 49000 UNet steps on CPU, in eleven sittings whose flags are
`cones_jax/configs/demo_model_lineage.py` (docs/demo_model_training.md); one command replays them
from scratch (an estimated 14-15 h on 2 CPU cores; meant for a GPU):

    python -m cones_jax.demo.retrain --workdir /tmp/demo_retrain --out /tmp/demo_model [--sittings K] [--scale S]

The architecture itself (VAE, UNet and scheduler configs) lives beside the code in
`cones_jax/demo/base_model.py` and is recorded in the exported `demo_training.json`.
"""

from cones_jax.config import DemoModelConfig


def get_config() -> DemoModelConfig:
    return DemoModelConfig(
        scenes=40000,                  # rendered captioned scenes
        vae_steps=4000,
        vae_batch=32,
        vae_lr=1e-3,
        # Against a per-pixel *mean* reconstruction loss (SD's autoencoder sums over pixels), 1e-6
        # was ~1e4 times SD's KL pressure: the encoder then keeps a posterior noise that the decoder
        # learns to ignore, and the UNet, trained on sampled latents, sees fine shape detail only
        # through that noise.
        kl_weight=1e-8,
        steps=30000,                   # UNet + text encoder steps
        batch=64,
        lr=3e-4,
        single_object_fraction=0.0,    # share of each UNet batch from one-object scenes alone
        multi_object_fraction=0.0,     # share of each UNet batch from scenes of 3+ objects alone
        scene_sizes="words",           # object sides: the size words' ranges, or "continuous"
        weighting="clipped_v",         # per-timestep loss weight
        timestep_power=0.0,            # timesteps with density ∝ (t/T)^K; 0 is uniform
        grounding_weight=0.0,          # weight of the token grounding loss; 0 is none
        grounding_pixel_weight=0.0,    # weight of the shape words' per-pixel grounding loss; 0 is none
        max_length=40,                 # text tokens
        text_width=96,
        latent_factor=2,               # latents at 32² for 64 px images
    )
