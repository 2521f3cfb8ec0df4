"""SDXL inpainting on the CPU: ours vs diffusers' StableDiffusionXLInpaintPipeline, in one process, alternating runs.

The full SDXL inpainting architecture (2.6 B UNet, both text encoders) with random weights, in bfloat16 with both
sides on one copy of the weights (benchmarks/sdxl.py: two float32 copies would not fit a shared 24 GB machine),
128x128, 3 steps, guidance 7.5, 2 runs by default. Prints the median time of each and the median ratio.

    python -m benchmarks.pipeline_cpu_sdxl [--runs 2] [--size 128] [--steps 3] [--out results.md]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.pipeline_cpu import scene
from benchmarks.sdxl import shared_pipelines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import diffusers

    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = shared_pipelines(Path(tmp) / "model", dtype=torch.bfloat16)
    image, mask = scene(args.size)
    # strength explicitly: diffusers' SDXL inpainting defaults to 0.9999, ours to 1.0
    common = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size, strength=1.0)

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
        f"SDXL inpainting (full architecture, one shared copy of the weights, random), bfloat16, "
        f"{args.size}x{args.size}, {args.steps} steps, guidance 7.5, CPU threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}",
        "",
        "| pipeline | median s | runs (s) |",
        "| --- | --- | --- |",
        *(f"| {name} | {statistics.median(t):.2f} | {', '.join(f'{x:.2f}' for x in t)} |"
          for name, t in times.items()),
        "",
        f"median ratio ours/diffusers: **{statistics.median(ratios):.3f}**",
    ])
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
