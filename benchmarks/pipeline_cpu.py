"""Ours vs diffusers on the CPU, in one process, alternating runs.

The full SD1.5 inpainting architecture with random weights, 256x256, 4 steps, guidance 7.5, float32.
Prints the median time of each and the median ratio ours/diffusers (target <= 0.95).

    python -m benchmarks.pipeline_cpu [--runs 3] [--size 256] [--steps 4] [--out results.md]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from benchmarks.sd15 import write_sd15_random


def scene(size: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=255)
    return image, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import diffusers

    from worker.inference.pipeline import InpaintPipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_sd15_random(Path(tmp) / "sd15")
        ours = InpaintPipeline.from_pretrained(str(folder), device="cpu", dtype=torch.float32)
        theirs = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
            str(folder), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    image, mask = scene(args.size)
    common = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size)

    def run_ours():
        return ours("a house", image, mask, seed=0, **common)

    def run_theirs():
        return theirs(prompt="a house", image=image, mask_image=mask,
                      generator=[torch.Generator("cpu").manual_seed(0)], **common).images

    run_ours(), run_theirs()  # warm-up: allocator, oneDNN primitive caches
    times = {"ours": [], "diffusers": []}
    for _ in range(args.runs):
        for name, fn in (("ours", run_ours), ("diffusers", run_theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["ours"], times["diffusers"])]
    table = "\n".join([
        f"SD1.5 inpainting (random weights), {args.size}x{args.size}, {args.steps} steps, guidance 7.5, float32, "
        f"CPU threads {torch.get_num_threads()}, torch {torch.__version__}, diffusers {diffusers.__version__}",
        "",
        "| pipeline | median s | runs (s) |",
        "| --- | --- | --- |",
        *(f"| {name} | {statistics.median(t):.2f} | {', '.join(f'{x:.2f}' for x in t)} |"
          for name, t in times.items()),
        "",
        f"median ratio ours/diffusers: **{statistics.median(ratios):.3f}** (target <= 0.95)",
    ])
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
