"""The SD1.5 inpainting architecture with random weights, saved in the diffusers layout, for the benchmarks.

Weights can't be downloaded here, and speed does not depend on their values: random ones time the same.
"""
import json
from pathlib import Path

import torch

UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 9, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TEXT = {
    "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "projection_dim": 768, "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2,
}


def write_sd15_random(folder: Path, in_channels: int = 9, seed: int = 0) -> Path:
    """The tiny model's tokenizer and scheduler with full-size random UNet, VAE and text encoder (needs diffusers)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from worker.inference.model.tiny import write_tiny_model

    folder = write_tiny_model(Path(folder), in_channels=in_channels, seed=seed)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_config({**UNET, "in_channels": in_channels})
    vae = diffusers.AutoencoderKL.from_config(VAE)
    _scale_down(unet)
    _scale_down(vae)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    CLIPTextModel(CLIPTextConfig(**TEXT)).save_pretrained(folder / "text_encoder", safe_serialization=True)
    (folder / "benchmark.json").write_text(json.dumps({"architecture": "sd15-inpainting", "weights": "random"}))
    return folder


@torch.no_grad()
def _scale_down(model: torch.nn.Module) -> None:
    # Default inits make activations grow through 20+ residual blocks; smaller weights keep fp16 finite.
    for p in model.parameters():
        if p.ndim > 1:
            p.mul_(0.5)
