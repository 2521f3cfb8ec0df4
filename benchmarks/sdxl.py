"""The SDXL inpainting architecture with random weights, for the benchmarks and the full-size architecture test.

Weights can't be downloaded here, and speed does not depend on their values. The UNet alone is 2.6 B parameters
(10 GB in float32), more than a shared 24 GB machine can hold twice: the models are built on the meta device, given
storage in the target dtype (bfloat16 on the CPU) and filled from a pool of random numbers without running their
initialisers (drawing 2.6 B numbers takes minutes on 2 cores); diffusers' modules are made first, and ours take the
very same tensors (assign=True), so both sides share one copy of the weights.
"""
import torch

POOL_SIZE = 1 << 24  # random values drawn once; each tensor takes a window of them at a random offset

# diffusers/stable-diffusion-xl-1.0-inpainting-0.1's unet/config.json.
UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.21.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 9, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
# The SDXL VAE's vae/config.json (SD1.5's architecture; another scaling factor, and float16 overflows in it).
VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# text_encoder (CLIP ViT-L/14) and text_encoder_2 (OpenCLIP ViT-bigG/14, with its projection).
TEXT = dict(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072, num_attention_heads=12,
            num_hidden_layers=12, projection_dim=768, vocab_size=49408, max_position_embeddings=77)
TEXT_2 = dict(hidden_act="gelu", hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
              num_hidden_layers=32, projection_dim=1280, vocab_size=49408, max_position_embeddings=77)
UNET_PARAMETERS = 2_567_478_084  # diffusers counts the same on the meta device (tests/test_model_components.py)


def materialize(build, dtype: torch.dtype, seed: int, device="cpu") -> torch.nn.Module:
    """`build()` on the meta device, then storage in `dtype` on `device` filled by `randomize_`."""
    with torch.device("meta"):
        module = build()
    module = module.to(dtype).to_empty(device=device)
    randomize_(module, seed)
    return module.eval().requires_grad_(False)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, gain: float = 0.5) -> None:
    """Weights of standard deviation gain/sqrt(fan_in) (below 1, so that random residual branches don't amplify
    rounding through 70 transformer layers), norm scales near 1, biases near 0; position ids (the only buffers these
    models have: CLIP's) as the initialiser sets them."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL_SIZE, generator=gen)
    for name, param in module.named_parameters():
        param.copy_(_window(pool, param.numel(), gen).view(param.shape))  # in place, in the parameter's dtype
        if param.ndim == 1:
            param.mul_(0.02).add_(1.0 if name.endswith("weight") else 0.0)
        else:
            param.mul_(gain / param[0].numel() ** 0.5)
    for name, buffer in module.named_buffers():
        if not name.endswith("position_ids"):
            raise ValueError(f"randomize_: no rule for buffer {name}")
        buffer.copy_(torch.arange(buffer.shape[-1]).expand(buffer.shape))

def _window(pool: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n pool values from a random offset (the pool repeated for tensors larger than it)."""
    offset = int(torch.randint(pool.numel(), (), generator=gen))
    return pool.repeat(-(-(offset + n) // pool.numel()))[offset:offset + n] if offset + n > pool.numel() \
        else pool[offset:offset + n]
