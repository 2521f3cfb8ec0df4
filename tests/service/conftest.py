"""The service for integration tests: a private redis-server, a moto S3 server over HTTP, and two real
`inpaint-worker` processes on the tiny random model (CPU), shared by the whole session."""
import io
import os
import uuid

import boto3
import pytest
import redis
from celery import Celery
from PIL import Image

from api_client import schema, state
from api_client.client import InpaintClient
from tests import devstack

BUCKET = "inpaint-test"
OTHER_BUCKET = "not-allowed"   # exists, but the workers may not touch it
WORKER_ENV = {
    "INPAINT_DEVICE": "cpu", "INPAINT_KERNELS": "torch", "INPAINT_CUDA_GRAPHS": "off",
    "INPAINT_PROGRESS_INTERVAL_S": "0", "INPAINT_MAX_STEPS": "60", "INPAINT_MAX_PIXELS": str(128 * 128),
    "INPAINT_MAX_INPUT_BYTES": str(256 * 1024), "INPAINT_MAX_RETRIES": "1", "INPAINT_RETRY_BACKOFF_S": "0.2",
    "INPAINT_LOG_LEVEL": "INFO", "TRITON_INTERPRET": "1",
}


class Service:
    def __init__(self, redis_server, s3_server, workers, metrics_urls):
        self.redis_url, self.s3_endpoint_url, self.workers = redis_server.url, s3_server.endpoint_url, workers
        self.metrics_urls = metrics_urls
        self.redis = redis.Redis.from_url(self.redis_url, decode_responses=True)
        self.s3 = boto3.client("s3", endpoint_url=self.s3_endpoint_url, **_boto_credentials(s3_server.env))
        self.client = InpaintClient(broker_url=self.redis_url, s3_endpoint_url=self.s3_endpoint_url, bucket=BUCKET)
        self.celery = Celery("inpaint-tests", broker=self.redis_url, set_as_current=False)
        self.celery.conf.update(task_serializer="json", accept_content=["json"])

    def put_image(self, key: str, image: Image.Image, bucket: str = BUCKET) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return self.put_bytes(key, buffer.getvalue(), bucket)

    def put_bytes(self, key: str, body: bytes, bucket: str = BUCKET) -> str:
        self.s3.put_object(Bucket=bucket, Key=key, Body=body)
        return f"s3://{bucket}/{key}"

    def raw_job(self, **fields) -> dict:
        """A job dict sent as is (no client-side validation, no queued state)."""
        job_id = fields.pop("job_id", None) or uuid.uuid4().hex
        image = fields.pop("image", None) or self.put_image(f"in/{job_id}/image.png", sample_image())
        mask = fields.pop("mask", None) or self.put_image(f"in/{job_id}/mask.png", sample_mask())
        return {"job_id": job_id, "image": image, "mask": mask, "prompt": "a red square",
                "num_inference_steps": 2, "scheduler": "ddim", "seed": 1,
                "output": {"bucket": BUCKET, "prefix": f"jobs/{job_id}/", "format": "png"}, **fields}

    def send_raw(self, job: dict) -> str:
        self.celery.send_task(schema.TASK_NAME, args=[job], task_id=str(job.get("job_id")), queue="inpaint",
                              serializer="json")
        return job.get("job_id")

    def events(self, job_id: str) -> list[dict]:
        return [state.parse_event(fields) for _, fields in self.redis.xrange(state.job_events_key(job_id))]

    def shared_events(self, job_id: str) -> list[dict]:
        return [e for e in (state.parse_event(f) for _, f in self.redis.xrange(state.EVENTS_STREAM))
                if e["job_id"] == job_id]

    def close(self) -> None:
        self.client.close()
        self.celery.close()
        self.redis.close()


def _boto_credentials(env: dict) -> dict:
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_DEFAULT_REGION"]}


def sample_image(size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, (40, 90, 200))
    image.paste((220, 30, 30), (16, 16, 48, 48))
    return image


def sample_mask(size=(64, 64)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (8, 8, 40, 40))
    return mask


@pytest.fixture(scope="session")
def redis_server():
    with devstack.start_redis() as server:
        yield server


@pytest.fixture(scope="session")
def s3_server():
    with devstack.start_s3() as server:
        # boto3 clients made here (tests, the client, Storage.from_settings) read these: the fake S3's credentials.
        os.environ.update(server.env)
        for bucket in (BUCKET, OTHER_BUCKET):
            devstack.create_bucket(server.endpoint_url, bucket)
        yield server


@pytest.fixture(scope="session")
def service(redis_server, s3_server, tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("worker-logs")
    env = devstack.worker_env(redis_server.url, s3_server.endpoint_url, BUCKET, tiny_model_dir, **WORKER_ENV)
    # Both start (and load the model) at once; the waits then overlap.
    metrics_ports = [devstack.free_port() for _ in range(2)]
    # No mingle/gossip: two workers started together have nothing to sync, and start-up is a second shorter.
    workers = [devstack.start_worker({**env, "INPAINT_METRICS_PORT": str(port)},
                                     args=["--without-mingle", "--without-gossip"], log_path=logs / f"worker-{i}.log")
               for i, port in enumerate(metrics_ports)]
    try:
        for worker in workers:
            devstack.wait_worker_ready(redis_server.url, worker, timeout=180)
        service = Service(redis_server, s3_server, workers, [f"http://127.0.0.1:{port}" for port in metrics_ports])
        yield service
        service.close()
    finally:
        for worker in workers:
            worker.terminate()   # both shut down at once
        for worker in workers:
            worker.stop()
