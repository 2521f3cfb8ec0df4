"""A CPU worker's job, ours vs diffusers, in one process: the full SD1.5 inpainting architecture (random weights).

512x512, 20 steps, dpmpp_2m_karras, guidance 7.5 by default. The bfloat16 variants (ours at the worker's default
dtype `auto`, ours with each CPU lever taken away, diffusers in bfloat16) run in alternating rounds after one
warm-up job each; ours and diffusers in float32 run once each, before and after them, loaded one at a time
(memory). Every row gives the PSNR of its image against ours in float32 on the same seed.

Each job's UNet steps are timed with the progress callback, so a row also gives the fixed part (text, VAE encode
and decode, set-up) and the time per step; `--steps` below 20 keeps a run short on a busy machine, and the
`20-step s` column is then fixed + 20 x per-step (marked "est."). Only ratios from one run count: on a shared
machine the timings swing between runs.

    python -m benchmarks.pipeline_cpu [--size 512] [--steps 20] [--runs 2] [--model DIR] [--out FILE] [--smoke]
"""
import argparse
import datetime
import gc
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from benchmarks.report import Report
from benchmarks.sd15 import write_sd15_random

SCHEDULER = "dpmpp_2m_karras"
TARGET_STEPS = 20
GOAL = 0.8  # ours / diffusers bfloat16, end to end (moonshot 0.5)


@dataclass
class Variant:
    name: str
    run: object                          # (steps, on_step) -> PIL image; on_step() is called after each step
    dtype: str
    times: list = field(default_factory=list)   # end-to-end seconds per run
    steps: list = field(default_factory=list)   # seconds per UNet step (median of a run's steps after the first)
    image: Image.Image | None = None


def scene(size: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=255)
    return image, mask


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ours(folder: Path, size: int, dtype=None, channels_last: bool = True):
    from worker.inference.pipeline import InpaintPipeline

    pipe = InpaintPipeline.from_pretrained(str(folder), device="cpu", dtype=dtype)
    if not channels_last:  # the lever taken away: back to NCHW weights
        for module in (pipe.unet, pipe.vae):
            module.to(memory_format=torch.contiguous_format)
    image, mask = scene(size)

    def run(steps: int, on_step) -> Image.Image:
        return pipe("a house", image, mask, num_inference_steps=steps, guidance_scale=7.5, scheduler=SCHEDULER,
                    seed=0, height=size, width=size, callback=lambda step, total: on_step())[0]
    return run, str(pipe.dtype).removeprefix("torch.")


def diffusers_pipeline(folder: Path, size: int, dtype: torch.dtype):
    import diffusers

    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        str(folder), torch_dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    image, mask = scene(size)

    def run(steps: int, on_step) -> Image.Image:
        def callback(pipeline, step, timestep, kwargs):
            on_step()
            return kwargs
        return pipe(prompt="a house", image=image, mask_image=mask, num_inference_steps=steps, guidance_scale=7.5,
                    strength=1.0, height=size, width=size, generator=[torch.Generator("cpu").manual_seed(0)],
                    callback_on_step_end=callback).images[0]
    return run, str(dtype).removeprefix("torch.")


def timed(variant: Variant, steps: int) -> None:
    marks = []
    start = time.perf_counter()
    variant.image = variant.run(steps, lambda: marks.append(time.perf_counter()))
    variant.times.append(time.perf_counter() - start)
    per_step = np.diff([start, *marks])[1:] if len(marks) > 1 else np.diff([start, *marks])
    variant.steps.append(float(np.median(per_step)))
    print(f"{variant.name}: {variant.times[-1]:.1f} s, {variant.steps[-1]:.2f} s/step", flush=True)


def cpu_name() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                platform.processor() or "unknown CPU")


def header(args, steps: int) -> list[str]:
    import diffusers
    import transformers

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return [
        f"# {datetime.date.today()}, CPU pipeline: ours vs diffusers, benchmarks/pipeline_cpu.py",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}.",
        f"Job: {'tiny model (smoke run)' if args.smoke else 'SD1.5 inpainting architecture, random weights'}, "
        f"{args.size}x{args.size}, {steps} steps measured, {SCHEDULER}, guidance 7.5, batch 1. "
        f"Load average at start: {load} (a shared machine: timings swing, ratios within one run count).",
        "",
        "| variant | dtype | runs s | median s | fixed s | s/step | 20-step s | vs diffusers bf16 | PSNR dB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]


def split_time(variant: Variant, steps: int) -> tuple[float, float, float]:
    """(fixed s, s per step, end-to-end s at TARGET_STEPS) from the median run."""
    median, per_step = statistics.median(variant.times), statistics.median(variant.steps)
    fixed = max(median - steps * per_step, 0.0)
    return fixed, per_step, fixed + TARGET_STEPS * per_step


def quality(variant: Variant, reference: Image.Image) -> str:
    value = psnr(variant.image, reference)
    return "exact" if math.isinf(value) else f"{value:.1f}"


def row(variant: Variant, steps: int, baseline: Variant, reference: Image.Image) -> str:
    fixed, per_step, at_target = split_time(variant, steps)
    estimated = "" if steps == TARGET_STEPS else " est."
    ratio = at_target / split_time(baseline, steps)[2]
    return (f"| {variant.name} | {variant.dtype} | {', '.join(f'{t:.1f}' for t in variant.times)} | "
            f"{statistics.median(variant.times):.1f} | {fixed:.1f} | {per_step:.2f} | {at_target:.1f}{estimated} | "
            f"{ratio:.2f}x | {quality(variant, reference)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=TARGET_STEPS)
    parser.add_argument("--runs", type=int, default=2, help="alternating rounds of the bfloat16 variants")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model", type=Path, help="a folder benchmarks.sd15 wrote before (default: write one)")
    parser.add_argument("--smoke", action="store_true", help="the tiny model at 32x32, 2 steps, 1 round")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.steps, args.runs = 32, 2, 1

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or write_model(Path(tmp) / "model", args.smoke)
        report = Report(args.out, *header(args, args.steps))
        reference = single_run("ours float32", lambda: ours(folder, args.size, torch.float32), args.steps)
        bf16 = [Variant("ours, default dtype (auto)", *ours(folder, args.size)),
                Variant("ours, auto without channels_last", *ours(folder, args.size, channels_last=False)),
                Variant("diffusers bfloat16", *diffusers_pipeline(folder, args.size, torch.bfloat16))]
        for variant in bf16:
            variant.run(1, lambda: None)  # warm-up: oneDNN primitives, allocator
        for _ in range(args.runs):
            for variant in bf16:
                timed(variant, args.steps)
        baseline = bf16[-1]
        report.add(*(row(v, args.steps, baseline, reference.image) for v in bf16 + [reference]))
        ratio = split_time(bf16[0], args.steps)[2] / split_time(baseline, args.steps)[2]
        for variant in bf16:
            variant.run = None  # frees the pipelines before the float32 one loads
        gc.collect()
        theirs = single_run("diffusers float32", lambda: diffusers_pipeline(folder, args.size, torch.float32),
                            args.steps)
        report.add(row(theirs, args.steps, baseline, reference.image), "",
                   f"Ours at the default dtype vs diffusers bfloat16, {TARGET_STEPS} steps: **{ratio:.2f}x** (goal "
                   f"<= {GOAL}x, moonshot 0.5x); PSNR against ours in float32: {quality(bf16[0], reference.image)} "
                   f"dB (goal >= 30). The float32 rows are one cold run each (no warm-up), loaded one at a time.")


def single_run(name: str, build, steps: int) -> Variant:
    variant = Variant(name, *build())
    timed(variant, steps)
    variant.run = None
    gc.collect()
    return variant


def write_model(folder: Path, smoke: bool) -> Path:
    if smoke:
        from worker.inference.model.tiny import write_tiny_model
        return write_tiny_model(folder)
    return write_sd15_random(folder)


if __name__ == "__main__":
    main()
