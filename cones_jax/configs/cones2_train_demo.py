"""Cones 2 residual training for the bundled demo model (64 px shapes world, 96-d text encoder).

    python train.py residual --subjects examples/demo_world/subjects.json \
        --out-dir examples/demo_world/residuals --overwrite      # the four shipped residuals, 5.6 min on CPU-2

The official recipe (`cones2_train_official.py`) with what a model trained from scratch on 64 px
images needs: its resolution, a batch of all four photos, and a learning rate for a text encoder
of 3 layers rather than OpenCLIP's 23 (the official 5e-6 barely moves it in a few hundred steps).
The rate was chosen by measurement (BENCHMARKS.md, "Residual recipe on the demo model"): 1e-4 left
two of the four subjects without their colour; 1e-3 brings every colour but overcooks the shapes
of two-subject images; 3e-4 sits between.
"""

from cones_jax.config import ResidualConfig
from cones_jax.configs import cones2_train_official


def get_config() -> ResidualConfig:
    return cones2_train_official.get_config().replace(
        resolution=64,
        batch=4,
        lr=3e-4,
        steps=600,
        crop="center",          # the photos are 64 px already: nothing to crop
        checkpoint_every=200,
    )
