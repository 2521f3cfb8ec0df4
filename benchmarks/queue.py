"""Queue overhead of the service on loopback: `python -m benchmarks.queue [--jobs N] [--workers 1 2]`.

Starts a private redis-server, a moto S3 server and 1, then 2, `inpaint-worker` processes on the tiny random model
(CPU), and sends 64x64 jobs through InpaintClient. Per-job overhead is submit -> final event seen by the client,
minus the pipeline's own time (the result's `timings.inference_s`): upload of the inputs, queueing, state and
events, fetching inputs and storing outputs. Latency jobs run one at a time; throughput jobs are all submitted at
once. Prints a markdown table. Targets: overhead p50 <= 25 ms, p95 <= 60 ms.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

from PIL import Image, ImageDraw

from api_client import schema
from api_client.client import InpaintClient
from tests import devstack
from worker.inference.model.tiny import write_tiny_model

BUCKET = "inpaint-bench"
SIZE = 64
WORKER_ENV = {"INPAINT_DEVICE": "cpu", "INPAINT_KERNELS": "torch", "INPAINT_CUDA_GRAPHS": "off",
              "INPAINT_LOG_LEVEL": "WARNING"}
JOB_OPTIONS = {"num_inference_steps": 1, "scheduler": "ddim", "guidance_scale": 1.0, "seed": 0}
TARGET_P50_MS, TARGET_P95_MS = 25.0, 60.0


def job_inputs() -> tuple[Image.Image, Image.Image]:
    image = Image.new("RGB", (SIZE, SIZE), (70, 120, 200))
    ImageDraw.Draw(image).rectangle((16, 24, 48, 56), fill=(200, 180, 140))
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((12, 20, 52, 60), fill=255)
    return image, mask


def overhead_parts_ms(started: float, submitted: float, finished: float, status: schema.JobStatus) -> dict:
    """The job's overhead and its parts: the client's submit, the worker's storage I/O (fetching inputs,
    storing outputs), and the rest (queue hand-off, state writes, event delivery)."""
    if status.state != schema.SUCCEEDED:
        raise RuntimeError(f"job {status.job_id} ended {status.state}: {status.error}")
    timings = status.result["timings"]
    overhead = (finished - started - timings["inference_s"]) * 1000
    submit, storage = (submitted - started) * 1000, (timings["fetch_s"] + timings["upload_s"]) * 1000
    return {"overhead": overhead, "submit": submit, "storage": storage, "rest": overhead - submit - storage}


def latency_run(client: InpaintClient, jobs: int) -> list[dict]:
    """Per-job overhead parts in ms, one job at a time."""
    image, mask = job_inputs()
    parts = []
    for _ in range(jobs):
        started = time.perf_counter()
        job_id = client.submit(image, mask, "a house", **JOB_OPTIONS)
        submitted = time.perf_counter()
        for _event in client.events(job_id, timeout=60):
            pass
        parts.append(overhead_parts_ms(started, submitted, time.perf_counter(), client.status(job_id)))
    return parts


def throughput_run(client: InpaintClient, jobs: int) -> float:
    """Jobs per second with `jobs` submitted at once."""
    image, mask = job_inputs()
    started = time.perf_counter()
    job_ids = [client.submit(image, mask, "a house", **JOB_OPTIONS) for _ in range(jobs)]
    for job_id in job_ids:
        if client.wait(job_id, timeout=300).state != schema.SUCCEEDED:
            raise RuntimeError(f"job {job_id} did not succeed: {client.status(job_id).error}")
    return jobs / (time.perf_counter() - started)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(stack: ExitStack, redis_url: str, s3_url: str, model: Path, workers: int, jobs: int,
            logs: Path) -> dict:
    env = devstack.worker_env(redis_url, s3_url, BUCKET, model, **WORKER_ENV)
    started = [devstack.start_worker(env, log_path=logs / f"w{workers}-{i}.log") for i in range(workers)]
    for worker in started:
        stack.callback(worker.stop)
    for worker in started:
        devstack.wait_worker_ready(redis_url, worker, timeout=180)
    with InpaintClient(broker_url=redis_url, s3_endpoint_url=s3_url, bucket=BUCKET) as client:
        latency_run(client, 2 * workers)  # warm-up: first job per process, connections, caches
        parts = latency_run(client, jobs)
        rate = throughput_run(client, jobs)
    for worker in started:
        worker.stop()  # before the next measurement starts its own workers
    overheads = [p["overhead"] for p in parts]
    medians = {name: statistics.median(p[name] for p in parts) for name in ("submit", "storage", "rest")}
    return {"workers": workers, "jobs": jobs, "p50": statistics.median(overheads),
            "p95": percentile(overheads, 0.95), "rate": rate, **medians}


def table(rows: list[dict]) -> str:
    lines = ["| workers | jobs | overhead p50 (ms) | overhead p95 (ms) | jobs/s | p50 parts (ms): client submit / "
             "worker S3 I/O / queue+state+events |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['jobs']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['rate']:.2f} | "
              f"{r['submit']:.1f} / {r['storage']:.1f} / {r['rest']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    args = parser.parse_args(argv)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="inpaint-bench-") as scratch:
        redis_server = stack.enter_context(devstack.start_redis())
        s3_server = stack.enter_context(devstack.start_s3())
        devstack.create_bucket(s3_server.endpoint_url, BUCKET)
        stack.enter_context(mock.patch.dict(os.environ, s3_server.env))  # boto3 in the client: moto's keys
        model = write_tiny_model(Path(scratch) / "model")
        rows = [measure(stack, redis_server.url, s3_server.endpoint_url, model, workers, args.jobs, Path(scratch))
                for workers in args.workers]
    print(table(rows))
    best = min(rows, key=lambda r: r["p50"])
    met = all(r["p50"] <= TARGET_P50_MS and r["p95"] <= TARGET_P95_MS for r in rows)
    print(f"\ntargets: overhead p50 <= {TARGET_P50_MS:.0f} ms, p95 <= {TARGET_P95_MS:.0f} ms: "
          f"{'met' if met else 'NOT met'} (best p50 {best['p50']:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
