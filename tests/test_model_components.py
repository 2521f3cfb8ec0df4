"""Our UNet and VAE against diffusers' (the parity oracle): same parameter names and shapes, same outputs."""
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel as DiffusersUNet

from benchmarks import sdxl

from worker.inference.model.unet import Attention, UNet2DConditionModel, UNetConfig
from worker.inference.model.vae import AutoencoderKL, VAEConfig

# Public stable-diffusion-v1-5/stable-diffusion-inpainting unet/config.json and vae/config.json.
SD15_INPAINT_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0.dev0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 9, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

TINY_UNETS = {
    "inpaint-9ch-conv-proj": dict(
        in_channels=9, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "plain-4ch-linear-proj": dict(
        in_channels=4, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=48, norm_num_groups=32,
        attention_head_dim=(2, 4), transformer_layers_per_block=2, use_linear_projection=True,
        flip_sin_to_cos=False, freq_shift=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    "three-blocks-scaled": dict(
        in_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1, cross_attention_dim=24, norm_num_groups=8,
        attention_head_dim=8, center_input_sample=True, mid_block_scale_factor=1.4142, resnet_out_scale_factor=0.9,
        downsample_padding=0, time_embedding_dim=40,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}
# SDXL's features at a tiny size: text_time addition embedding, per-block heads and transformer depths, linear
# projections, cross-attention over two encoders' widths.
TINY_SDXL_UNET = dict(
    in_channels=9, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=64, norm_num_groups=32,
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 3), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
TINY_VAES = {
    "two-blocks": dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4),
    "three-blocks-no-mid-attention": dict(
        block_out_channels=(32, 32, 64), norm_num_groups=32, layers_per_block=2, latent_channels=4,
        mid_block_add_attention=False),
}


# Max abs difference / max abs value after the full SDXL UNet in bfloat16 with random weights: the two sides round
# differently (measured 0.034; a 1% change of the text embeddings moves diffusers' own output by 0.028).
BF16_TOLERANCE = 0.06


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter so norms' weights and biases are not their trivial 1 and 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def ours_from(reference: torch.nn.Module, model_cls, config_cls) -> torch.nn.Module:
    """Our model built on the meta device from the reference's own config, then loaded with its weights."""
    config = config_cls.from_dict(dict(reference.config))
    with torch.device("meta"):
        model = model_cls(config)
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return model.eval()


@pytest.mark.parametrize("name", TINY_UNETS)
def test_unet_matches_diffusers(name):
    torch.manual_seed(0)
    reference = randomized(DiffusersUNet(sample_size=8, **TINY_UNETS[name]), seed=1)
    ours = ours_from(reference, UNet2DConditionModel, UNetConfig)
    gen = torch.Generator().manual_seed(2)
    in_ch, ctx_dim = reference.config.in_channels, reference.config.cross_attention_dim
    # Odd latent sides exercise the upsample-to-skip-size path.
    sample, context = torch.randn(2, in_ch, 9, 12, generator=gen), torch.randn(2, 77, ctx_dim, generator=gen)
    with torch.no_grad():
        for timestep in (torch.tensor(981), torch.tensor([1.5, 640.0])):
            expected = reference(sample, timestep, encoder_hidden_states=context).sample
            got = ours(sample, timestep, context)
            assert got.shape == expected.shape == (2, reference.config.out_channels, 9, 12)
            assert rel_error(got, expected) < 1e-5


def test_text_time_unet_matches_diffusers():
    torch.manual_seed(0)
    reference = randomized(DiffusersUNet(sample_size=8, **TINY_SDXL_UNET), seed=6)
    ours = ours_from(reference, UNet2DConditionModel, UNetConfig)
    assert ours.config.text_time and ours.config.transformer_layers == (1, 3)
    gen = torch.Generator().manual_seed(7)
    sample, context = torch.randn(2, 9, 9, 12, generator=gen), torch.randn(2, 77, 64, generator=gen)
    text_embeds = torch.randn(2, 32, generator=gen)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 16.0, 8.0, 720.0, 480.0]])
    with torch.no_grad():
        for timestep in (torch.tensor(981), torch.tensor([1.5, 640.0])):
            expected = reference(sample, timestep, encoder_hidden_states=context,
                                 added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
            got = ours(sample, timestep, context, text_embeds=text_embeds, time_ids=time_ids)
            assert rel_error(got, expected) < 1e-5
        # The conditioning is used: other time ids give another output.
        other = ours(sample, torch.tensor(981), context, text_embeds=text_embeds, time_ids=time_ids.flip(0))
        assert rel_error(other, got) > 1e-3


def test_num_attention_heads_overrides_attention_head_dim():
    torch.manual_seed(0)
    config = TINY_UNETS["inpaint-9ch-conv-proj"] | {"attention_head_dim": 4}
    reference = randomized(DiffusersUNet(**config), seed=3)
    ours_config = UNetConfig.from_dict(dict(reference.config) | {"attention_head_dim": 16, "num_attention_heads": 4})
    ours = UNet2DConditionModel(ours_config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert ours_config.heads == (4, 4)
    sample, context = torch.randn(1, 9, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = reference(sample, torch.tensor(10), encoder_hidden_states=context).sample
        assert rel_error(ours(sample, torch.tensor(10), context), expected) < 1e-5


@pytest.mark.parametrize("name", TINY_VAES)
def test_vae_matches_diffusers(name):
    torch.manual_seed(0)
    blocks = len(TINY_VAES[name]["block_out_channels"])
    reference = randomized(DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * blocks,
                                        up_block_types=("UpDecoderBlock2D",) * blocks, **TINY_VAES[name]), seed=4)
    ours = ours_from(reference, AutoencoderKL, VAEConfig)
    assert ours.scale_factor == 2 ** (blocks - 1)
    gen = torch.Generator().manual_seed(5)
    pixels = torch.rand(2, 3, 24, 20, generator=gen) * 2 - 1
    latents = torch.randn(2, 4, 5, 6, generator=gen)
    with torch.no_grad():
        mean, std = ours.encode(pixels)
        dist = reference.encode(pixels).latent_dist
        assert rel_error(mean, dist.mean) < 1e-5 and rel_error(std, dist.std) < 1e-5
        decoded = ours.decode(latents)
        assert decoded.shape == (2, 3, 5 * ours.scale_factor, 6 * ours.scale_factor)
        assert rel_error(decoded, reference.decode(latents).sample) < 1e-5


def shapes(model: torch.nn.Module) -> dict:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def test_sd15_inpainting_unet_builds_on_meta_with_diffusers_names():
    config = UNetConfig.from_dict(SD15_INPAINT_UNET)
    with torch.device("meta"):
        ours = UNet2DConditionModel(config)
        reference = DiffusersUNet(**{k: v for k, v in SD15_INPAINT_UNET.items() if not k.startswith("_")})
    assert shapes(ours) == shapes(reference)
    params = sum(p.numel() for p in ours.parameters())
    assert params == sum(p.numel() for p in reference.parameters())
    assert 859.4e6 < params < 859.6e6
    assert config.heads == (8, 8, 8, 8) and ours.config.in_channels == 9


def test_sd15_vae_builds_on_meta_with_diffusers_names():
    config = VAEConfig.from_dict(SD15_VAE)
    with torch.device("meta"):
        ours = AutoencoderKL(config)
        reference = DiffusersVAE(**{k: v for k, v in SD15_VAE.items() if not k.startswith("_")})
    assert shapes(ours) == shapes(reference)
    params = sum(p.numel() for p in ours.parameters())
    assert params == sum(p.numel() for p in reference.parameters())
    assert 83.6e6 < params < 83.7e6
    assert ours.scale_factor == 8 and config.scaling_factor == 0.18215


def built_on_meta(model_cls, config_cls, reference_cls, config: dict):
    """(ours, diffusers', our config) for a diffusers config dict, on the meta device: no memory, no init."""
    ours_config = config_cls.from_dict(config)
    with torch.device("meta"):
        return model_cls(ours_config), reference_cls.from_config(config), ours_config


def test_sdxl_inpainting_unet_builds_on_meta_with_diffusers_names():
    ours, reference, config = built_on_meta(UNet2DConditionModel, UNetConfig, DiffusersUNet, sdxl.UNET)
    assert shapes(ours) == shapes(reference)
    params = sum(p.numel() for p in ours.parameters())
    assert params == sum(p.numel() for p in reference.parameters()) == sdxl.UNET_PARAMETERS
    assert config.heads == (5, 10, 20) and config.transformer_layers == (1, 2, 10) and config.text_time
    head_dims = {m.to_q.out_features // m.heads for m in ours.modules() if isinstance(m, Attention)}
    assert head_dims == {64}  # SDXL's: every attention, at every level


def test_sdxl_vae_builds_on_meta_with_diffusers_names():
    ours, reference, config = built_on_meta(AutoencoderKL, VAEConfig, DiffusersVAE, sdxl.VAE)
    assert shapes(ours) == shapes(reference)
    assert config.scaling_factor == 0.13025 and config.force_upcast is True


@pytest.mark.slow
def test_full_sdxl_unet_forward_matches_diffusers_in_bfloat16():
    # 2.6 B parameters: diffusers' UNet in bfloat16 (5 GB), ours on the same tensors (assign=True, no copy).
    reference = sdxl.materialize(lambda: DiffusersUNet.from_config(sdxl.UNET), torch.bfloat16, seed=0)
    ours = sdxl.sharing(reference, lambda: UNet2DConditionModel(UNetConfig.from_dict(sdxl.UNET)))
    theirs = reference.state_dict()
    assert all(tensor.data_ptr() == theirs[name].data_ptr() for name, tensor in ours.state_dict().items())
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 9, 8, 12, generator=gen).bfloat16()  # 64x96 pixels: three levels, 8x12 to 2x3
    context = torch.randn(2, 77, 2048, generator=gen).bfloat16()
    text_embeds = torch.randn(2, 1280, generator=gen).bfloat16()
    time_ids = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]] * 2).bfloat16()
    timestep = torch.tensor(500)
    with torch.no_grad():
        expected = reference(sample, timestep, encoder_hidden_states=context,
                             added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample.float()
        got = ours(sample, timestep, context, text_embeds=text_embeds, time_ids=time_ids).float()
        other = ours(sample, timestep, context, text_embeds=text_embeds, time_ids=time_ids * 2).float()
    assert got.shape == (2, 4, 8, 12) and torch.isfinite(got).all()
    assert rel_error(got, expected) < BF16_TOLERANCE
    assert rel_error(other, got) > 5 * BF16_TOLERANCE  # the time ids (addition embedding) matter at this tolerance


@pytest.mark.parametrize("change, message", [
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "down_block_types entry 'SimpleCrossAttnDownBlock2D'"),
    ({"up_block_types": ["AttnUpBlock2D"] * 4}, "up_block_types entry 'AttnUpBlock2D'"),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"addition_embed_type": "text_time"}, "addition_embed_type 'text_time' needs addition_time_embed_dim"),
    ({"addition_embed_type": "text"}, "unsupported addition_embed_type='text'"),
    ({"addition_embed_type": "image"}, "unsupported addition_embed_type='image'"),
    ({"frobnicate": 1}, "unknown config key 'frobnicate'"),
    ({"block_out_channels": [320, 640, 1280]}, "same length"),
    ({"attention_head_dim": [8, 8]}, "num_attention_heads/attention_head_dim"),
    ({"norm_num_groups": 48}, "divisible"),
])
def test_unet_config_rejects_unsupported_values(change, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_dict(SD15_INPAINT_UNET | change)


@pytest.mark.parametrize("change, message", [
    ({"down_block_types": ["DownBlock2D"] * 4}, "down_block_types entry 'DownBlock2D'"),
    ({"up_block_types": ["AttnUpDecoderBlock2D"] * 4}, "up_block_types entry 'AttnUpDecoderBlock2D'"),
    ({"shift_factor": 0.0609}, "shift_factor"),
    ({"norm_num_groups": 24}, "divisible"),
])
def test_vae_config_rejects_unsupported_values(change, message):
    with pytest.raises(ValueError, match=message):
        VAEConfig.from_dict(SD15_VAE | change)


def test_bad_input_shapes_name_the_argument():
    unet = UNet2DConditionModel(UNetConfig.from_dict(TINY_UNETS["inpaint-9ch-conv-proj"]))
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8))
    with pytest.raises(ValueError, match="sample: expected shape"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor(1), torch.randn(1, 77, 32))
    with pytest.raises(ValueError, match="timestep: expected a 0-dim or"):
        unet(torch.randn(2, 9, 8, 8), torch.tensor([1, 2, 3]), torch.randn(2, 77, 32))
    with pytest.raises(ValueError, match="encoder_hidden_states: expected shape"):
        unet(torch.randn(1, 9, 8, 8), torch.tensor(1), torch.randn(1, 77, 768))
    with pytest.raises(ValueError, match="this UNet has no text_time addition embedding"):
        unet(torch.randn(1, 9, 8, 8), torch.tensor(1), torch.randn(1, 77, 32), text_embeds=torch.randn(1, 32),
             time_ids=torch.randn(1, 6))
    sdxl_unet = UNet2DConditionModel(UNetConfig.from_dict(TINY_SDXL_UNET))
    sample, context = torch.randn(1, 9, 8, 8), torch.randn(1, 77, 64)
    with pytest.raises(ValueError, match="needs both"):
        sdxl_unet(sample, torch.tensor(1), context)
    with pytest.raises(ValueError, match=r"P \+ T \* 8 = 80"):
        sdxl_unet(sample, torch.tensor(1), context, text_embeds=torch.randn(1, 32), time_ids=torch.randn(1, 5))
    with pytest.raises(ValueError, match="x: expected shape"):
        vae.encode(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="z: expected shape"):
        vae.decode(torch.randn(1, 3, 4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_unet_forward_captures_in_cuda_graph():
    torch.manual_seed(0)
    device = torch.device("cuda")
    unet = UNet2DConditionModel(UNetConfig.from_dict(TINY_UNETS["inpaint-9ch-conv-proj"])).to(device, torch.float16)
    sample = torch.randn(2, 9, 16, 16, device=device, dtype=torch.float16)
    context = torch.randn(2, 77, 32, device=device, dtype=torch.float16)
    timestep = torch.tensor(500, device=device)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            unet(sample, timestep, context)  # warm-up: compiles kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = unet(sample, timestep, context)
        timestep.fill_(20)
        graph.replay()
        expected = unet(sample, timestep, context)
    torch.cuda.synchronize()
    assert rel_error(captured.float(), expected.float()) < 1e-3
