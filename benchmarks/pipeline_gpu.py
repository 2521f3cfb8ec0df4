"""End-to-end inpainting speed on a GPU: ours (eager / CUDA graphs x Triton kernels on / off) vs diffusers.

SD1.5 inpainting architecture (random weights time the same as real ones), 512x512, 50 steps, guidance 7.5,
float16, batch 1 and 4. UNet steps/s comes from the difference between a 50-step and a 2-step run, which cancels
the text encoder, VAE and set-up; utilisation is against 1.607 TFLOP per guided step at batch 1.

--family sdxl: the SDXL inpainting architecture (random weights, written as float16 files), 1024x1024, 30 steps,
batch 1, against StableDiffusionXLInpaintPipeline (no watermark on either side).

--smoke: the tiny test model on the CPU, float32, 16x16, 3 steps, batch 1, no CUDA graphs and no torch.compile,
to check the script runs end to end; the numbers mean nothing. kernels=triton runs on Triton's interpreter
(TRITON_INTERPRET=1 must be set), at about 15 s per step: `--kernels torch` leaves it out.

    python -m benchmarks.pipeline_gpu [--family sd15|sdxl] [--batches 1 4] [--steps 50] [--kernels triton torch]
                                      [--no-compile] [--out results.md]
    TRITON_INTERPRET=1 python -m benchmarks.pipeline_gpu --smoke [--kernels torch] [--out smoke.md]
"""
import argparse
import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

import kernels
from benchmarks.report import Report

SHORT_RUN_STEPS = 2  # the run whose time is taken off the full run's, leaving (steps - 2) UNet steps


@dataclass(frozen=True)
class Setup:
    """The real run on a GPU, or the CPU smoke run."""
    title: str
    device: str
    dtype: torch.dtype
    size: int
    steps: int
    batches: tuple
    tflop_per_guided_step: float | None  # at batch 1; None when unknown (the tiny model)
    graph_modes: tuple                    # CUDA graphs need CUDA: "off" only on the CPU
    write_model: Callable[[Path], Path]   # writes the model into a folder, returns it
    family: str = "sd15"                  # "sdxl": diffusers' oracle is StableDiffusionXLInpaintPipeline


def gpu_setup() -> Setup:
    from benchmarks.sd15 import write_sd15_random

    return Setup(title=f"{torch.cuda.get_device_name()}, SD1.5 inpainting architecture", device="cuda",
                 dtype=torch.float16, size=512, steps=50, batches=(1, 4), tflop_per_guided_step=1.607,
                 graph_modes=("on", "off"), write_model=write_sd15_random)


def gpu_sdxl_setup() -> Setup:
    from benchmarks.sdxl import write_sdxl_random

    return Setup(title=f"{torch.cuda.get_device_name()}, SDXL inpainting architecture", device="cuda",
                 dtype=torch.float16, size=1024, steps=30, batches=(1,), tflop_per_guided_step=None,
                 graph_modes=("on", "off"), write_model=write_sdxl_random, family="sdxl")


def smoke_setup(family: str = "sd15") -> Setup:
    from worker.inference.model.tiny import write_tiny_model

    # 16x16 (8x8 latents): under the interpreter a Triton attention's time grows with the square of the
    # token count, and at 64x64 one UNet step would take minutes.
    return Setup(title=f"CPU smoke run (tiny {family} test model; the numbers mean nothing)", device="cpu",
                 dtype=torch.float32, size=16, steps=3, batches=(1,), tflop_per_guided_step=None,
                 graph_modes=("off",), write_model=lambda folder: write_tiny_model(folder, family=family),
                 family=family)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def release_cached_memory(device: str) -> None:
    gc.collect()  # the last variant's model goes now, not whenever the collector next runs
    if device == "cuda":
        torch.cuda.empty_cache()


def scene(size: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=255)
    return image, mask


def timed(fn, device: str, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure(setup: Setup, name: str, run, batch: int, steps: int) -> dict:
    # Peak from before the warm-up: graph replays allocate nothing, so their memory is only seen being captured.
    reset_peak_memory(setup.device)
    run(batch, SHORT_RUN_STEPS)  # warm-up: capture, autotuning, compilation
    run(batch, steps)
    full = timed(lambda: run(batch, steps), setup.device)
    short = timed(lambda: run(batch, SHORT_RUN_STEPS), setup.device)
    steps_per_s = (steps - SHORT_RUN_STEPS) / (full - short)
    tflops = None if setup.tflop_per_guided_step is None else steps_per_s * setup.tflop_per_guided_step * batch
    return {"name": name, "batch": batch, "steps/s": steps_per_s, "e2e s": full,
            "peak GiB": peak_gib(setup.device), "TFLOP/s": tflops}


def ours_runner(setup: Setup, folder: Path, graphs: str, kernel_mode: str):
    from worker.inference.pipeline import InpaintPipeline

    pipe = InpaintPipeline.from_pretrained(str(folder), device=setup.device, dtype=setup.dtype, cuda_graphs=graphs)
    image, mask = scene(setup.size)

    def run(batch: int, steps: int):
        with kernels.use_kernels(kernel_mode):
            return pipe(["a house"] * batch, image, mask, num_inference_steps=steps, seed=0)
    return run


def diffusers_runner(setup: Setup, folder: Path, compile_unet: bool):
    import diffusers

    if setup.family == "sdxl":
        pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(
            str(folder), torch_dtype=setup.dtype, add_watermarker=False).to(setup.device)
    else:
        pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
            str(folder), torch_dtype=setup.dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False).to(setup.device)
    pipe.set_progress_bar_config(disable=True)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
    image, mask = scene(setup.size)

    def run(batch: int, steps: int):
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        return pipe(prompt=["a house"] * batch, image=image, mask_image=mask, num_inference_steps=steps,
                    generator=generators, height=setup.size, width=setup.size, strength=1.0).images
    return run


def variants(setup: Setup, folder: Path, kernel_modes, compile_unet: bool) -> list:
    """(name, make the runner) pairs, most telling first (ours at its fastest, then diffusers), so that a run cut
    short still holds the comparison; runners are made one at a time, so only one model is on the device."""
    ours = [(f"ours graphs={g} kernels={k}", lambda g=g, k=k: ours_runner(setup, folder, g, k))
            for g in setup.graph_modes for k in kernel_modes]
    found = [ours[0], ("diffusers (SDPA)", lambda: diffusers_runner(setup, folder, False)), *ours[1:]]
    if compile_unet:
        found.append(("diffusers + torch.compile max-autotune", lambda: diffusers_runner(setup, folder, True)))
    return found


def check_device(smoke: bool, kernel_modes) -> None:
    # Triton picks the interpreter when a kernel is defined, i.e. on import: too late to set it from here.
    if smoke and "triton" in kernel_modes and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("pipeline_gpu.py --smoke runs kernels=triton through Triton's interpreter on the CPU: set "
                 "TRITON_INTERPRET=1 in the environment, or pass --kernels torch")
    if not smoke and not torch.cuda.is_available():
        sys.exit("pipeline_gpu.py needs a CUDA GPU; see benchmarks/pipeline_cpu.py for the CPU comparison, "
                 "or --smoke to check this script on the CPU")


def table_header(setup: Setup, steps: int) -> list[str]:
    return [f"{setup.title}, torch {torch.__version__}, {setup.size}x{setup.size}, {steps} steps, guidance 7.5, "
            f"{str(setup.dtype).removeprefix('torch.')}, random weights", "",
            "| variant | batch | UNet steps/s | end-to-end s | peak GiB | TFLOP/s |", "| --- | --- | --- | --- | --- | --- |"]


def table_row(r: dict) -> str:
    def number(value, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    return (f"| {r['name']} | {r['batch']} | {r['steps/s']:.1f} | {r['e2e s']:.2f} | {number(r['peak GiB'], 1)} | "
            f"{number(r['TFLOP/s'], 0)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15",
                        help="sdxl: SDXL inpainting at 1024x1024, 30 steps, batch 1")
    parser.add_argument("--batches", type=int, nargs="+", help="default 1 4 (sdxl and --smoke: 1)")
    parser.add_argument("--steps", type=int, help="default 50 (sdxl: 30, --smoke: 3)")
    parser.add_argument("--kernels", nargs="+", choices=("triton", "torch"), default=["triton", "torch"],
                        help="INPAINT_KERNELS modes to time ours with")
    parser.add_argument("--no-compile", action="store_true", help="skip diffusers + torch.compile (slow to build)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model on the CPU, to check the script runs end to end; the numbers mean nothing")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    check_device(args.smoke, args.kernels)

    setup = smoke_setup(args.family) if args.smoke else gpu_sdxl_setup() if args.family == "sdxl" else gpu_setup()
    steps, batches = args.steps or setup.steps, args.batches or setup.batches
    if steps <= SHORT_RUN_STEPS:
        parser.error(f"--steps must be above {SHORT_RUN_STEPS}: steps/s is timed against a {SHORT_RUN_STEPS}-step run")
    compile_unet = not (args.no_compile or args.smoke)  # on the CPU max-autotune has nothing to tune
    report = Report(args.out, *table_header(setup, steps))
    with tempfile.TemporaryDirectory() as tmp:
        folder = setup.write_model(Path(tmp) / "model")
        for name, make in variants(setup, folder, args.kernels, compile_unet):
            run = make()
            for batch in batches:
                report.add(table_row(measure(setup, name, run, batch, steps)))
            del run
            release_cached_memory(setup.device)


if __name__ == "__main__":
    main()
