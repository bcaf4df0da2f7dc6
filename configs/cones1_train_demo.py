"""Cones (concept neurons) search for the bundled demo model (64 px shapes world).

    python train.py neurons --images examples/demo_world/subjects/sunny --class star --identifier sks \
        --out examples/demo_world/neurons/sunny.cones --config configs/cones1_train_demo.py

The paper's setting (`cones1_train.py`) with a larger share of shut weights: the demo UNet's
cross-attention K/V hold 135 k weights, where Stable Diffusion's hold tens of millions, and the
paper's 0.1% of them (135 neurons) barely moved its samples. On the sunny subject, shutting 0.3%
made 7 of 8 samples of "photo of a sks star" stars and 5 of 8 the subject's yellow (1 and 0 of 8
with nothing shut); 1% broke the shapes apart (BENCHMARKS.md, sparsity sweep).
"""

from cones_jax.config import load_config


def get_config():
    cfg = load_config("cones1_train")
    cfg.update(sparsity=3e-3)
    return cfg
