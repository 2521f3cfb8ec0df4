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


def sharing(reference: torch.nn.Module, build) -> torch.nn.Module:
    """`build()` (our module) on the meta device, then given `reference`'s very tensors: no copy, strict names."""
    with torch.device("meta"):
        module = build()
    module.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return module.eval().requires_grad_(False)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Weights of variance 1/fan_in (activations keep their scale), norm scales near 1, biases near 0; position ids
    (the only buffers these models have: CLIP's) as the initialiser sets them."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL_SIZE, generator=gen)
    for name, param in module.named_parameters():
        noise = _window(pool, param.numel(), gen).view(param.shape)
        if param.ndim == 1:
            param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.02 * noise)
        else:
            param.copy_(noise / param[0].numel() ** 0.5)
    for name, buffer in module.named_buffers():
        if not name.endswith("position_ids"):
            raise ValueError(f"randomize_: no rule for buffer {name}")
        buffer.copy_(torch.arange(buffer.shape[-1]).expand(buffer.shape))

def _window(pool: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n pool values from a random offset (the pool repeated for tensors larger than it)."""
    offset = int(torch.randint(pool.numel(), (), generator=gen))
    return pool.repeat(-(-(offset + n) // pool.numel()))[offset:offset + n] if offset + n > pool.numel() \
        else pool[offset:offset + n]


def shared_pipelines(folder, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """(our InpaintPipeline, diffusers' StableDiffusionXLInpaintPipeline) on one copy of random full-size weights.

    `folder` receives the tiny model's tokenizers and scheduler config (real tokenizers need a download). The VAE's
    force_upcast is off here so both sides run it in `dtype` on the same tensors.
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from worker.inference.model.loader import ModelComponents, ModelFamily
    from worker.inference.model.text import DualTextEncoder, TextEncoder
    from worker.inference.model.tiny import SDXL_SCHEDULER_CONFIG, write_tiny_model
    from worker.inference.model.unet import UNet2DConditionModel, UNetConfig
    from worker.inference.model.vae import AutoencoderKL, VAEConfig
    from worker.inference.pipeline import InpaintPipeline

    folder = write_tiny_model(folder, family="sdxl")
    vae_config = VAE | {"force_upcast": False}
    theirs = diffusers.StableDiffusionXLInpaintPipeline(
        vae=materialize(lambda: diffusers.AutoencoderKL.from_config(vae_config), dtype, seed),
        text_encoder=materialize(lambda: CLIPTextModel(CLIPTextConfig(**TEXT)), dtype, seed + 1),
        text_encoder_2=materialize(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)), dtype, seed + 2),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        unet=materialize(lambda: diffusers.UNet2DConditionModel.from_config(UNET), dtype, seed + 3),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG), add_watermarker=False)
    theirs.set_progress_bar_config(disable=True)
    text = DualTextEncoder(TextEncoder(theirs.text_encoder, theirs.tokenizer, penultimate=True),
                           TextEncoder(theirs.text_encoder_2, theirs.tokenizer_2, penultimate=True))
    components = ModelComponents(
        unet=sharing(theirs.unet, lambda: UNet2DConditionModel(UNetConfig.from_dict(UNET))),
        vae=sharing(theirs.vae, lambda: AutoencoderKL(VAEConfig.from_dict(vae_config))),
        text_encoder=text, scheduler_config=SDXL_SCHEDULER_CONFIG, path=folder, device=torch.device("cpu"),
        dtype=dtype, family=ModelFamily("sdxl", force_zeros_for_empty_prompt=True))
    return InpaintPipeline(components), theirs


def write_sdxl_random(folder, dtype: torch.dtype = torch.float16, seed: int = 0):
    """The tiny SDXL model's tokenizers and scheduler with full-size random UNet, VAE and text encoders, saved in
    the diffusers layout in `dtype` (5.2 GB in float16), for the GPU pipeline benchmark."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from worker.inference.model.tiny import write_tiny_model

    folder = write_tiny_model(folder, family="sdxl")
    builds = {"unet": lambda: diffusers.UNet2DConditionModel.from_config(UNET),
              "vae": lambda: diffusers.AutoencoderKL.from_config(VAE),
              "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**TEXT)),
              "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2))}
    for offset, (name, build) in enumerate(builds.items()):
        module = materialize(build, dtype, seed + offset)
        module.save_pretrained(folder / name, safe_serialization=True)
        del module  # one full-size module in memory at a time
    return folder
