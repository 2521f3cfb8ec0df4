"""The UNet2DConditionModel of SD1.5 and SDXL, compact.

Built from a diffusers `unet/config.json`; every attribute name equals the diffusers state-dict key, so a diffusers
checkpoint loads with `load_state_dict(sd, strict=True)` and no renaming. Attention goes through
`kernels.attention` and every GroupNorm through `kernels.group_norm` (fused with the SiLU that follows it).
SDXL's additions are per-block `transformer_layers_per_block` and heads, linear projections and the `text_time`
addition embedding (the pooled text embedding and the micro-conditioning time ids, added to the timestep embedding).
The forward never reads a tensor's value on the host, so it can be captured in a CUDA graph.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
ADDITION_EMBED_TYPES = (None, "text_time")

# diffusers config keys that select architectures we don't implement: accepted only at the value shown.
# A tuple value lists every accepted value.
_UNET_FIXED = {
    "act_fn": "silu", "class_embed_type": None, "num_class_embeds": None, "class_embeddings_concat": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "only_cross_attention": False, "mid_block_only_cross_attention": (None, False),
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "time_embedding_type": "positional",
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "attention_type": "default", "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}
# Keys with no effect on inference (dropout) or only read by block types we don't implement (diffusers passes
# resnet_out_scale_factor to neither DownBlock2D/UpBlock2D nor their CrossAttn variants; addition_embed_type_num_heads
# is read only by addition_embed_type "text").
_UNET_IGNORED = ("dropout", "addition_embed_type_num_heads", "resnet_out_scale_factor")


def _is_accepted(value: Any, accepted: Any) -> bool:
    options = accepted if isinstance(accepted, tuple) else (accepted,)
    values = value if isinstance(value, (list, tuple)) else (value,)  # per-block lists: every entry must match
    return all(v in options for v in values)


def config_from_dict(cls, d: dict, fixed: dict, ignored: tuple = ()):
    """Build the config dataclass `cls` from a diffusers config dict, rejecting what we don't implement."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in fixed:
            if not _is_accepted(value, fixed[key]):
                raise ValueError(f"{cls.__name__}: unsupported {key}={value!r} (supported: {fixed[key]!r})")
        elif key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        else:
            raise ValueError(f"{cls.__name__}: unknown config key {key!r}")
    return cls(**kwargs)


def check_choices(cls_name: str, key: str, values: tuple, allowed: tuple) -> None:
    for value in values:
        if value not in allowed:
            raise ValueError(f"{cls_name}: unsupported {key} entry {value!r} (supported: {', '.join(allowed)})")


def per_block(cls_name: str, key: str, value: int | tuple, n: int) -> tuple[int, ...]:
    """An int or a per-block tuple of ints (diffusers accepts both) as a tuple of length n."""
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"{cls_name}: {key}={value!r} must be a positive int or {n} positive ints")
    return values


@dataclass(frozen=True)
class UNetConfig:
    sample_size: int | tuple | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple = 8  # diffusers' naming quirk: the number of heads unless num_attention_heads
    num_attention_heads: int | tuple | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False  # a no-op for us: the attention kernels keep the softmax in float32
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: str | None = None             # "text_time" (SDXL): pooled text + time ids embedding
    addition_time_embed_dim: int | None = None         # sinusoidal channels per time id (SDXL: 256)
    projection_class_embeddings_input_dim: int | None = None  # pooled dim + time ids x addition_time_embed_dim

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return config_from_dict(cls, d, _UNET_FIXED, _UNET_IGNORED)

    def __post_init__(self):
        n = len(self.block_out_channels)
        check_choices("UNetConfig", "down_block_types", self.down_block_types, DOWN_BLOCK_TYPES)
        check_choices("UNetConfig", "up_block_types", self.up_block_types, UP_BLOCK_TYPES)
        check_choices("UNetConfig", "mid_block_type", (self.mid_block_type,), MID_BLOCK_TYPES)
        if not len(self.down_block_types) == len(self.up_block_types) == n:
            raise ValueError(f"UNetConfig: down_block_types, up_block_types and block_out_channels need the same "
                             f"length, got {len(self.down_block_types)}, {len(self.up_block_types)}, {n}")
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            raise ValueError(f"UNetConfig: layers_per_block={self.layers_per_block!r} must be an int >= 1")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError(f"UNetConfig: cross_attention_dim={self.cross_attention_dim!r} must be an int")
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise ValueError("UNetConfig: conv_in_kernel and conv_out_kernel must be odd")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"UNetConfig: downsample_padding={self.downsample_padding!r} must be 0 or 1")
        for channels, heads, _ in zip(self.block_out_channels, self.heads, self.transformer_layers):
            if channels % heads or channels % self.norm_num_groups:
                raise ValueError(f"UNetConfig: block_out_channels entry {channels} must be divisible by its number "
                                 f"of attention heads ({heads}) and by norm_num_groups ({self.norm_num_groups})")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"UNetConfig: unsupported addition_embed_type={self.addition_embed_type!r} (supported: "
                             f"{ADDITION_EMBED_TYPES!r})")
        if self.addition_embed_type == "text_time":
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                value = getattr(self, key)
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"UNetConfig: addition_embed_type 'text_time' needs {key} as a positive int, "
                                     f"got {value!r}")

    @property
    def text_time(self) -> bool:
        """SDXL's addition embedding: the forward then needs text_embeds and time_ids."""
        return self.addition_embed_type == "text_time"

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block."""
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return per_block("UNetConfig", "num_attention_heads/attention_head_dim", heads, len(self.block_out_channels))

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        n, layers = len(self.block_out_channels), self.transformer_layers_per_block
        return per_block("UNetConfig", "transformer_layers_per_block", layers, n)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """`norm` (a parameter holder) applied by the fused kernel, optionally with the SiLU that follows it."""
    return kernels.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, activation)


class Timesteps(nn.Module):
    """Sinusoidal timestep embedding, as diffusers' `get_timestep_embedding` (max_period 10000)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos, self.shift = num_channels, flip_sin_to_cos, downscale_freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, num_channels) float32
        half = self.num_channels // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        freqs = torch.exp(exponent / (half - self.shift))
        angles = timesteps[:, None].float() * freqs[None, :]
        emb = torch.cat([torch.cos(angles), torch.sin(angles)] if self.flip_sin_to_cos
                        else [torch.sin(angles), torch.cos(angles)], dim=-1)
        return F.pad(emb, (0, 1)) if self.num_channels % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float,
                 output_scale_factor: float = 1.0):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, C_in, H, W); temb (B, T), already through SiLU (the UNet applies it once for all blocks)
        h = self.conv1(group_norm(self.norm1, x, "silu"))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(group_norm(self.norm2, h, "silu"))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:  # diffusers pads right and bottom only (the VAE's convention)
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # size: the matching skip's (H, W), which differs from 2x when an input side was odd
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, N, H*D) -> (B, H, N, D), a strided view


class Attention(nn.Module):
    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 bias: bool = False):
        super().__init__()
        inner_dim, context_dim = heads * dim_head, cross_attention_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, N, C); context (B, M, C_ctx), None for self-attention
        context = x if context is None else context
        q, k, v = (split_heads(t, self.heads) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = kernels.attention(q, k, v)  # (B, H, N, D)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.1 is diffusers' dropout: kept so the output projection's key stays ff.net.2
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim, eps)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim)
        self.norm3 = nn.LayerNorm(dim, eps)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # x (B, N, dim)
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    def __init__(self, channels: int, heads: int, num_layers: int, config: UNetConfig):
        super().__init__()
        self.use_linear_projection = config.use_linear_projection
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        if config.use_linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, config.cross_attention_dim, config.norm_eps)
            for _ in range(num_layers))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = group_norm(self.norm, x)
        if self.use_linear_projection:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
        for block in self.transformer_blocks:
            h = block(h, context)  # (B, H*W, C)
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)
        else:
            h = self.proj_out(h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous())
        return h + x


class DownBlock2D(nn.Module):
    """CrossAttnDownBlock2D when `cross_attention`, else DownBlock2D."""

    def __init__(self, index: int, config: UNetConfig, cross_attention: bool):
        super().__init__()
        out_ch = config.block_out_channels[index]
        in_ch = config.block_out_channels[max(index - 1, 0)]
        layers = config.layers_per_block
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, config.time_embed_dim, config.norm_num_groups,
                          config.norm_eps) for i in range(layers))
        self.attentions = nn.ModuleList(
            Transformer2DModel(out_ch, config.heads[index], config.transformer_layers[index], config)
            for _ in range(layers if cross_attention else 0))
        last = index == len(config.block_out_channels) - 1
        self.downsamplers = nn.ModuleList([] if last else [Downsample2D(out_ch, config.downsample_padding)])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, skips: list) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions:
                h = self.attentions[i](h, context)
            skips.append(h)
        for downsampler in self.downsamplers:
            h = downsampler(h)
            skips.append(h)
        return h


class UpBlock2D(nn.Module):
    """CrossAttnUpBlock2D when `cross_attention`, else UpBlock2D. `index` counts from the lowest resolution."""

    def __init__(self, index: int, config: UNetConfig, cross_attention: bool):
        super().__init__()
        channels = config.block_out_channels[::-1]
        prev_ch, out_ch, in_ch = channels[max(index - 1, 0)], channels[index], channels[min(index + 1, len(channels) - 1)]
        layers = config.layers_per_block + 1
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_ch if i == 0 else out_ch) + (in_ch if i == layers - 1 else out_ch), out_ch,
                          config.time_embed_dim, config.norm_num_groups, config.norm_eps)
            for i in range(layers))
        self.attentions = nn.ModuleList(
            Transformer2DModel(out_ch, config.heads[::-1][index], config.transformer_layers[::-1][index], config)
            for _ in range(layers if cross_attention else 0))
        last = index == len(channels) - 1
        self.upsamplers = nn.ModuleList([] if last else [Upsample2D(out_ch)])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, skips: list) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            if self.attentions:
                h = self.attentions[i](h, context)
        for upsampler in self.upsamplers:
            h = upsampler(h, skips[-1].shape[-2:])  # the next block's skip sets the size
        return h


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        ch = config.block_out_channels[-1]
        self.resnets = nn.ModuleList(
            ResnetBlock2D(ch, ch, config.time_embed_dim, config.norm_num_groups, config.norm_eps,
                          config.mid_block_scale_factor) for _ in range(2))
        self.attentions = nn.ModuleList(
            [Transformer2DModel(ch, config.heads[-1], config.transformer_layers[-1], config)])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch0 = config.block_out_channels[0]
        self.conv_in = nn.Conv2d(config.in_channels, ch0, config.conv_in_kernel, padding=config.conv_in_kernel // 2)
        self.time_proj = Timesteps(ch0, config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(ch0, config.time_embed_dim)
        if config.text_time:
            self.add_time_proj = Timesteps(config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift)
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim,
                                                   config.time_embed_dim)
        self.down_blocks = nn.ModuleList(
            DownBlock2D(i, config, t == "CrossAttnDownBlock2D") for i, t in enumerate(config.down_block_types))
        self.mid_block = UNetMidBlock2DCrossAttn(config)
        self.up_blocks = nn.ModuleList(
            UpBlock2D(i, config, t == "CrossAttnUpBlock2D") for i, t in enumerate(config.up_block_types))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch0, config.norm_eps)
        self.conv_out = nn.Conv2d(ch0, config.out_channels, config.conv_out_kernel,
                                  padding=config.conv_out_kernel // 2)

    def _check_inputs(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                      text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None):
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample: expected shape (B, {self.config.in_channels}, h, w), got {tuple(sample.shape)}")
        if not torch.is_tensor(timestep) or timestep.numel() not in (1, sample.shape[0]):
            got = tuple(timestep.shape) if torch.is_tensor(timestep) else type(timestep).__name__
            raise ValueError(f"timestep: expected a 0-dim or (B,) tensor on the device, got {got}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != self.config.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states: expected shape (B, N, {self.config.cross_attention_dim}), "
                             f"got {tuple(encoder_hidden_states.shape)}")
        if not self.config.text_time:
            if text_embeds is not None or time_ids is not None:
                raise ValueError("text_embeds, time_ids: this UNet has no text_time addition embedding; pass neither")
            return
        if text_embeds is None or time_ids is None:
            raise ValueError("text_embeds, time_ids: this UNet's text_time addition embedding needs both")
        batch, in_dim = sample.shape[0], self.add_embedding.linear_1.in_features
        if time_ids.ndim != 2 or text_embeds.ndim != 2 or text_embeds.shape[0] != batch or time_ids.shape[0] != batch \
                or text_embeds.shape[1] + time_ids.shape[1] * self.config.addition_time_embed_dim != in_dim:
            raise ValueError(f"text_embeds {tuple(text_embeds.shape)}, time_ids {tuple(time_ids.shape)}: expected "
                             f"(B, P) and (B, T) with B = {batch} and P + T * {self.config.addition_time_embed_dim} "
                             f"= {in_dim}")

    def _add_embedding(self, text_embeds: torch.Tensor, time_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """SDXL: the pooled text embedding and the sinusoidal time ids, embedded as a timestep: (B, time_embed_dim)."""
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)  # (B, T * dim)
        return self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(dtype))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None):
        # sample (B, in_ch, h, w); timestep 0-dim or (B,), on the device; encoder_hidden_states (B, N, D);
        # text_time UNets (SDXL) also take text_embeds (B, P), the pooled prompt, and time_ids (B, 5 or 6)
        self._check_inputs(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = timestep.reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))  # (B, time_embed_dim)
        if self.config.text_time:
            emb = emb + self._add_embedding(text_embeds, time_ids, emb.dtype)
        temb = F.silu(emb)  # every resnet applies SiLU to the embedding first: do it once here
        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb, encoder_hidden_states, skips)
        h = self.mid_block(h, temb, encoder_hidden_states)
        for block in self.up_blocks:
            h = block(h, temb, encoder_hidden_states, skips)
        return self.conv_out(group_norm(self.conv_norm_out, h, "silu"))  # (B, out_ch, h, w)
