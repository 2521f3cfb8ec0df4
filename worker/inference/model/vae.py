"""SD1.5's AutoencoderKL, compact.

Built from a diffusers `vae/config.json`; attribute names equal the diffusers state-dict keys. `encode` returns the
latent Gaussian's (mean, std) and never samples: the pipeline draws the noise itself, on CPU generators.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

import kernels
from .unet import Attention, Downsample2D, ResnetBlock2D, Upsample2D, check_choices, config_from_dict, group_norm

EPS = 1e-6  # every VAE norm uses diffusers' resnet_eps of 1e-6

# diffusers config keys we accept only at the value shown: others need scaling rules our pipeline doesn't apply.
_VAE_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None}


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return config_from_dict(cls, d, _VAE_FIXED)

    def __post_init__(self):
        n = len(self.block_out_channels)
        check_choices("VAEConfig", "down_block_types", self.down_block_types, ("DownEncoderBlock2D",))
        check_choices("VAEConfig", "up_block_types", self.up_block_types, ("UpDecoderBlock2D",))
        if not len(self.down_block_types) == len(self.up_block_types) == n:
            raise ValueError(f"VAEConfig: down_block_types, up_block_types and block_out_channels need the same "
                             f"length, got {len(self.down_block_types)}, {len(self.up_block_types)}, {n}")
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            raise ValueError(f"VAEConfig: layers_per_block={self.layers_per_block!r} must be an int >= 1")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"VAEConfig: block_out_channels {self.block_out_channels} must all be divisible by "
                             f"norm_num_groups ({self.norm_num_groups})")


class SpatialSelfAttention(Attention):
    """The mid block's single-head attention over all pixels, with its own GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, C, H, W)
        B, C, H, W = x.shape
        h = group_norm(self.group_norm, x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, H*W, C)
        out = self.to_out[0](kernels.attention(q, k, v).squeeze(1))
        return out.transpose(1, 2).reshape(B, C, H, W) + x


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, None, groups, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if add_attention else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h)
        for attention in self.attentions:
            h = attention(h)
        return self.resnets[1](h)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, EPS) for i in range(num_layers))
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)] if add_downsample else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.downsamplers):
            h = layer(h)
        return h


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, EPS) for i in range(num_layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if add_upsample else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.upsamplers):
            h = layer(h)
        return h


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups, n = config.block_out_channels, config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, i < n - 1)
            for i in range(n))
        self.mid_block = UNetMidBlock2D(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 2 * latent, H / f, W / f)
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(group_norm(self.conv_norm_out, h, "silu"))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups, n = config.block_out_channels[::-1], config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(channels[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups, i < n - 1)
            for i in range(n))
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], EPS)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, latent, h, w) -> (B, 3, h * f, w * f)
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(group_norm(self.conv_norm_out, h, "silu"))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        moments = 2 * config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(config.latent_channels, config.latent_channels, 1)
                                if config.use_post_quant_conv else None)

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [-1, 1] -> (mean, std) of the unscaled latent Gaussian, each (B, latent, H/f, W/f)."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x: expected shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        # As diffusers' DiagonalGaussianDistribution: the clamp keeps exp() finite for untrained or odd inputs.
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent, h, w) unscaled latents -> (B, out_channels, h*f, w*f), roughly in [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"z: expected shape (B, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
