"""Our Triton kernels vs PyTorch's at SD1.5's real shapes, on a CUDA GPU.

- attention: ours vs F.scaled_dot_product_attention on its flash backend, float16, inputs laid out as the UNet
  makes them ((B, N, H*D) projections split into heads), batch 2 (classifier-free guidance), 512² and 768²;
- GroupNorm + SiLU: ours vs eager F.group_norm + F.silu, the UNet's maps (batch 2) and the VAE decoder's;
- the whole UNet step (worker.inference.model.unet, SD1.5 inpainting config, random weights, float16) with
  INPAINT_KERNELS=triton vs torch.

Medians from triton.testing.do_bench. TFLOP/s and GB/s are set against peaks measured here: a large bfloat16
matmul and a large device-to-device copy. GroupNorm bytes are the minimum traffic (read x once, write y once).
Targets (H100): attention >= 1.0x SDPA at every shape; GroupNorm+SiLU >= 80% of copy bandwidth and >= 2x eager.

--smoke: tiny shapes on the CPU (float32, the Triton interpreter, so TRITON_INTERPRET=1 must be set), the tiny
test UNet, one wall-clock run per timing and CPU peaks, to check the script runs end to end; the numbers mean nothing.

    python -m benchmarks.kernels [--out results.md] [--skip-unet]
    TRITON_INTERPRET=1 python -m benchmarks.kernels --smoke [--out smoke.md]
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.report import Report

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


@dataclass(frozen=True)
class Setup:
    """Where the tables are measured and at which shapes: the real run on a GPU, or the CPU smoke run."""
    title: str
    device: str
    dtype: torch.dtype
    time_ms: Callable[[Callable], float]  # milliseconds per call of a function
    matmul_size: int                      # the peak matmul is (n x n) @ (n x n) in bfloat16
    copy_bytes: int                       # the peak copy moves this many bytes each way
    attention_shapes: dict                # resolution -> [(B, H, Nq, Nk, D)]
    group_norm_shapes: list               # [(N, C, H, W)]
    unet_name: str
    unet_config: dict                     # a diffusers unet/config.json
    unet_sizes: tuple                     # image sides; the UNet sees latents of side // 8


def gpu_median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def wall_clock_ms(fn) -> float:
    """One wall-clock run, for the smoke run: do_bench times with CUDA events, and under the interpreter a
    tiny-UNet step takes ~15 s, too slow to repeat for a median that would mean nothing anyway."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def gpu_setup() -> Setup:
    from benchmarks.sd15 import UNET

    return Setup(title=torch.cuda.get_device_name(), device="cuda", dtype=torch.float16, time_ms=gpu_median_ms,
                 matmul_size=8192, copy_bytes=2 ** 30, attention_shapes=ATTENTION_SHAPES,
                 group_norm_shapes=GROUP_NORM_SHAPES, unet_name="SD1.5 inpainting", unet_config=UNET,
                 unet_sizes=(512, 768))


def smoke_setup() -> Setup:
    from worker.inference.model.tiny import unet_config

    return Setup(title="CPU smoke run (Triton interpreter; the numbers mean nothing)", device="cpu",
                 dtype=torch.float32, time_ms=wall_clock_ms, matmul_size=512, copy_bytes=2 ** 24,
                 attention_shapes={64: [(1, 2, 32, 32, 40), (1, 2, 32, 77, 40)]},
                 group_norm_shapes=[(1, 64, 8, 8)], unet_name="tiny test model", unet_config=unet_config(9),
                 unet_sizes=(64,))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measure_peaks(setup: Setup) -> tuple[float, float]:
    """(TFLOP/s of a large bfloat16 matmul, GB/s of a large device copy counting read + write)."""
    n = setup.matmul_size
    a = torch.randn(n, n, device=setup.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=setup.device, dtype=torch.bfloat16)
    tflops = 2 * n ** 3 / setup.time_ms(lambda: a @ b) / 1e9
    src = torch.empty(setup.copy_bytes, device=setup.device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    gbps = 2 * src.numel() / setup.time_ms(lambda: dst.copy_(src)) / 1e6
    return tflops, gbps


def projected_qkv(setup: Setup, batch, heads, n_q, n_kv, head_dim):
    def split_heads(n):
        return torch.randn(batch, n, heads * head_dim, device=setup.device, dtype=setup.dtype).view(
            batch, n, heads, head_dim).transpose(1, 2)
    return split_heads(n_q), split_heads(n_kv), split_heads(n_kv)


def bench_attention(setup: Setup, peak_tflops: float):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import attention_triton
    yield "| resolution | B, H, Nq, Nk, D | ours ms | SDPA flash ms | speed-up | ours TFLOP/s | % of matmul peak |"
    yield "|---|---|---|---|---|---|---|"
    for resolution, shapes in setup.attention_shapes.items():
        for shape in shapes:
            batch, heads, n_q, n_kv, head_dim = shape
            q, k, v = projected_qkv(setup, *shape)
            ours = setup.time_ms(lambda: attention_triton(q, k, v))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                theirs = setup.time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
            tflops = 4 * batch * heads * n_q * n_kv * head_dim / ours / 1e9
            yield (f"| {resolution}² | {', '.join(map(str, shape))} | {ours:.4f} | {theirs:.4f} | "
                   f"{theirs / ours:.2f}x | {tflops:.1f} | {100 * tflops / peak_tflops:.0f}% |")


def bench_group_norm(setup: Setup, peak_gbps: float):
    from kernels.group_norm import group_norm_triton
    yield "| N, C, H, W | layout | ours ms | eager ms | speed-up | ours GB/s | % of copy peak |"
    yield "|---|---|---|---|---|---|---|"
    for shape in setup.group_norm_shapes:
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape, device=setup.device, dtype=setup.dtype).to(memory_format=layout)
            weight = torch.randn(shape[1], device=setup.device, dtype=setup.dtype)
            bias = torch.randn(shape[1], device=setup.device, dtype=setup.dtype)
            ours = setup.time_ms(lambda: group_norm_triton(x, GROUPS, weight, bias, 1e-5, "silu"))
            eager = setup.time_ms(lambda: F.silu(F.group_norm(x, GROUPS, weight, bias, 1e-5)))
            gbps = 2 * x.numel() * x.element_size() / ours / 1e6
            name = "NCHW" if layout == torch.contiguous_format else "channels_last"
            yield (f"| {', '.join(map(str, shape))} | {name} | {ours:.4f} | {eager:.4f} | {eager / ours:.2f}x | "
                   f"{gbps:.0f} | {100 * gbps / peak_gbps:.0f}% |")


def bench_unet(setup: Setup):
    import kernels
    from worker.inference.model.unet import UNet2DConditionModel, UNetConfig

    torch.manual_seed(0)
    config = setup.unet_config
    unet = UNet2DConditionModel(UNetConfig.from_dict(config)).to(setup.device, setup.dtype).eval()
    yield (f"| UNet step ({setup.unet_name}, {dtype_name(setup.dtype)}, batch 2) | kernels=triton ms | "
           "kernels=torch ms | speed-up |")
    yield "|---|---|---|---|"
    for size in setup.unet_sizes:
        sample = torch.randn(2, config["in_channels"], size // 8, size // 8, device=setup.device, dtype=setup.dtype)
        timestep = torch.tensor(500, device=setup.device)
        context = torch.randn(2, 77, config["cross_attention_dim"], device=setup.device, dtype=setup.dtype)
        timings = {}
        for mode in ("triton", "torch"):
            with kernels.use_kernels(mode), torch.inference_mode():
                timings[mode] = setup.time_ms(lambda: unet(sample, timestep, context))
        yield f"| {size}² | {timings['triton']:.2f} | {timings['torch']:.2f} | {timings['torch'] / timings['triton']:.2f}x |"


def check_device(smoke: bool) -> None:
    # Triton picks the interpreter when a kernel is defined, i.e. on import: too late to set it from here.
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("benchmarks.kernels --smoke runs the Triton kernels on the CPU through Triton's interpreter: "
                 "set TRITON_INTERPRET=1 in the environment")
    if not smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (the Triton kernels are timed on the device); "
                 "tests/test_kernels.py checks them on a CPU through Triton's interpreter, and --smoke runs "
                 "this script there at tiny shapes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the tables here, as markdown")
    parser.add_argument("--skip-unet", action="store_true", help="kernels only, no whole-UNet timing")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU, to check the script runs end to end; the numbers mean nothing")
    args = parser.parse_args()
    check_device(args.smoke)

    setup = smoke_setup() if args.smoke else gpu_setup()
    dtype = dtype_name(setup.dtype)
    peak_tflops, peak_gbps = measure_peaks(setup)
    sections = [(f"Attention ({dtype})", bench_attention(setup, peak_tflops)),
                (f"GroupNorm + SiLU ({dtype}, {GROUPS} groups)", bench_group_norm(setup, peak_gbps))]
    if not args.skip_unet:
        sections.append(("Whole UNet step", bench_unet(setup)))
    header = [f"# Kernels on {setup.title}", "",
              f"Measured peaks: bf16 matmul {peak_tflops:.0f} TFLOP/s, device copy {peak_gbps:.0f} GB/s."]
    report = Report(args.out, *header)
    for title, lines in sections:
        report.add("", f"## {title}", "")
        for line in lines:
            report.add(line)



if __name__ == "__main__":
    main()
