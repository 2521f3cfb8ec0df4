"""End-to-end inpainting speed on a GPU: ours (eager / CUDA graphs x Triton kernels on / off) vs diffusers.

SD1.5 inpainting architecture (random weights time the same as real ones), 512x512, 50 steps, guidance 7.5,
float16, batch 1 and 4. UNet steps/s comes from the difference between a 50-step and a 2-step run, which cancels
the text encoder, VAE and set-up; utilisation is against 1.607 TFLOP per guided step at batch 1.

    python -m benchmarks.pipeline_gpu [--batches 1 4] [--steps 50] [--no-compile] [--out results.md]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from benchmarks.sd15 import write_sd15_random

TFLOP_PER_GUIDED_STEP = 1.607
SIZE = 512


def scene() -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).ellipse((128, 128, 384, 384), fill=255)
    return image, mask


def timed(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure(name: str, run, batch: int, steps: int) -> dict:
    run(batch, 2)  # warm-up: capture, autotuning, compilation
    run(batch, steps)
    torch.cuda.reset_peak_memory_stats()
    full = timed(lambda: run(batch, steps))
    short = timed(lambda: run(batch, 2))
    steps_per_s = (steps - 2) / (full - short)
    return {"name": name, "batch": batch, "steps/s": steps_per_s, "e2e s": full,
            "peak GiB": torch.cuda.max_memory_allocated() / 2**30,
            "TFLOP/s": steps_per_s * TFLOP_PER_GUIDED_STEP * batch}


def ours_runner(folder: Path, graphs: str, kernels: str):
    from worker.pipeline import InpaintPipeline

    os.environ["INPAINT_KERNELS"] = kernels
    pipe = InpaintPipeline.from_pretrained(str(folder), device="cuda", dtype=torch.float16, cuda_graphs=graphs)
    image, mask = scene()

    def run(batch: int, steps: int):
        os.environ["INPAINT_KERNELS"] = kernels
        return pipe(["a house"] * batch, image, mask, num_inference_steps=steps, seed=0)
    return run


def diffusers_runner(folder: Path, compile_unet: bool):
    import diffusers

    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        str(folder), torch_dtype=torch.float16, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
    image, mask = scene()

    def run(batch: int, steps: int):
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        return pipe(prompt=["a house"] * batch, image=image, mask_image=mask, num_inference_steps=steps,
                    generator=generators, height=SIZE, width=SIZE).images
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="skip diffusers + torch.compile (slow to build)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("pipeline_gpu.py needs a CUDA GPU; see benchmarks/pipeline_cpu.py for the CPU comparison")

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_sd15_random(Path(tmp) / "sd15")
        variants = [(f"ours graphs={g} kernels={k}", lambda g=g, k=k: ours_runner(folder, g, k))
                    for g in ("on", "off") for k in ("triton", "torch")]
        variants.append(("diffusers (SDPA)", lambda: diffusers_runner(folder, False)))
        if not args.no_compile:
            variants.append(("diffusers + torch.compile max-autotune", lambda: diffusers_runner(folder, True)))
        rows = []
        for name, make in variants:
            run = make()
            rows += [measure(name, run, batch, args.steps) for batch in args.batches]
            del run
            torch.cuda.empty_cache()

    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {SIZE}x{SIZE}, {args.steps} steps, "
             "guidance 7.5, float16, random weights", "",
             "| variant | batch | UNet steps/s | end-to-end s | peak GiB | TFLOP/s |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['name']} | {r['batch']} | {r['steps/s']:.1f} | {r['e2e s']:.2f} | {r['peak GiB']:.1f} | "
              f"{r['TFLOP/s']:.0f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
