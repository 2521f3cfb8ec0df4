"""The HTTP API against real processes: a private redis-server, a moto S3 server over HTTP, one `inpaint-worker`
on the tiny model (CPU) and one `inpaint-api` subprocess, shared by the tests of this folder."""
import base64
import io
import re
import secrets

import httpx
import pytest
import redis

from api_client import keys
from tests import devstack
# The private redis-server and moto S3 server of the service tests' fixtures (one of each for this folder).
from tests.service.conftest import WORKER_ENV, redis_server, s3_server, sample_image, sample_mask  # noqa: F401

BUCKET = "api-test"
EXTERNAL_BUCKET = "api-external"   # a bucket of the users' own, allowed as an input source
IDLE_QUEUE = "api-idle"            # no worker consumes it: jobs there stay queued
MAX_BODY_BYTES = 1024 * 1024
API_ENV = {"INPAINT_API_MAX_BODY_BYTES": str(MAX_BODY_BYTES), "INPAINT_API_KEEPALIVE_S": "0.2",
           "INPAINT_ALLOWED_BUCKETS": f"{BUCKET},{EXTERNAL_BUCKET}", "INPAINT_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
           "INPAINT_MAX_STEPS": WORKER_ENV["INPAINT_MAX_STEPS"], "INPAINT_MAX_PIXELS": WORKER_ENV["INPAINT_MAX_PIXELS"],
           "INPAINT_MAX_INPUT_BYTES": WORKER_ENV["INPAINT_MAX_INPUT_BYTES"], "INPAINT_LOG_LEVEL": "INFO"}
JOB_TIMEOUT_S = 120


def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def job_body(**fields) -> dict:
    return {"image": data_uri(sample_image()), "mask": data_uri(sample_mask()), "prompt": "a red square",
            "num_inference_steps": 2, "scheduler": "ddim", "seed": 1, **fields}


class Stack:
    def __init__(self, redis_url: str, s3_endpoint_url: str, api, env):
        self.redis_url, self.s3_endpoint_url, self.api, self.env = redis_url, s3_endpoint_url, api, env
        self.url = api.url
        self.redis = redis.Redis.from_url(self.redis_url, decode_responses=True)

    def new_key(self, name: str, queues=("inpaint",), rate: int = 0, max_active: int = 0) -> str:
        return keys.create_key(self.redis, name, queues, rate=rate, max_active=max_active).key

    def http(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=JOB_TIMEOUT_S)


@pytest.fixture(scope="session")
def stack(redis_server, s3_server, tiny_model_dir, tmp_path_factory):  # noqa: F811 (the imported fixtures)
    for bucket in (BUCKET, EXTERNAL_BUCKET):
        devstack.create_bucket(s3_server.endpoint_url, bucket)
    logs = tmp_path_factory.mktemp("api-logs")
    env = devstack.worker_env(redis_server.url, s3_server.endpoint_url, BUCKET, tiny_model_dir, **WORKER_ENV)
    worker = devstack.start_worker(env, args=["--without-mingle", "--without-gossip"], log_path=logs / "worker.log")
    api_env = {**env, **API_ENV}
    api = devstack.start_api(api_env, log_path=logs / "api.log")
    try:
        devstack.wait_worker_ready(redis_server.url, worker, timeout=180)
        yield Stack(redis_server.url, s3_server.endpoint_url, api, api_env)
    finally:
        api.stop()
        worker.stop()


@pytest.fixture
def key_name(request) -> str:
    """A key name unique to the test (key names are unique in Redis)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.originalname)[:40] + "-" + secrets.token_hex(3)
