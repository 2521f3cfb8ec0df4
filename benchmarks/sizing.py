"""The sizing table of docs/deploying.md §9, derived from a GPU pipeline benchmark table.

    python -m benchmarks.sizing benchmarks/results/<date>-<device>-pipeline.md [--steps 30 50] [--overhead-s 0.05]

From the pipeline table's row for our fastest configuration (CUDA graphs and Triton kernels on) at each batch:
t_step = 1 / UNet steps/s; the fixed part of a job (text encoder, VAE, set-up) is the end-to-end time of the
benchmark's run less its steps; t_job for S steps = fixed + S x t_step + the queue overhead (fetching inputs,
storing outputs, state and events: measured by benchmarks/queue.py); jobs/hour = 3600 x u / t_job.
"""
import argparse
import re
from pathlib import Path

VARIANT = "ours graphs=on kernels=triton"
UTILISATION = 0.7


def read_pipeline_table(text: str) -> tuple[str, str, int, dict[int, tuple[float, float]]]:
    """(GPU name, image size, benchmark steps, {batch: (UNet steps/s, end-to-end s)}) of our fastest variant."""
    title = text.splitlines()[0]
    match = re.match(r"(?P<gpu>[^,]+), .*?(?P<size>\d+x\d+), (?P<steps>\d+) steps", title)
    if match is None:
        raise ValueError(f"not a benchmarks/pipeline_gpu.py table: its first line is {title!r}")
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == VARIANT:
            rows[int(cells[1])] = (float(cells[2]), float(cells[3]))
    if not rows:
        raise ValueError(f"the table has no row for {VARIANT!r}")
    return match["gpu"], match["size"].replace("x", "×"), int(match["steps"]), rows


def sizing_rows(text: str, steps_list: list[int], overhead_s: float) -> list[str]:
    gpu, size, bench_steps, rows = read_pipeline_table(text)
    lines = []
    for batch, (steps_per_s, end_to_end_s) in sorted(rows.items()):
        t_step = 1 / steps_per_s
        fixed = end_to_end_s - bench_steps * t_step
        for steps in steps_list:
            t_job = fixed + steps * t_step + overhead_s
            lines.append(f"| {gpu} | {size} | {steps} | {batch} | {1000 * t_step:.1f} | {t_job:.2f} | "
                         f"{3600 * UTILISATION / t_job:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path, help="a table written by benchmarks/pipeline_gpu.py")
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 50])
    parser.add_argument("--overhead-s", type=float, default=0.05, help="queue overhead per job (benchmarks/queue.py)")
    args = parser.parse_args()
    print("| GPU | size | steps | images | t_step (ms) | t_job (s) | jobs/hour per GPU at u = 0.7 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(sizing_rows(args.table.read_text(), args.steps, args.overhead_s)))


if __name__ == "__main__":
    main()
