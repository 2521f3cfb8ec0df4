"""The benchmark scripts: the GPU ones run end to end with --smoke on the CPU, and refuse to start without CUDA.

A GPU session is short, so the GPU scripts must not fail there on a wrong import or a CUDA-only call. --smoke runs
their code paths (arguments, bench functions, tables) at tiny shapes; the numbers are not checked. The scripts run
as the benchmark session runs them: `python -m benchmarks.<name>` from the repository root, in a subprocess.

pipeline_gpu's kernels=triton variant is left out here: under Triton's interpreter the tiny UNet takes ~15 s a
step and a variant runs 15 steps. benchmarks.kernels --smoke times that UNet with kernels=triton once.
"""
import importlib
import math
import os
import subprocess
import sys
from itertools import dropwhile, takewhile
from pathlib import Path

import pytest
import torch

from worker.inference.model.loader import cpu_has_native_bfloat16

ROOT = Path(__file__).parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the real benchmark")


def run_script(module: str, *args: str, interpret: bool = True) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"  # tiny ops gain nothing from more, and spinning threads crawl on a shared CPU
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def table_rows(markdown: str, heading: str | None = None) -> list[list[str]]:
    """The data rows of the first table after the line `heading` (or in the text), as lists of stripped cells."""
    lines = markdown.splitlines()
    after = lines[lines.index(heading) + 1:] if heading else lines
    table = takewhile(lambda line: line.startswith("|"), dropwhile(lambda line: not line.startswith("|"), after))
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in list(table)[2:]]  # no header rows


def as_number(cell: str) -> float:
    return float(cell.removesuffix("x").removesuffix("%"))


def test_kernels_smoke_writes_every_table(tmp_path):
    from benchmarks.kernels import smoke_setup

    setup = smoke_setup()
    out = tmp_path / "kernels.md"
    result = run_script("benchmarks.kernels", "--smoke", "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()

    attention = table_rows(text, "## Attention (float32)")
    expected = [", ".join(map(str, shape)) for shapes in setup.attention_shapes.values() for shape in shapes]
    assert [row[1] for row in attention] == expected
    group_norm = table_rows(text, "## GroupNorm + SiLU (float32, 32 groups)")
    assert [(row[0], row[1]) for row in group_norm] == [
        (", ".join(map(str, shape)), layout) for shape in setup.group_norm_shapes
        for layout in ("NCHW", "channels_last")]
    unet = table_rows(text, "## Whole UNet step")
    assert [row[0] for row in unet] == [f"{size}²" for size in setup.unet_sizes]
    for row in attention + group_norm + unet:
        assert all(as_number(cell) >= 0 for cell in row[2:]), row


def test_kernels_smoke_needs_the_interpreter():
    result = run_script("benchmarks.kernels", "--smoke", interpret=False)
    assert result.returncode != 0 and "TRITON_INTERPRET=1" in result.stderr


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_pipeline_gpu_smoke_writes_one_row_per_variant(tmp_path, family):
    out = tmp_path / "pipeline.md"
    result = run_script("benchmarks.pipeline_gpu", "--smoke", "--family", family, "--kernels", "torch",
                        "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = table_rows(out.read_text())
    assert [(row[0], row[1]) for row in rows] == [("ours graphs=off kernels=torch", "1"), ("diffusers (SDPA)", "1")]
    for _, _, steps_per_s, end_to_end, peak, tflops in rows:
        assert math.isfinite(as_number(steps_per_s))
        assert as_number(end_to_end) > 0
        assert peak == tflops == "n/a"  # no CUDA memory counters, no FLOP count for the tiny model


@no_cuda
@pytest.mark.parametrize("module", ["benchmarks.kernels", "benchmarks.pipeline_gpu"])
def test_gpu_scripts_refuse_to_run_without_cuda(module):
    result = run_script(module)
    assert result.returncode != 0 and "needs a CUDA GPU" in result.stderr


@pytest.mark.parametrize("module", ["benchmarks.queue", "benchmarks.api", "benchmarks.pipeline_cpu_sdxl"])
def test_cpu_scripts_import(module):
    assert callable(importlib.import_module(module).main)


def test_pipeline_cpu_smoke_writes_every_variant_with_its_psnr(tmp_path):
    out = tmp_path / "cpu.md"
    result = run_script("benchmarks.pipeline_cpu", "--smoke", "--out", str(out), interpret=False)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    rows = table_rows(text)
    assert [(row[0], row[1]) for row in rows] == [
        ("ours, default dtype (auto)", "bfloat16" if cpu_has_native_bfloat16() else "float32"),
        ("ours, auto without channels_last", rows[0][1]), ("diffusers bfloat16", "bfloat16"),
        ("ours float32", "float32"), ("diffusers float32", "float32")]
    for name, _, runs, median, fixed, per_step, at_20, ratio, psnr in rows:
        assert as_number(median) > 0 and as_number(per_step) > 0 and as_number(fixed) >= 0, name
        assert at_20.endswith(" est.") and as_number(at_20.removesuffix(" est.")) > as_number(median), name
        assert as_number(ratio) > 0, name
        assert psnr == "exact" or as_number(psnr) >= 30, name  # vs ours float32 (diffusers' may equal it)
    assert rows[3][8] == "exact"
    assert rows[2][7] == "1.00x" and "Machine: " in text and "**" in text.splitlines()[-1]


def test_report_writes_each_row_as_it_comes(tmp_path, capsys):
    from benchmarks.report import Report

    out = tmp_path / "table.md"
    report = Report(out, "# title", "")
    report.add("| a |")
    assert out.read_text() == "# title\n\n| a |\n"  # on disk before the run ends
    report.add("| b |", "| c |")
    assert out.read_text().splitlines()[-2:] == ["| b |", "| c |"]
    assert capsys.readouterr().out == "# title\n\n| a |\n| b |\n| c |\n"


@no_cuda
def test_gpu_check_script_runs_its_steps_and_collects_the_tables(tmp_path):
    """scripts/gpu_check.sh in smoke mode: the plumbing a GPU session relies on (steps, limits, $OUT, exit)."""
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "WHEELS": str(tmp_path / "no-wheels"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "pipeline"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (tmp_path / "out" / "run.log").read_text()
    assert "=== pipeline: exit 0" in log and "all steps passed" in log and "=== tests" not in log
    [table] = (tmp_path / "out").glob("*-cpu-pipeline.md")
    assert len(table_rows(table.read_text())) == 2


@no_cuda
def test_gpu_check_script_reports_a_failed_step(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "WHEELS": str(tmp_path / "none")}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "kernels"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1  # without CUDA and without smoke mode, the kernel benchmark refuses to start
    log = (tmp_path / "out" / "run.log").read_text()
    assert "needs a CUDA GPU" in log and "=== kernels: exit 1" in log and "some steps FAILED" in log


def test_sizing_reads_the_pipeline_table_as_pipeline_gpu_writes_it():
    from benchmarks import pipeline_gpu, sizing

    setup = pipeline_gpu.Setup(title="NVIDIA H200, SD1.5 inpainting architecture", device="cuda",
                               dtype=torch.float16, size=512, steps=50, batches=(1, 4), tflop_per_guided_step=1.607,
                               graph_modes=("on", "off"), write_model=lambda folder: folder)
    measured = [{"name": "ours graphs=on kernels=triton", "batch": 1, "steps/s": 100.0, "e2e s": 0.8,
                 "peak GiB": 3.0, "TFLOP/s": 160.0},
                {"name": "diffusers (SDPA)", "batch": 1, "steps/s": 40.0, "e2e s": 1.6, "peak GiB": 3.5,
                 "TFLOP/s": 64.0}]
    text = "\n".join(pipeline_gpu.table_header(setup, 50) + [pipeline_gpu.table_row(r) for r in measured])

    rows = table_rows("\n".join(["| h |", "| - |", *sizing.sizing_rows(text, [30], overhead_s=0.05)]))
    # t_step 10 ms; fixed part 0.8 s - 50 x 10 ms = 0.3 s; t_job = 0.3 + 30 x 0.01 + 0.05 = 0.65 s
    assert rows == [["NVIDIA H200", "512×512", "30", "1", "10.0", "0.65", f"{3600 * 0.7 / 0.65:.0f}"]]


def test_sizing_refuses_a_table_without_our_fastest_variant():
    from benchmarks import sizing

    with pytest.raises(ValueError, match="no row for 'ours graphs=on kernels=triton'"):
        sizing.sizing_rows("NVIDIA H200, x, 512x512, 50 steps\n\n| diffusers (SDPA) | 1 | 40.0 | 1.60 | 3.5 | 64 |",
                           [30], 0.05)
