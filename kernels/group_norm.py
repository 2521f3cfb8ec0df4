"""Fused GroupNorm (+ SiLU) in Triton, and its torch reference.

GroupNorm normalises each (sample, group) over its C/G channels and all spatial positions, then applies the
per-channel affine and, fused here, the SiLU that follows almost every GroupNorm in SD's UNet and VAE.

Two kernels, each on a (N * G, splits) grid, so that few large groups (VAE: 1 x 32 groups of 4 x 512 x 512)
still spread over all SMs:

1. `_group_stats_kernel`: program (group, split) reduces its slice of the group's spatial positions to a
   partial (mean, M2, count), float32, merging tile statistics with Chan's parallel formula: no catastrophic
   cancellation as with a plain sum of squares.
2. `_group_apply_kernel`: program (group, split) combines the group's partials (a few floats, same formula),
   then normalises its slice: y = x * (w * rstd) + (b - mean * w * rstd), SiLU, store in x's dtype. It walks
   the splits in reverse, so that its first reads find in L2 what the stats pass read last.

The input is viewed as (N, C, S) with S the flattened spatial positions. Contiguous NCHW (channel stride S,
position stride 1) and channels_last (channel stride 1, position stride C) are the same kernel with other
strides; tiles are (BLOCK_S, BLOCK_C) and Triton vectorises along whichever axis has stride 1. No copies: the
output is `torch.empty_like(x)`, same layout as the input.

Without a triton install only `group_norm_ref` (bottom of the file) is defined.
"""
import functools

import torch
import torch.nn.functional as F

from kernels._device import launching_on

try:
    import triton
    import triton.language as tl
except ModuleNotFoundError:  # no triton wheel for this platform (e.g. macOS): the torch reference still works
    triton = None

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = (None, "silu")

if triton is not None:
    _TILE_ELEMENTS = 4096  # elements per tile: 16 per thread at 8 warps, enough loads in flight per SM
    _MAX_BLOCK_C = 64
    _MIN_ELEMENTS_PER_PROGRAM = 16384  # below this a program's fixed cost beats the parallelism it adds
    _MAX_SPLITS = 256
    _PROGRAMS_PER_SM = 4

    @triton.jit
    def _group_stats_kernel(X, Partials, stride_xn, stride_xc, stride_xs,
                            GROUPS, S, SPLITS, SPLIT_SIZE, CHANNELS_PER_GROUP: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        group_index, split = tl.program_id(0), tl.program_id(1)  # group_index = sample * GROUPS + group
        sample, group = group_index // GROUPS, group_index % GROUPS
        x_base = X + sample.to(tl.int64) * stride_xn + (group * CHANNELS_PER_GROUP).to(tl.int64) * stride_xc
        s_begin = split * SPLIT_SIZE
        s_end = tl.minimum(s_begin + SPLIT_SIZE, S)

        count = 0.0
        mean = 0.0
        m2 = 0.0
        for c_start in range(0, CHANNELS_PER_GROUP, BLOCK_C):
            channels = c_start + tl.arange(0, BLOCK_C)
            for s_start in range(s_begin, s_end, BLOCK_S):
                positions = s_start + tl.arange(0, BLOCK_S)
                mask = (positions[:, None] < s_end) & (channels[None, :] < CHANNELS_PER_GROUP)
                x = tl.load(x_base + positions[:, None] * stride_xs + channels[None, :] * stride_xc,
                            mask=mask, other=0.0).to(tl.float32)
                tile_count = (tl.minimum(BLOCK_S, s_end - s_start)
                              * tl.minimum(BLOCK_C, CHANNELS_PER_GROUP - c_start)).to(tl.float32)
                tile_mean = tl.sum(x) / tile_count
                deviation = tl.where(mask, x - tile_mean, 0.0)
                tile_m2 = tl.sum(deviation * deviation)
                # Chan et al.: merge (count, mean, m2) with the tile's statistics
                total = count + tile_count
                delta = tile_mean - mean
                mean += delta * (tile_count / total)
                m2 += tile_m2 + delta * delta * (count * tile_count / total)
                count = total

        partial = group_index * SPLITS + split
        partials_per_field = tl.num_programs(0) * SPLITS
        tl.store(Partials + partial, mean)
        tl.store(Partials + partials_per_field + partial, m2)
        tl.store(Partials + 2 * partials_per_field + partial, count)

    @triton.jit
    def _group_apply_kernel(X, Out, Weight, Bias, Partials,
                            stride_xn, stride_xc, stride_xs, stride_on, stride_oc, stride_os,
                            GROUPS, S, SPLITS, SPLIT_SIZE, eps, CHANNELS_PER_GROUP: tl.constexpr,
                            AFFINE: tl.constexpr, APPLY_SILU: tl.constexpr,
                            BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        # Splits in reverse: the stats pass read the last splits last, so the first ones here still hit L2.
        group_index, split = tl.program_id(0), SPLITS - 1 - tl.program_id(1)
        sample, group = group_index // GROUPS, group_index % GROUPS

        # Combine the group's partial statistics (every program of the group does this; it is a few floats).
        splits = tl.arange(0, BLOCK_SPLITS)
        split_mask = splits < SPLITS
        partials_per_field = tl.num_programs(0) * SPLITS
        partial = Partials + group_index * SPLITS + splits
        means = tl.load(partial, mask=split_mask, other=0.0)
        m2s = tl.load(partial + partials_per_field, mask=split_mask, other=0.0)
        counts = tl.load(partial + 2 * partials_per_field, mask=split_mask, other=0.0)
        total = tl.sum(counts)
        mean = tl.sum(counts * means) / total
        deviation = means - mean
        variance = tl.sum(m2s + counts * deviation * deviation) / total  # biased, as torch's GroupNorm
        rstd = 1.0 / tl.sqrt(variance + eps)

        first_channel = group * CHANNELS_PER_GROUP
        x_base = X + sample.to(tl.int64) * stride_xn + first_channel.to(tl.int64) * stride_xc
        out_base = Out + sample.to(tl.int64) * stride_on + first_channel.to(tl.int64) * stride_oc
        s_begin = split * SPLIT_SIZE
        s_end = tl.minimum(s_begin + SPLIT_SIZE, S)
        for c_start in range(0, CHANNELS_PER_GROUP, BLOCK_C):
            channels = c_start + tl.arange(0, BLOCK_C)
            channel_mask = channels < CHANNELS_PER_GROUP
            # Fold normalisation and affine into one multiply-add per element.
            scale = tl.zeros((BLOCK_C,), dtype=tl.float32) + rstd
            shift = -mean * scale
            if AFFINE:
                weight = tl.load(Weight + first_channel + channels, mask=channel_mask, other=0.0).to(tl.float32)
                bias = tl.load(Bias + first_channel + channels, mask=channel_mask, other=0.0).to(tl.float32)
                scale = scale * weight
                shift = bias - mean * scale
            for s_start in range(s_begin, s_end, BLOCK_S):
                positions = s_start + tl.arange(0, BLOCK_S)
                mask = (positions[:, None] < s_end) & channel_mask[None, :]
                x = tl.load(x_base + positions[:, None] * stride_xs + channels[None, :] * stride_xc,
                            mask=mask, other=0.0).to(tl.float32)
                y = x * scale[None, :] + shift[None, :]
                if APPLY_SILU:
                    y = y * tl.sigmoid(y)
                tl.store(out_base + positions[:, None] * stride_os + channels[None, :] * stride_oc,
                         y.to(Out.dtype.element_ty), mask=mask)

    # triton.jit chose at import: the interpreter (TRITON_INTERPRET=1, CPU tensors) or compiled GPU code.
    INTERPRETED = not isinstance(_group_stats_kernel, triton.runtime.JITFunction)
    launches = 0  # Triton GroupNorm launches in this process (tests use it to prove the kernel ran)

    def group_norm_triton(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None, eps: float = 1e-5, activation: str | None = None,
                          *, out: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
        """F.group_norm (+ F.silu) for x (N, C, *spatial), contiguous or channels_last.

        `out`, when given, receives the result (same shape and dtype, any layout whose spatial dims merge);
        otherwise it is `torch.empty_like(x)`, x's layout. `splits` sets how many programs share one group's
        reduction (default: enough to give every SM a few programs).
        """
        global launches
        _check_group_norm_inputs(x, num_groups, weight, bias, eps, activation, out, splits)
        out = torch.empty_like(x) if out is None else out
        if x.numel() == 0:
            return out
        batch, channels = x.shape[:2]
        channels_per_group = channels // num_groups
        x_strides, out_strides = _as_nc_s_strides(x, "x"), _as_nc_s_strides(out, "out")
        positions = x.numel() // (batch * channels)

        if splits is None:
            splits = _default_splits(x.device, batch * num_groups, channels_per_group * positions)
        block_c, block_s, split_size, splits = split_plan(channels_per_group, positions, splits)

        if weight is None and bias is not None:
            weight = torch.ones_like(bias)
        if bias is None and weight is not None:
            bias = torch.zeros_like(weight)
        affine = weight is not None

        grid = (batch * num_groups, splits)
        partials = torch.empty((3, batch * num_groups, splits), device=x.device, dtype=torch.float32)
        with launching_on(x):
            _group_stats_kernel[grid](
                x, partials, *x_strides, num_groups, positions, splits, split_size,
                CHANNELS_PER_GROUP=channels_per_group, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=8)
            _group_apply_kernel[grid](
                x, out, weight, bias, partials, *x_strides, *out_strides,
                num_groups, positions, splits, split_size, float(eps), CHANNELS_PER_GROUP=channels_per_group,
                AFFINE=affine, APPLY_SILU=activation == "silu", BLOCK_SPLITS=triton.next_power_of_2(splits),
                BLOCK_C=block_c, BLOCK_S=block_s, num_warps=8)
        launches += 1
        return out

    def split_plan(channels_per_group: int, positions: int, splits: int) -> tuple[int, int, int, int]:
        """Tile shape and how a group's positions are cut: (BLOCK_C, BLOCK_S, positions per split, splits)."""
        positions_per_split = triton.cdiv(positions, min(splits, positions))
        block_c = min(triton.next_power_of_2(channels_per_group), _MAX_BLOCK_C)
        block_s = max(16, min(_TILE_ELEMENTS // block_c, triton.next_power_of_2(positions_per_split)))
        # Whole tiles per split, then recount, so that no split is left empty.
        split_size = triton.cdiv(positions_per_split, block_s) * block_s
        return block_c, block_s, split_size, triton.cdiv(positions, split_size)

    @functools.cache
    def _multiprocessors(device: torch.device) -> int:
        if device.type != "cuda":
            return 1  # the interpreter runs programs one after another: no SMs to fill
        return torch.cuda.get_device_properties(device).multi_processor_count

    def _default_splits(device: torch.device, groups_total: int, group_elements: int) -> int:
        """Enough programs per group to give each SM a few, yet each program a worthwhile slice."""
        wanted = triton.cdiv(_PROGRAMS_PER_SM * _multiprocessors(device), groups_total)
        worthwhile = triton.cdiv(group_elements, _MIN_ELEMENTS_PER_PROGRAM)
        return max(1, min(wanted, worthwhile, _MAX_SPLITS))

    def _as_nc_s_strides(t: torch.Tensor, name: str) -> tuple[int, int, int]:
        """(sample, channel, position) strides of t seen as (N, C, S); the spatial dims must merge into one."""
        spatial = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:]) if size != 1]
        for (_, outer_stride), (inner_size, inner_stride) in zip(spatial, spatial[1:]):
            if outer_stride != inner_size * inner_stride:
                raise ValueError(f"group_norm: {name} (shape {tuple(t.shape)}, strides {t.stride()}) must be "
                                 "contiguous or channels_last: its spatial dims do not merge into one")
        return t.stride(0), t.stride(1), spatial[-1][1] if spatial else 1

    def _check_group_norm_inputs(x, num_groups, weight, bias, eps, activation, out, splits):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"group_norm: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"group_norm: x must be (N, C, *spatial), got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"group_norm: x has dtype {x.dtype}; supported: float16, bfloat16, float32")
        if x.device.type != "cuda" and not INTERPRETED:
            raise RuntimeError(f"group_norm: Triton needs CUDA tensors (got {x.device}); on a CPU, set "
                               "TRITON_INTERPRET=1 before importing kernels")
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"group_norm: num_groups must be a positive int, got {num_groups!r}")
        if x.shape[1] % num_groups:
            raise ValueError(f"group_norm: channels ({x.shape[1]}) must be divisible by num_groups ({num_groups})")
        for name, param in (("weight", weight), ("bias", bias)):
            if param is None:
                continue
            if not isinstance(param, torch.Tensor) or param.shape != (x.shape[1],):
                raise ValueError(f"group_norm: {name} must be a tensor of shape ({x.shape[1]},), got "
                                 f"{tuple(param.shape) if isinstance(param, torch.Tensor) else type(param).__name__}")
            if param.device != x.device:
                raise ValueError(f"group_norm: {name} is on {param.device}, x on {x.device}")
            if not param.is_floating_point() or not param.is_contiguous():
                raise ValueError(f"group_norm: {name} must be a contiguous floating-point tensor")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"group_norm: eps must be a non-negative Python float, got {eps!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"group_norm: activation must be None or 'silu', got {activation!r}")
        if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
            raise ValueError(f"group_norm: out must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                             f"({tuple(out.shape)}, {out.dtype}, {out.device})")
        if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
            raise ValueError(f"group_norm: splits must be a positive int, got {splits!r}")

    # One opaque op for torch.compile and CUDA-graph capture; the fake gives the output's shape and layout.
    @torch.library.custom_op("inpaint::group_norm", mutates_args=())
    def group_norm_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float = 1e-5, activation: str | None = None) -> torch.Tensor:
        return group_norm_triton(x, num_groups, weight, bias, eps, activation)

    @group_norm_op.register_fake
    def _group_norm_fake(x, num_groups, weight, bias, eps=1e-5, activation=None):
        return torch.empty_like(x)


def group_norm_ref(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, activation: str | None = None) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: activation must be None or 'silu', got {activation!r}")
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y, inplace=True) if activation == "silu" else y  # y is ours: no second activation-sized write
