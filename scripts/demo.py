"""`make demo`: the whole service on this machine, one job through it, the result under out/, then the web page.

Starts redis-server and a moto S3 server (unless INPAINT_BROKER_URL / INPAINT_S3_ENDPOINT_URL name running ones),
writes the tiny random model (unless INPAINT_MODEL names one), starts one worker and the HTTP API (`inpaint-api`),
creates an API key, submits examples/image.png and examples/mask.png over HTTP (the Python client's HTTP mode),
follows the job's server-sent events and saves the image under out/. It prints the web page's URL and the key as
soon as the API is up, and after the job keeps everything running for the page until Ctrl-C (`--once`: it ends
after the job). Everything it started is stopped at the end, also on failure, Ctrl-C or SIGTERM; the demo's key is
revoked.
"""
import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python scripts/demo.py` from a checkout

import redis  # noqa: E402

from api_client import keys, schema  # noqa: E402
from api_client.cli import ProgressDisplay  # noqa: E402
from api_client.http import HttpInpaintClient  # noqa: E402
from tests import devstack  # noqa: E402

DEMO_BUCKET = "inpaint-demo"
PROMPT = "a red brick cottage with a blue door, warm afternoon light"
REAL_JOB = {"num_inference_steps": 30, "scheduler": "dpmpp_2m_karras", "seed": 42, "mask_blur": 4}
# The tiny model paints random pixels anyway, so the demo keeps its own job small and quick. It is written with
# SD's 8x VAE downsampling, so the images people send from the web page (512x512 and up) stay quick too.
TINY_JOB = {**REAL_JOB, "num_inference_steps": 6, "width": 64, "height": 64, "mask_blur": 1}
WORKER_READY_TIMEOUT_S = 300
JOB_TIMEOUT_S = 600


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="end after the job instead of serving the web page")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the services below are stopped either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)   # Ctrl-C also when started where SIGINT is ignored
    started = time.monotonic()
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="inpaint-demo-")))
        # The model is written in a subprocess while the servers start.
        tiny_writer = None if os.environ.get("INPAINT_MODEL") else _start_tiny_model(stack, scratch / "model")
        broker_url = os.environ.get("INPAINT_BROKER_URL") or stack.enter_context(devstack.start_redis()).url
        s3_url, bucket, aws = _storage(stack)
        model = os.environ.get("INPAINT_MODEL") or _finish_tiny_model(tiny_writer, scratch / "model")
        env = _service_env(broker_url, s3_url, bucket, model, aws)
        worker = _start_worker(stack, env, broker_url, scratch / "worker.log")
        api = devstack.start_api({**env, "INPAINT_LOG_LEVEL": "WARNING"}, log_path=scratch / "api.log")
        stack.callback(api.stop)
        key = _demo_key(stack, broker_url, env.get("INPAINT_QUEUE") or "inpaint")
        print(f"services up in {time.monotonic() - started:.1f}s; HTTP API at {api.url} (docs: {api.url}/docs; "
              f"worker log: {worker.log_path})\n{_page_lines(api.url, key)}", flush=True)
        client = stack.enter_context(HttpInpaintClient(api.url, key))
        job = TINY_JOB if tiny_writer else REAL_JOB
        outcome = _run_job(client, job, worker, started)
        if outcome == 0 and not args.once:
            _serve_page(api.url, key)
        return outcome


def _start_tiny_model(stack: ExitStack, folder: Path) -> subprocess.Popen:
    writer = subprocess.Popen([sys.executable, "-m", "worker.inference.model.tiny", str(folder), "--vae-scale", "8"],
                              cwd=ROOT, stdout=subprocess.DEVNULL)
    stack.callback(_stop, writer)
    return writer


def _finish_tiny_model(writer: subprocess.Popen, folder: Path) -> str:
    if writer.wait() != 0:
        raise RuntimeError(f"writing the tiny model failed (exit code {writer.returncode})")
    print(f"tiny random model written to {folder} (set INPAINT_MODEL to use real weights)", flush=True)
    return str(folder)


def _storage(stack: ExitStack) -> tuple[str | None, str, dict]:
    """(S3 endpoint, bucket, AWS variables for the worker): a private moto server with its bucket, or the
    configured S3 with the caller's own credentials."""
    if os.environ.get("INPAINT_S3_ENDPOINT_URL") or os.environ.get("INPAINT_BUCKET"):
        bucket = os.environ.get("INPAINT_BUCKET")
        if not bucket:
            raise RuntimeError("INPAINT_S3_ENDPOINT_URL is set: set INPAINT_BUCKET to the bucket to use there")
        return os.environ.get("INPAINT_S3_ENDPOINT_URL") or None, bucket, {}
    server = stack.enter_context(devstack.start_s3())
    devstack.create_bucket(server.endpoint_url, DEMO_BUCKET)
    os.environ.update(server.env)  # the client's boto3 signs with moto's fake keys
    return server.endpoint_url, DEMO_BUCKET, server.env


def _service_env(broker_url, s3_url, bucket, model, aws: dict) -> dict:
    """The worker's and the API's variables."""
    env = {**devstack.worker_env(broker_url, s3_url or "", bucket, model), **aws}
    for name in devstack.FAKE_AWS.keys() - aws.keys():
        env.pop(name)  # a real S3: the worker and the API use the caller's own credentials
    if os.environ.get("INPAINT_QUEUE"):
        env["INPAINT_QUEUE"] = os.environ["INPAINT_QUEUE"]
    return env


def _demo_key(stack: ExitStack, broker_url: str, queue: str) -> str:
    """A key for this run, as `inpaint keys create` makes them; revoked at the end."""
    connection = stack.enter_context(redis.Redis.from_url(broker_url, decode_responses=True))
    name = f"demo-{secrets.token_hex(4)}"
    key = keys.create_key(connection, name, [queue]).key
    stack.callback(keys.revoke_key, connection, name)
    return key


def _start_worker(stack, env: dict, broker_url: str, log_path: Path):
    print("starting a worker (loads the model) ...", flush=True)
    worker = devstack.start_worker(env, log_path=log_path)
    stack.callback(worker.stop)
    devstack.wait_worker_ready(broker_url, worker, timeout=WORKER_READY_TIMEOUT_S)
    return worker


def _run_job(client: HttpInpaintClient, job: dict, worker, started: float) -> int:
    image, mask = ROOT / "examples" / "image.png", ROOT / "examples" / "mask.png"
    job_id = client.submit(image, mask, PROMPT, **job)
    print(f"submitted job {job_id} over HTTP: {PROMPT!r}", flush=True)
    try:
        _show_progress(client, job_id)
    except BaseException:
        client.cancel(job_id)  # Ctrl-C or a failure: the worker stops at its next step
        raise
    status = client.status(job_id)
    if status.state != schema.SUCCEEDED:
        print(f"job {status.state}: {status.error}\n--- worker log ---\n{worker.log_text()[-3000:]}",
              file=sys.stderr)
        return 1
    files = client.download(job_id, ROOT / "out")
    timings = status.result["timings"]
    print(f"done in {time.monotonic() - started:.1f}s (inference {timings['inference_s']:.1f}s)")
    for path in files:
        print(f"saved {path}")
    return 0


def _show_progress(client: HttpInpaintClient, job_id: str) -> None:
    display = ProgressDisplay(sys.stdout)
    for event in client.events(job_id, timeout=JOB_TIMEOUT_S):
        display.show(event)
    display.close()


def _page_lines(url: str, key: str) -> str:
    return f"web page: {url}/\nAPI key:  {key}   (type it into the page's \"API key\" field)"


def _serve_page(url: str, key: str) -> None:
    print(f"\nthe services keep running for the web page:\n{_page_lines(url, key)}\nCtrl-C stops everything",
          flush=True)
    signal.pause()   # until Ctrl-C (KeyboardInterrupt) or SIGTERM (SystemExit): both unwind the services


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(10)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; everything the demo started is stopped", file=sys.stderr)
        sys.exit(130)
