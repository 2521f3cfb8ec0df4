"""HTTP API on loopback: `python -m benchmarks.api [--seconds S] [--concurrency 1 50]`.

Starts a private redis-server, a moto S3 server and one `inpaint-api` process (one uvicorn worker), creates a key,
and measures with httpx clients in this process:
- status reads: GET /v1/jobs/{id} of a queued job (the polling case; its queue position is computed each time),
  for S seconds at each concurrency;
- submits: POST /v1/jobs with two 64x64 PNGs inline, on a queue no worker consumes, at each concurrency;
- the submit overhead: POST /v1/jobs at concurrency 1 against the direct client's InpaintClient.submit() of the same
  images (both upload the two inputs to S3, record the job and enqueue it), p50 difference.
The last column is the inpaint-api process's own CPU time per request (user + system, from /proc): on a machine
shared with other work the latencies grow with the load, this column much less. Prints a markdown table and writes
it under benchmarks/results/. Targets: >= 1,500 status reads/s with p99 <= 25 ms
at 50 concurrent clients; a submit adds <= 5 ms p50 over the direct client's. The load generator shares the machine's
cores with the server, Redis and moto: on a small shared machine the numbers are a floor.
"""
import argparse
import asyncio
import base64
import io
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from datetime import date
from pathlib import Path
from unittest import mock

import httpx
import redis
from PIL import Image

from api_client import keys
from api_client.client import InpaintClient
from benchmarks.report import Report
from tests import devstack

BUCKET = "inpaint-api-bench"
QUEUE = "api-bench-idle"   # no worker: submitted jobs stay queued
TARGET_READS_PER_S, TARGET_P99_MS, TARGET_SUBMIT_OVERHEAD_MS = 1500, 25.0, 5.0
RESULTS = Path(__file__).resolve().parent / "results"


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(body: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(body).decode()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def load(client: httpx.AsyncClient, request, concurrency: int, seconds: float) -> tuple[float, list[float]]:
    """(requests per second, latencies in ms) of `concurrency` loops sending request(client) for `seconds`."""
    latencies, deadline = [], time.perf_counter() + seconds

    async def loop():
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            response = await request(client)
            latencies.append((time.perf_counter() - started) * 1000)
            if response.status_code >= 400:
                raise RuntimeError(f"{response.status_code}: {response.text[:300]}")

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - started), latencies


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def row(name: str, concurrency: int, rate: float, latencies: list[float], server_cpu_s: float | None) -> str:
    cpu = f"{server_cpu_s * 1000 / len(latencies):.2f}" if server_cpu_s is not None else "n/a"
    return (f"| {name} | {concurrency} | {rate:,.0f} | {statistics.median(latencies):.1f} | "
            f"{percentile(latencies, 0.99):.1f} | {cpu} |")


async def http_runs(report: Report, url: str, key: str, pid: int, concurrencies, seconds: float) -> dict:
    body = {"image": data_uri(png((70, 120, 200))), "mask": data_uri(png((255, 255, 255))), "prompt": "a house",
            "num_inference_steps": 1}
    limits = httpx.Limits(max_connections=max(concurrencies), max_keepalive_connections=max(concurrencies))
    results = {}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=60) as client:
        job_id = (await client.post("/v1/jobs", json=body)).json()["id"]
        for concurrency in concurrencies:
            await load(client, lambda c: c.get(f"/v1/jobs/{job_id}"), concurrency, 1.0)   # warm-up
            cpu = cpu_seconds(pid)
            rate, latencies = await load(client, lambda c: c.get(f"/v1/jobs/{job_id}"), concurrency, seconds)
            results[("read", concurrency)] = (rate, latencies)
            report.add(row("status read (GET /v1/jobs/{id})", concurrency, rate, latencies, cpu_seconds(pid) - cpu))
        for concurrency in concurrencies:
            cpu = cpu_seconds(pid)
            rate, latencies = await load(client, lambda c: c.post("/v1/jobs", json=body), concurrency, seconds)
            results[("submit", concurrency)] = (rate, latencies)
            report.add(row("submit (POST /v1/jobs, 2 inline 64x64 PNGs)", concurrency, rate, latencies,
                           cpu_seconds(pid) - cpu))
    return results


def direct_submits(redis_url: str, s3_url: str, seconds: float) -> list[float]:
    image, mask = png((70, 120, 200)), png((255, 255, 255))
    latencies = []
    with InpaintClient(broker_url=redis_url, s3_endpoint_url=s3_url, bucket=BUCKET, queue=QUEUE) as client:
        client.submit(image, mask, "warm-up")
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            client.submit(image, mask, "a house", num_inference_steps=1)
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    import fastapi
    import uvicorn

    return (f"{os.cpu_count()} cores ({cpu}), load average {os.getloadavg()[0]:.1f} at the start; Python "
            f"{platform.python_version()}, FastAPI {fastapi.__version__}, uvicorn {uvicorn.__version__}, "
            f"Redis {redis_version.removeprefix('v=')}, moto S3 server")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50], help="concurrent clients")
    parser.add_argument("--out", type=Path, default=RESULTS / f"{date.today()}-cpu-api.md")
    args = parser.parse_args(argv)
    header = "| what | clients | requests/s | p50 (ms) | p99 (ms) | server CPU ms/request |"
    report = Report(args.out, f"# {date.today()}, benchmarks/api.py, loopback, one uvicorn process", "",
                    machine() + ".", "", header, "|---|---|---|---|---|---|")
    with ExitStack() as stack:
        redis_server = stack.enter_context(devstack.start_redis())
        s3_server = stack.enter_context(devstack.start_s3())
        devstack.create_bucket(s3_server.endpoint_url, BUCKET)
        stack.enter_context(mock.patch.dict(os.environ, s3_server.env))
        env = {**devstack.worker_env(redis_server.url, s3_server.endpoint_url, BUCKET, "unused"),
               "INPAINT_LOG_LEVEL": "WARNING"}
        api = devstack.start_api(env)
        stack.callback(api.stop)
        with redis.Redis.from_url(redis_server.url, decode_responses=True) as connection:
            key = keys.create_key(connection, "bench", (QUEUE,), rate=0, max_active=0).key
        results = asyncio.run(http_runs(report, api.url, key, api.pid, args.concurrency, args.seconds))
        direct = direct_submits(redis_server.url, s3_server.endpoint_url, args.seconds)
    report.add(row("direct client submit (InpaintClient.submit)", 1, len(direct) / args.seconds, direct, None))
    summarize(report, results, direct, max(args.concurrency))
    return 0


def summarize(report: Report, results: dict, direct: list[float], top: int) -> None:
    read_rate, read_latencies = results[("read", top)]
    p99 = percentile(read_latencies, 0.99)
    # uvicorn serves on one event loop: one process's capacity is one core over its CPU time per read.
    overhead = statistics.median(results[("submit", 1)][1]) - statistics.median(direct)
    report.add("", f"Status reads at {top} clients: {read_rate:,.0f}/s, p99 {p99:.1f} ms (target >= "
               f"{TARGET_READS_PER_S:,}/s, p99 <= {TARGET_P99_MS:.0f} ms): "
               f"{'met' if read_rate >= TARGET_READS_PER_S and p99 <= TARGET_P99_MS else 'NOT met'}.",
               f"Submit over HTTP adds {overhead:.1f} ms p50 over the direct client's (target <= "
               f"{TARGET_SUBMIT_OVERHEAD_MS:.0f} ms): {'met' if overhead <= TARGET_SUBMIT_OVERHEAD_MS else 'NOT met'}.")


if __name__ == "__main__":
    sys.exit(main())
