"""Tiny, random, offline checkpoints in diffusers layout, shared by the tests.

Each builder writes one component folder and returns what the tests compare against. Nothing is
downloaded: tokenizers are built from a word list, models from small random configs.
"""

from __future__ import annotations

import os

# Words the tiny tokenizer knows whole; anything else is spelled with shorter pieces.
TINY_WORDS = (
    "a an the photo of picture rendering in on with and at dog cat teddy bear sunflower barn house "
    "beach city forest park mountain street sitting standing next to red blue small big , . "
    "dog dog cat cat photo photo a a the of"  # repeats: frequent words are merged first
).split()


def make_tokenizer(folder: str, pad: str = "eos", *, words=TINY_WORDS, max_length: int = 77):
    """Writes a tiny CLIP tokenizer folder; pad="eos" mimics SD 1.x, pad="!" SD 2.x (pad id 0).

    Returns our loaded `ClipTokenizer`.
    """
    from cones_jax.tokenizer import EOS_TOKEN, write_clip_tokenizer

    if pad not in ("eos", "!"):
        raise ValueError(f"pad must be 'eos' or '!', got {pad!r}")
    return write_clip_tokenizer(folder, list(words), pad_token=EOS_TOKEN if pad == "eos" else "!",
                                max_length=max_length)


def text_encoder_config(kind: str, vocab_size: int) -> dict:
    """A tiny CLIPTextConfig dict. The vocabulary ends with start and end tokens, as CLIP's does.

    "sd1": quick-GELU, 2 layers, the end token's real id as eos_token_id (transformers pools at its
    first occurrence). "sd2": GELU, 3 layers, the legacy ids of SD's own configs (bos 0, eos 2,
    pad 1), with which transformers pools at the highest id in the row.
    """
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                  max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=16)
    if kind == "sd1":
        return dict(common, hidden_act="quick_gelu", num_hidden_layers=2,
                    bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    if kind == "sd2":
        return dict(common, hidden_act="gelu", num_hidden_layers=3, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    raise ValueError(f"kind must be 'sd1' or 'sd2', got {kind!r}")


def make_text_encoder(folder: str, kind: str = "sd1", vocab_size: int = 600, *, seed: int = 0):
    """Writes a tiny random transformers CLIPTextModel (config.json + model.safetensors) to `folder`.

    Every parameter is drawn at random (LayerNorm scales around 1), so that a wrong transpose,
    activation or norm shows. Returns the PyTorch model in eval mode.
    """
    import torch
    import transformers

    config = transformers.CLIPTextConfig(**text_encoder_config(kind, vocab_size))
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def unet_config(kind: str, cross_attention_dim: int = 32) -> dict:
    """Tiny diffusers UNet2DConditionModel configs.

    "sd1": conv projections, one int head count for all blocks, two resnets per block.
    "sd2": linear projections, a per-block head-count list, upcast attention, three blocks.
    """
    if kind == "sd1":
        return dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                    attention_head_dim=8, cross_attention_dim=cross_attention_dim)
    if kind == "sd2":
        return dict(block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=8,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    attention_head_dim=[2, 4, 4], cross_attention_dim=cross_attention_dim,
                    use_linear_projection=True, upcast_attention=True)
    raise ValueError(f"kind must be 'sd1' or 'sd2', got {kind!r}")


VAE_CONFIG = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                  sample_size=32, scaling_factor=0.5)


def _perturb(model, seed: int, scale: float = 0.05):
    """Adds noise to every parameter (zero-initialised ones and norm scales too)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def make_unet(folder: str | None, kind: str = "sd1", *, cross_attention_dim: int = 32, seed: int = 0):
    import diffusers
    import torch

    torch.manual_seed(seed)
    model = _perturb(diffusers.UNet2DConditionModel(**unet_config(kind, cross_attention_dim)).eval(), seed)
    if folder:
        model.save_pretrained(folder, safe_serialization=True)
    return model


def make_vae(folder: str | None, *, seed: int = 0):
    import diffusers
    import torch

    torch.manual_seed(seed)
    model = _perturb(diffusers.AutoencoderKL(**VAE_CONFIG).eval(), seed)
    if folder:
        model.save_pretrained(folder, safe_serialization=True)
    return model


SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


def make_sd(root: str, kind: str = "sd1", *, seed: int = 0):
    """Writes a whole tiny Stable Diffusion folder (model_index.json and five components).

    "sd1": ε-prediction, tokenizer padding with the end token; "sd2": v-prediction, pad id 0,
    linear projections and upcast attention. Returns the diffusers PyTorch pipeline.
    """
    import diffusers
    import transformers

    tok = make_tokenizer(os.path.join(root, "tokenizer"), "eos" if kind == "sd1" else "!")
    text = make_text_encoder(os.path.join(root, "text_encoder"), kind, tok.vocab_size, seed=seed + 1)
    unet = make_unet(None, kind, cross_attention_dim=text.config.hidden_size, seed=seed + 2)
    vae = make_vae(None, seed=seed + 3)
    scheduler = diffusers.DDIMScheduler(
        **SCHEDULER_CONFIG, prediction_type="epsilon" if kind == "sd1" else "v_prediction")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(
            os.path.join(root, "tokenizer"), local_files_only=True),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(root, safe_serialization=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_photos(folder: str, n: int, seed: int, size: int = 32) -> str:
    """`n` random RGB "photos" of `size` px in `folder` (made if missing); returns the folder."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return folder
