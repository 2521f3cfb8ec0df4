"""Our Triton kernels vs PyTorch's at SD1.5's real shapes, on a CUDA GPU.

- attention: ours vs F.scaled_dot_product_attention on its flash backend, float16, inputs laid out as the UNet
  makes them ((B, N, H*D) projections split into heads), batch 2 (classifier-free guidance), 512² and 768²;
- GroupNorm + SiLU: ours vs eager F.group_norm + F.silu, the UNet's maps (batch 2) and the VAE decoder's;
- the whole UNet step (worker.model.unet, SD1.5 inpainting config, random weights, float16) with
  INPAINT_KERNELS=triton vs torch.

Medians from triton.testing.do_bench. TFLOP/s and GB/s are set against peaks measured here: a large bfloat16
matmul and a large device-to-device copy. GroupNorm bytes are the minimum traffic (read x once, write y once).
Targets (H100): attention >= 1.0x SDPA at every shape; GroupNorm+SiLU >= 80% of copy bandwidth and >= 2x eager.

    python -m benchmarks.kernels [--out results.md] [--skip-unet]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ATTENTION_SHAPES = {  # resolution -> (B, H, Nq, Nk, D): self- then cross-attention at each UNet level
    512: [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
          (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 8, 64, 64, 160), (2, 8, 64, 77, 160)],
    768: [(2, 8, 9216, 9216, 40), (2, 8, 9216, 77, 40), (2, 8, 2304, 2304, 80), (2, 8, 2304, 77, 80),
          (2, 8, 576, 576, 160), (2, 8, 576, 77, 160), (2, 8, 144, 144, 160), (2, 8, 144, 77, 160)],
}
GROUP_NORM_SHAPES = [  # (N, C, H, W), 32 groups: UNet at 512² (batch 2), UNet at 768², VAE decoder at 512²
    (2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8), (2, 960, 64, 64), (2, 1920, 16, 16),
    (2, 320, 96, 96), (2, 640, 48, 48), (2, 1280, 24, 24),
    (1, 512, 64, 64), (1, 512, 128, 128), (1, 256, 256, 256), (1, 128, 512, 512),
]
GROUPS = 32


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def measure_peaks() -> tuple[float, float]:
    """(TFLOP/s of a large bfloat16 matmul, GB/s of a large device copy counting read + write)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tflops = 2 * 8192 ** 3 / median_ms(lambda: a @ b) / 1e9
    src = torch.empty(2 ** 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    gbps = 2 * src.numel() / median_ms(lambda: dst.copy_(src)) / 1e6
    return tflops, gbps


def projected_qkv(batch, heads, n_q, n_kv, head_dim):
    def split_heads(n):
        return torch.randn(batch, n, heads * head_dim, device="cuda", dtype=torch.float16).view(
            batch, n, heads, head_dim).transpose(1, 2)
    return split_heads(n_q), split_heads(n_kv), split_heads(n_kv)


def bench_attention(peak_tflops: float) -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import attention_triton
    rows = ["| resolution | B, H, Nq, Nk, D | ours ms | SDPA flash ms | speed-up | ours TFLOP/s | % of matmul peak |",
            "|---|---|---|---|---|---|---|"]
    for resolution, shapes in ATTENTION_SHAPES.items():
        for shape in shapes:
            batch, heads, n_q, n_kv, head_dim = shape
            q, k, v = projected_qkv(*shape)
            ours = median_ms(lambda: attention_triton(q, k, v))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                theirs = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
            tflops = 4 * batch * heads * n_q * n_kv * head_dim / ours / 1e9
            rows.append(f"| {resolution}² | {', '.join(map(str, shape))} | {ours:.4f} | {theirs:.4f} | "
                        f"{theirs / ours:.2f}x | {tflops:.1f} | {100 * tflops / peak_tflops:.0f}% |")
    return rows


def bench_group_norm(peak_gbps: float) -> list[str]:
    from kernels.group_norm import group_norm_triton
    rows = ["| N, C, H, W | layout | ours ms | eager ms | speed-up | ours GB/s | % of copy peak |",
            "|---|---|---|---|---|---|---|"]
    for shape in GROUP_NORM_SHAPES:
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape, device="cuda", dtype=torch.float16).to(memory_format=layout)
            weight = torch.randn(shape[1], device="cuda", dtype=torch.float16)
            bias = torch.randn(shape[1], device="cuda", dtype=torch.float16)
            ours = median_ms(lambda: group_norm_triton(x, GROUPS, weight, bias, 1e-5, "silu"))
            eager = median_ms(lambda: F.silu(F.group_norm(x, GROUPS, weight, bias, 1e-5)))
            gbps = 2 * x.numel() * x.element_size() / ours / 1e6
            name = "NCHW" if layout == torch.contiguous_format else "channels_last"
            rows.append(f"| {', '.join(map(str, shape))} | {name} | {ours:.4f} | {eager:.4f} | {eager / ours:.2f}x | "
                        f"{gbps:.0f} | {100 * gbps / peak_gbps:.0f}% |")
    return rows


def bench_unet() -> list[str]:
    import kernels
    from sd15 import UNET
    from worker.model.unet import UNet2DConditionModel, UNetConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig.from_dict(UNET)).to("cuda", torch.float16).eval()
    rows = ["| UNet step (SD1.5 inpainting, fp16, batch 2) | kernels=triton ms | kernels=torch ms | speed-up |",
            "|---|---|---|---|"]
    for size in (512, 768):
        sample = torch.randn(2, UNET["in_channels"], size // 8, size // 8, device="cuda", dtype=torch.float16)
        timestep = torch.tensor(500, device="cuda")
        context = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
        timings = {}
        for mode in ("triton", "torch"):
            with kernels.use_kernels(mode), torch.inference_mode():
                timings[mode] = median_ms(lambda: unet(sample, timestep, context))
        rows.append(f"| {size}² | {timings['triton']:.2f} | {timings['torch']:.2f} | "
                    f"{timings['torch'] / timings['triton']:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the tables here, as markdown")
    parser.add_argument("--skip-unet", action="store_true", help="kernels only, no whole-UNet timing")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (the Triton kernels are timed on the device); "
                 "tests/test_kernels.py checks them on a CPU through Triton's interpreter")

    peak_tflops, peak_gbps = measure_peaks()
    lines = [f"# Kernels on {torch.cuda.get_device_name()}", "",
             f"Measured peaks: bf16 matmul {peak_tflops:.0f} TFLOP/s, device copy {peak_gbps:.0f} GB/s.", "",
             "## Attention (float16)", "", *bench_attention(peak_tflops), "",
             "## GroupNorm + SiLU (float16, 32 groups)", "", *bench_group_norm(peak_gbps), ""]
    if not args.skip_unet:
        lines += ["## Whole UNet step", "", *bench_unet(), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
