"""A fleet to break: redis-server with AOF and a password (restartable on the same port and data folder), moto's S3
server behind a proxy the tests can cut, and `inpaint-worker` processes on the tiny model (CPU) with short leases.
The fleet is shared by the session; a test that kills workers starts replacements with `fleet.ensure_workers()`."""
import io
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import pytest
import redis
from celery import Celery
from PIL import Image

from api_client import schema, state
from api_client.client import InpaintClient
from tests.reliability.faults import CuttableProxy
from tests.service.conftest import sample_image, sample_mask  # noqa: F401 (re-exported to the tests here)
from tests import devstack

BUCKET = "inpaint-rel"
OTHER_BUCKET = "not-allowed"
REDIS_PASSWORD = "redis-S3cret-4f9a"
AWS_SECRET = "aws-S3cret-77c1"   # moto accepts any credentials; this one must never show up in logs or results
LEASE_S, HEARTBEAT_S, WATCHDOG_S = 3.0, 0.5, 0.5
FLEET_SIZE = 3
WORKER_ENV = {
    "INPAINT_DEVICE": "cpu", "INPAINT_KERNELS": "torch", "INPAINT_CUDA_GRAPHS": "off",
    "INPAINT_PROGRESS_INTERVAL_S": "0", "INPAINT_MAX_STEPS": "200", "INPAINT_MAX_PIXELS": str(128 * 128),
    "INPAINT_MAX_INPUT_BYTES": str(256 * 1024), "INPAINT_MAX_RETRIES": "3", "INPAINT_MAX_ATTEMPTS": "4",
    "INPAINT_RETRY_BACKOFF_S": "0.5", "INPAINT_RETRY_BACKOFF_MAX_S": "2",
    "INPAINT_LEASE_S": str(LEASE_S), "INPAINT_HEARTBEAT_S": str(HEARTBEAT_S),
    "INPAINT_WATCHDOG_INTERVAL_S": str(WATCHDOG_S), "INPAINT_ALLOWED_BUCKETS": BUCKET,
    "INPAINT_PRESIGN_EXPIRY_S": "900", "INPAINT_LOG_LEVEL": "INFO",
    "AWS_ACCESS_KEY_ID": "rel-key-id", "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
}
JOB_TIMEOUT_S = 90


class RestartableRedis:
    """redis-server with AOF (fsync every second) and a password, on a fixed port and data folder, so a restart
    finds the queue, the unacknowledged deliveries and the job states again."""

    def __init__(self, port: int | None = None):
        self.port = port or devstack.free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="inpaint-rel-redis-"))
        self.url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{self.port}/0"
        self.process = None
        self.start()

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                   "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                   "--maxmemory-policy", "noeviction", "--requirepass", REDIS_PASSWORD,
                   "--logfile", str(self.folder / "redis.log")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + 10
        while not self._ping():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server did not start: {(self.folder / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def _ping(self) -> bool:
        try:
            with redis.Redis.from_url(self.url, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self, sig=signal.SIGTERM) -> None:
        """SIGTERM: Redis' own shutdown, which writes the AOF out; SIGKILL: a crash (up to ~1 s of writes lost)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(15)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class Fleet:
    def __init__(self, redis_server: RestartableRedis, s3_server, proxy: CuttableProxy, model_dir, log_dir: Path):
        self.redis_server, self.s3_server, self.proxy = redis_server, s3_server, proxy
        self.redis_url, self.log_dir = redis_server.url, log_dir
        self.env = devstack.worker_env(self.redis_url, proxy.url, BUCKET, model_dir, **WORKER_ENV)
        self.workers: list = []
        self.redis = redis.Redis.from_url(self.redis_url, decode_responses=True)
        # Test-side S3 goes straight to moto: cutting the proxy cuts only the workers.
        self.s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id="rel-key-id",
                               aws_secret_access_key=AWS_SECRET, region_name="us-east-1")
        self.client = InpaintClient(broker_url=self.redis_url, s3_endpoint_url=s3_server.endpoint_url,
                                    bucket=BUCKET)
        self.celery = Celery("inpaint-rel-tests", broker=self.redis_url, set_as_current=False)
        self.celery.conf.update(task_serializer="json", accept_content=["json"])

    # Workers
    def start_workers(self, count: int) -> list:
        started = [devstack.start_worker(self.env, args=["--without-mingle", "--without-gossip"],
                                         log_path=self.log_dir / f"worker-{uuid.uuid4().hex[:8]}.log")
                   for _ in range(count)]
        for worker in started:
            self._wait_ready(worker)
        self.workers.extend(started)
        return started

    def _wait_ready(self, worker, tries: int = 3) -> None:
        # After a Redis restart the first ping may meet a connection the server closed; that is not the worker's
        # failure, so ask again.
        for attempt in range(tries):
            try:
                devstack.wait_worker_ready(self.redis_url, worker, timeout=180)
                return
            except redis.ConnectionError:
                if attempt == tries - 1:
                    raise

    def live_workers(self) -> list:
        return [worker for worker in self.workers if worker.poll() is None]

    def ensure_workers(self, count: int = FLEET_SIZE) -> None:
        missing = count - len(self.live_workers())
        if missing > 0:
            self.start_workers(missing)

    def worker_named(self, hostname: str):
        return next(worker for worker in self.workers if worker.hostname == hostname)

    def logs(self) -> str:
        return "".join(worker.log_text() for worker in self.workers)

    # Jobs
    def put_image(self, key: str, image: Image.Image, bucket: str = BUCKET, image_format: str = "PNG") -> str:
        buffer = io.BytesIO()
        image.save(buffer, format=image_format)
        return self.put_bytes(key, buffer.getvalue(), bucket)

    def put_bytes(self, key: str, body: bytes, bucket: str = BUCKET) -> str:
        self.s3.put_object(Bucket=bucket, Key=key, Body=body)
        return f"s3://{bucket}/{key}"

    def raw_job(self, **fields) -> dict:
        job_id = fields.pop("job_id", None) or uuid.uuid4().hex
        image = fields.pop("image", None) or self.put_image(f"in/{job_id}/image.png", sample_image())
        mask = fields.pop("mask", None) or self.put_image(f"in/{job_id}/mask.png", sample_mask())
        return {"job_id": job_id, "image": image, "mask": mask, "prompt": "a red square",
                "num_inference_steps": 2, "scheduler": "ddim", "seed": 1,
                "output": {"bucket": BUCKET, "prefix": f"jobs/{job_id}/", "format": "png"}, **fields}

    def submit(self, steps: int = 2, **options) -> str:
        options = {"scheduler": "ddim", "seed": 7, **options}
        return self.client.submit(sample_image(), sample_mask(), "a red square", num_inference_steps=steps,
                                  **options)

    def send_raw(self, job: dict) -> str:
        self.celery.send_task(schema.TASK_NAME, args=[job], task_id=str(job.get("job_id")), queue="inpaint",
                              serializer="json")
        return job.get("job_id")

    def status(self, job_id: str) -> schema.JobStatus:
        return schema.JobStatus.from_hash(job_id, self.redis.hgetall(state.job_key(job_id)))

    def events(self, job_id: str) -> list[dict]:
        return [state.parse_event(fields) for _, fields in self.redis.xrange(state.job_events_key(job_id))]

    def wait_for(self, job_id: str, predicate, timeout: float = JOB_TIMEOUT_S) -> schema.JobStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = self.status(job_id)
                if predicate(status):
                    return status
            except redis.ConnectionError:   # Redis restarting
                pass
            time.sleep(0.05)
        raise AssertionError(f"job {job_id}: condition not met after {timeout}s: {self.status(job_id)}\n"
                             f"events: {self.events(job_id)}\nlogs:\n{self.logs()[-6000:]}")

    def wait_final(self, job_id: str, timeout: float = JOB_TIMEOUT_S) -> schema.JobStatus:
        return self.wait_for(job_id, lambda status: status.final, timeout)

    def wait_running(self, job_id: str, min_step: int = 1) -> schema.JobStatus:
        return self.wait_for(job_id, lambda status: status.state == schema.RUNNING and status.step >= min_step)

    def output_keys(self, job_id: str) -> list[str]:
        listing = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"jobs/{job_id}/")
        return sorted(item["Key"] for item in listing.get("Contents", []))

    def close(self) -> None:
        self.client.close()
        self.celery.close()
        self.redis.close()


@pytest.fixture(scope="session")
def rel_redis():
    server = RestartableRedis()
    yield server
    server.close()


@pytest.fixture(scope="session")
def rel_s3():
    with devstack.start_s3() as server:
        for bucket in (BUCKET, OTHER_BUCKET):
            devstack.create_bucket(server.endpoint_url, bucket)
        yield server


@pytest.fixture(scope="session")
def fleet(rel_redis, rel_s3, tiny_model_dir, tmp_path_factory):
    proxy = CuttableProxy(rel_s3.port)
    # The client's own boto3 session reads these (it talks to moto directly).
    os.environ.update({"AWS_ACCESS_KEY_ID": "rel-key-id", "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
                       "AWS_DEFAULT_REGION": "us-east-1"})
    fleet = Fleet(rel_redis, rel_s3, proxy, tiny_model_dir, tmp_path_factory.mktemp("rel-worker-logs"))
    try:
        fleet.start_workers(FLEET_SIZE)
        yield fleet
    finally:
        for worker in fleet.workers:
            if worker.poll() is None:
                worker.terminate()
        for worker in fleet.workers:
            worker.stop()
        fleet.close()
        proxy.close()


@pytest.fixture
def healthy_fleet(fleet):
    """The fleet with all its workers up and S3 reachable, before and after the test."""
    fleet.proxy.restore()
    fleet.ensure_workers()
    yield fleet
