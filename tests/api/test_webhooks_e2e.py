"""End to end: a job submitted over HTTP to a real `inpaint-api` process, with a webhook, run by a real worker on
the tiny model; the local receiver gets `job.completed` with the job object, its signature verified by the
`standardwebhooks` package with the key's secret from GET /v1/webhook-secret. Also: a submit whose webhook points at
a refused address answers 422 naming it."""
import base64
import io
import os
import subprocess
import sys
import time

import httpx
import pytest
import redis
from PIL import Image

from api_client import keys
from tests import devstack
from tests.api.receiver import WebhookReceiver

BUCKET = "inpaint-webhooks-e2e"
WORKER_ENV = {"INPAINT_DEVICE": "cpu", "INPAINT_KERNELS": "torch", "INPAINT_CUDA_GRAPHS": "off",
              "INPAINT_MAX_PIXELS": str(128 * 128), "INPAINT_LOG_LEVEL": "INFO", "TRITON_INTERPRET": "1"}
API_PROCESS = "import sys; from api.app import main; sys.exit(main(sys.argv[1:]))"


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    """redis-server, moto S3, one worker and one inpaint-api process; yields (api_url, redis_url)."""
    logs = tmp_path_factory.mktemp("webhooks-e2e")
    with devstack.start_redis() as redis_server, devstack.start_s3() as s3_server:
        devstack.create_bucket(s3_server.endpoint_url, BUCKET)
        env = devstack.worker_env(redis_server.url, s3_server.endpoint_url, BUCKET, tiny_model_dir, **WORKER_ENV)
        worker = devstack.start_worker(env, args=["--without-mingle", "--without-gossip"],
                                       log_path=logs / "worker.log")
        port = devstack.free_port()
        api_log = open(logs / "api.log", "wb")
        api = subprocess.Popen([sys.executable, "-c", API_PROCESS, "--port", str(port)], stdout=api_log,
                               stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, **env, "INPAINT_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
                                    "INPAINT_WEBHOOK_BACKOFF_S": "0.5"})
        try:
            api_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{api_url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert api.poll() is None and time.monotonic() < deadline, (logs / "api.log").read_text()
                time.sleep(0.1)
            devstack.wait_worker_ready(redis_server.url, worker, timeout=180)
            yield api_url, redis_server.url
        finally:
            api.terminate()
            api.wait(20)
            api_log.close()
            worker.stop()


@pytest.fixture(scope="module")
def api_key(stack):
    with redis.Redis.from_url(stack[1], decode_responses=True) as client:
        return keys.create_key(client, "webhooks-e2e", ["inpaint"]).key


def job_body(webhook: str, **extra) -> dict:
    image = Image.new("RGB", (64, 64), (40, 90, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    return {"image": data_uri(image), "mask": data_uri(mask), "prompt": "a red square", "num_inference_steps": 2,
            "scheduler": "ddim", "seed": 1, "webhook": webhook, **extra}


def test_a_job_submitted_over_http_calls_its_webhook_when_it_completes(stack, api_key):
    api_url, _ = stack
    headers = {"authorization": f"Bearer {api_key}"}
    secret = httpx.get(f"{api_url}/v1/webhook-secret", headers=headers).json()["webhook_secret"]
    receiver = WebhookReceiver(secret, answers=[500])   # the first POST fails: the retry carries the same id
    try:
        answer = httpx.post(f"{api_url}/v1/jobs", headers=headers, timeout=30,
                            json=job_body(receiver.url(), webhook_events_filter=["start", "completed"]))
        assert answer.status_code == 201, answer.text
        job_id = answer.json()["id"]
        assert answer.json()["webhook"]["url"] == receiver.url()
        deadline = time.monotonic() + 120
        while not any(d.payload and d.payload["type"] == "job.completed" for d in receiver.deliveries):
            assert time.monotonic() < deadline, f"no job.completed; got {receiver.deliveries}"
            time.sleep(0.1)
        time.sleep(1.0)   # a duplicate would come now
        deliveries = list(receiver.deliveries)
    finally:
        receiver.close()
    assert all(d.payload is not None for d in deliveries)   # every signature verified
    types = [d.payload["type"] for d in deliveries]
    assert sorted(set(types)) == ["job.completed", "job.start"] and len(types) == 3
    assert [d.msg_id for d in deliveries].count(deliveries[0].msg_id) == 2   # the failed first POST, its retry
    completed = next(d.payload for d in deliveries if d.payload["type"] == "job.completed")
    job = completed["data"]
    assert job["id"] == job_id and job["state"] == "succeeded"
    assert len(job["result"]["images"]) == 1 and job["urls"]["self"] == f"/v1/jobs/{job_id}"
    shown = httpx.get(f"{api_url}/v1/jobs/{job_id}", headers=headers).json()["webhook"]
    assert shown["state"] == "delivered" and shown["attempts"] == 3 and shown["events"] == ["start", "completed"]


def test_a_webhook_to_a_refused_address_is_a_422(stack, api_key):
    api_url, _ = stack
    answer = httpx.post(f"{api_url}/v1/jobs", headers={"authorization": f"Bearer {api_key}"}, timeout=30,
                        json=job_body("http://169.254.169.254/latest/meta-data"))
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "invalid_input"
    assert error["message"].startswith("webhook: 169.254.169.254 is a link-local address")
