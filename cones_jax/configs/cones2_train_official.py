"""Cones 2 residual training as the released code does it (ali-vilab/Cones-V2, train_cones2.py).

    python train.py residual --model /models/stable-diffusion-2-1 --images photos/dog --word dog \
        --out dog.safetensors --preset official --checkpoint-dir ckpt/dog --checkpoint-every 500

Released setting: SD 2.1 (768 px, v-prediction), fp32, batch 1, 4000 steps. Expected time: the
official PyTorch code takes about 20-30 min per subject on an A100; measure ours with
`benchmarks/train_step.py` (the step is the whole cost: 4000 × one UNet forward + backward).
Expected result: a [n, 1024] Δ (n = sub-words of the word), a few KB.
"""

from cones_jax.config import ResidualConfig


def get_config() -> ResidualConfig:
    return ResidualConfig(
        preset="official",
        instance_prompt="{}",         # the bare category word, e.g. "dog"
        reg="official",               # Eq. 3 on the instance prompt: start token + end/padding tokens
        lambda_start=1e-2,            # λ1 · ‖E′[0] − E[0]‖₂
        lambda_rest=1e-3,             # λ2 · ‖E′[1+n:] − E[1+n:]‖_F
        delta_prompts="templates",    # Eq. 5 averaged over the 27 textual-inversion templates
        num_sentences=1000,           # only if delta_prompts="sentences"
        sentence_seed=0,
        lr=5e-6,                      # AdamW, constant schedule
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_eps=1e-8,
        weight_decay=1e-2,
        max_grad_norm=1.0,            # global-norm clipping
        batch=1,
        steps=4000,
        resolution=768,
        crop="random",                # random crop (no flip); "center" as an option
        seed=0,
        checkpoint_every=500,         # with --checkpoint-dir
        keep_checkpoints=2,
    )
