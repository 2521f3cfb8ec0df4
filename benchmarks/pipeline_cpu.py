"""Ours vs diffusers on the CPU, in one process, alternating runs.

The full SD1.5 inpainting architecture with random weights, 256x256, 4 steps, guidance 7.5, float32.
Prints the median time of each and the median ratio ours/diffusers (target <= 0.95).

--family sdxl: the full SDXL inpainting architecture (2.6 B UNet, both text encoders) against
StableDiffusionXLInpaintPipeline, in bfloat16 with both sides on one copy of the weights (benchmarks/sdxl.py: two
float32 copies would not fit a shared 24 GB machine), 128x128, 3 steps, 2 runs by default.

    python -m benchmarks.pipeline_cpu [--family sd15|sdxl] [--runs 3] [--size 256] [--steps 4] [--out results.md]
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
from benchmarks.sdxl import shared_pipelines


def scene(size: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=255)
    return image, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--runs", type=int, help="default 3 (sdxl: 2)")
    parser.add_argument("--size", type=int, help="default 256 (sdxl: 128)")
    parser.add_argument("--steps", type=int, help="default 4 (sdxl: 3)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sdxl = args.family == "sdxl"
    runs, size, steps = args.runs or (2 if sdxl else 3), args.size or (128 if sdxl else 256), \
        args.steps or (3 if sdxl else 4)

    import diffusers

    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs, model = (sdxl_pipelines if sdxl else sd15_pipelines)(Path(tmp) / "model")
    image, mask = scene(size)
    # strength explicitly: diffusers' SDXL inpainting defaults to 0.9999, ours to 1.0
    common = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, strength=1.0)

    def run_ours():
        return ours("a house", image, mask, seed=0, **common)

    def run_theirs():
        return theirs(prompt="a house", image=image, mask_image=mask,
                      generator=[torch.Generator("cpu").manual_seed(0)], **common).images

    run_ours(), run_theirs()  # warm-up: allocator, oneDNN primitive caches
    times = {"ours": [], "diffusers": []}
    for _ in range(runs):
        for name, fn in (("ours", run_ours), ("diffusers", run_theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["ours"], times["diffusers"])]
    table = "\n".join([
        f"{model} (random weights), {size}x{size}, {steps} steps, guidance 7.5, CPU threads "
        f"{torch.get_num_threads()}, torch {torch.__version__}, diffusers {diffusers.__version__}",
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


def sd15_pipelines(folder: Path):
    import diffusers

    from worker.inference.pipeline import InpaintPipeline

    folder = write_sd15_random(folder)
    ours = InpaintPipeline.from_pretrained(str(folder), device="cpu", dtype=torch.float32)
    theirs = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        str(folder), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs, "SD1.5 inpainting, float32"


def sdxl_pipelines(folder: Path):
    ours, theirs = shared_pipelines(folder, dtype=torch.bfloat16)
    return ours, theirs, "SDXL inpainting (full architecture, one shared copy of the weights), bfloat16"


if __name__ == "__main__":
    main()
