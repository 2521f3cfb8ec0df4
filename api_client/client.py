"""The Python client of DESIGN §7: submit jobs, read their state and events, fetch results, cancel.

The client talks to the same Redis (queue, job state, event streams) and S3 bucket as the workers, reads the same
environment variables (DESIGN §6), and sends the `inpaint.run` task by name through Celery, so it never imports the
worker (nor torch). `InpaintClient` is blocking; `AsyncInpaintClient` has the same methods as coroutines.
"""
import asyncio
import io
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import boto3
import redis
import redis.asyncio
from celery import Celery
from PIL import Image, UnidentifiedImageError

from api_client import schema

__all__ = ["InpaintClient", "AsyncInpaintClient", "ClientConfig", "EnqueueError"]

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
DEFAULT_QUEUE = "inpaint"
# How long one blocking stream read waits before the client re-reads the job's hash (a job whose stream expired
# or was trimmed still ends the iteration).
EVENT_BLOCK_MS = 1000
# Publishing retries briefly, then raises: a caller must learn that the job was not enqueued.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}

# Creates the job's `queued` state, and its first event, only when the job's hash does not exist yet, in one step:
# a duplicate submit of the same job_id must neither overwrite the state of a job that ran nor enqueue it again.
# KEYS: job hash, job stream, shared stream. ARGV: ttl seconds, shared stream cap, n hash fields, then the hash
# fields and values, then the event fields and values.
CREATE_QUEUED_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local ttl, cap, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state, event = {}, {}
for i = 4, 3 + 2 * n do state[#state + 1] = ARGV[i] end
for i = 4 + 2 * n, #ARGV do event[#event + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(state))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('XADD', KEYS[2], '*', unpack(event))
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', cap, '*', unpack(event))
return 1
"""


class EnqueueError(RuntimeError):
    """The job could not be put on the queue; nothing of it is left behind, so the same job_id may be resubmitted."""


@dataclass(frozen=True)
class ClientConfig:
    broker_url: str = DEFAULT_BROKER_URL
    state_url: str | None = None          # None: the broker's Redis holds the state and events too
    s3_endpoint_url: str | None = None    # None: AWS
    bucket: str | None = None
    queue: str = DEFAULT_QUEUE

    @classmethod
    def from_env(cls, environ=None) -> "ClientConfig":
        """The worker's variables (DESIGN §6), read by name: the client does not import the worker's settings."""
        env = os.environ if environ is None else environ
        return cls(broker_url=env.get("INPAINT_BROKER_URL") or DEFAULT_BROKER_URL,
                   state_url=env.get("INPAINT_STATE_URL") or None,
                   s3_endpoint_url=env.get("INPAINT_S3_ENDPOINT_URL") or None,
                   bucket=env.get("INPAINT_BUCKET") or None,
                   queue=env.get("INPAINT_QUEUE") or DEFAULT_QUEUE)


@dataclass(frozen=True)
class _Upload:
    key: str
    body: bytes
    content_type: str


@dataclass(frozen=True)
class _Submission:
    job: dict
    uploads: list[_Upload]


class _ClientCore:
    """What the blocking and the asyncio client share: configuration, S3, Celery, and the pure job logic."""

    def __init__(self, broker_url: str = DEFAULT_BROKER_URL, state_url: str | None = None,
                 s3_endpoint_url: str | None = None, bucket: str | None = None, queue: str = DEFAULT_QUEUE):
        self.config = ClientConfig(broker_url, state_url, s3_endpoint_url, bucket, queue)
        self._s3 = boto3.client("s3", endpoint_url=s3_endpoint_url)
        self._celery = _celery_app(broker_url)

    @classmethod
    def from_env(cls, environ=None):
        config = ClientConfig.from_env(environ)
        return cls(config.broker_url, config.state_url, config.s3_endpoint_url, config.bucket, config.queue)

    @property
    def _state_url(self) -> str:
        return self.config.state_url or self.config.broker_url

    def _prepare(self, image, mask, prompt: str, options: dict) -> _Submission:
        """The validated job and the input files to upload; raises ValueError before anything is sent."""
        options = dict(options)
        job_id = options.pop("job_id", None) or uuid.uuid4().hex
        output_format = options.pop("output_format", "png")
        uploads, uris = [], {}
        for name, value in (("image", image), ("mask", mask)):
            uri, upload = self._input(name, value, job_id)
            uris[name] = uri
            if upload is not None:
                uploads.append(upload)
        bucket = self._require_bucket()
        job = schema.Job.from_dict({
            "job_id": job_id, "image": uris["image"], "mask": uris["mask"], "prompt": prompt, **options,
            "output": {"bucket": bucket, "prefix": f"jobs/{job_id}/", "format": output_format}})
        return _Submission(job=job.to_dict(), uploads=uploads)

    def _input(self, name: str, value, job_id: str) -> tuple[str, _Upload | None]:
        if isinstance(value, str) and value.startswith("s3://"):
            return value, None
        body, extension = _encoded_image(name, value)
        key = f"inputs/{job_id}/{name}.{extension}"
        return f"s3://{self._require_bucket()}/{key}", _Upload(key, body, f"image/{extension}")

    def _require_bucket(self) -> str:
        if not self.config.bucket:
            raise ValueError("bucket: no S3 bucket configured; set INPAINT_BUCKET or pass bucket=")
        return self.config.bucket

    def _upload(self, upload: _Upload) -> None:
        self._s3.put_object(Bucket=self.config.bucket, Key=upload.key, Body=upload.body,
                            ContentType=upload.content_type)

    def _send(self, job: dict) -> None:
        try:
            self._celery.send_task(schema.TASK_NAME, args=[job], task_id=job["job_id"], queue=self.config.queue,
                                   priority=job["priority"], serializer="json", retry=True,
                                   retry_policy=PUBLISH_RETRY_POLICY)
        except Exception as error:  # kombu raises many transport-specific types; the caller needs one
            raise EnqueueError(f"enqueue: could not send job {job['job_id']} to queue {self.config.queue!r} "
                               f"on {_redacted(self.config.broker_url)}: {error}") from error

    def _revoke(self, job_id: str) -> None:
        self._celery.control.revoke(job_id)

    def _create_queued_args(self, job: dict) -> tuple[list[str], list]:
        job_id = job["job_id"]
        state = schema.queued_state_fields(job)
        event = schema.event_fields(job_id, "state", state=schema.QUEUED)
        keys = [schema.job_key(job_id), schema.job_events_key(job_id), schema.EVENTS_STREAM]
        args = [schema.STATE_TTL_SECONDS, schema.EVENTS_STREAM_MAXLEN, len(state)]
        args += [item for pair in state.items() for item in pair]
        args += [item for pair in event.items() for item in pair]
        return keys, args

    def _images(self, status: "schema.JobStatus") -> list[tuple[str, str]]:
        if status.state != schema.SUCCEEDED:
            raise ValueError(f"job {status.job_id}: no images to fetch, the job is {status.state}")
        return [_split_s3_uri(image["uri"]) for image in status.result["images"]]

    def _get_image(self, bucket: str, key: str) -> Image.Image:
        body = self._s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        image = Image.open(io.BytesIO(body))
        image.load()
        return image


class InpaintClient(_ClientCore):
    """Blocking client. See the module docstring and DESIGN §7."""

    def __init__(self, broker_url: str = DEFAULT_BROKER_URL, state_url: str | None = None,
                 s3_endpoint_url: str | None = None, bucket: str | None = None, queue: str = DEFAULT_QUEUE):
        super().__init__(broker_url, state_url, s3_endpoint_url, bucket, queue)
        self._redis = redis.Redis.from_url(self._state_url, decode_responses=True)
        self._create_queued = self._redis.register_script(CREATE_QUEUED_SCRIPT)

    def close(self) -> None:
        self._redis.close()
        self._celery.close()

    def __enter__(self) -> "InpaintClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def submit(self, image, mask, prompt: str, **job_options) -> str:
        """Validate, upload local inputs, record the job as queued and enqueue it; returns the job_id.

        A job_id that already has a state is not enqueued again (submits are idempotent by job_id).
        """
        submission = self._prepare(image, mask, prompt, job_options)
        job = submission.job
        if self._redis.exists(schema.job_key(job["job_id"])):
            return job["job_id"]
        for upload in submission.uploads:
            self._upload(upload)
        keys, args = self._create_queued_args(job)
        if self._create_queued(keys=keys, args=args):
            try:
                self._send(job)
            except EnqueueError:
                self._redis.delete(*keys[:2])
                raise
        return job["job_id"]

    def status(self, job_id: str) -> "schema.JobStatus":
        return schema.JobStatus.from_hash(job_id, self._redis.hgetall(schema.job_key(job_id)))

    def events(self, job_id: str, timeout: float | None = None):
        """Yield the job's events (dicts) from its first, blocking for new ones; ends after a final state.

        Raises TimeoutError when `timeout` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        stream, last_id = schema.job_events_key(job_id), "0-0"
        while True:
            reply = self._redis.xread({stream: last_id}, block=_block_ms(deadline, job_id), count=100)
            entries = reply[0][1] if reply else []
            for last_id, fields in entries:
                event = schema.parse_event(fields)
                yield event
                if event["state"] in schema.FINAL_STATES:
                    return
            if not entries and self.status(job_id).state in schema.FINAL_STATES:
                return

    def wait(self, job_id: str, timeout: float | None = None) -> "schema.JobStatus":
        """The job's final status; raises TimeoutError after `timeout` seconds."""
        for _ in self.events(job_id, timeout=timeout):
            pass
        return self.status(job_id)

    def fetch(self, job_id: str) -> list[Image.Image]:
        return [self._get_image(bucket, key) for bucket, key in self._images(self.status(job_id))]

    def cancel(self, job_id: str) -> None:
        """Ask the job to stop: set its cancel flag (read between denoise steps) and revoke the queued task."""
        self._redis.set(schema.cancel_key(job_id), "1", ex=schema.STATE_TTL_SECONDS)
        self._revoke(job_id)


class AsyncInpaintClient(_ClientCore):
    """The asyncio twin of InpaintClient: Redis through redis.asyncio, S3 and Celery calls in threads."""

    def __init__(self, broker_url: str = DEFAULT_BROKER_URL, state_url: str | None = None,
                 s3_endpoint_url: str | None = None, bucket: str | None = None, queue: str = DEFAULT_QUEUE):
        super().__init__(broker_url, state_url, s3_endpoint_url, bucket, queue)
        self._redis = redis.asyncio.Redis.from_url(self._state_url, decode_responses=True)
        self._create_queued = self._redis.register_script(CREATE_QUEUED_SCRIPT)

    async def aclose(self) -> None:
        await self._redis.aclose()
        await asyncio.to_thread(self._celery.close)

    async def __aenter__(self) -> "AsyncInpaintClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def submit(self, image, mask, prompt: str, **job_options) -> str:
        submission = await asyncio.to_thread(self._prepare, image, mask, prompt, job_options)
        job = submission.job
        if await self._redis.exists(schema.job_key(job["job_id"])):
            return job["job_id"]
        await asyncio.gather(*(asyncio.to_thread(self._upload, upload) for upload in submission.uploads))
        keys, args = self._create_queued_args(job)
        if await self._create_queued(keys=keys, args=args):
            try:
                await asyncio.to_thread(self._send, job)
            except EnqueueError:
                await self._redis.delete(*keys[:2])
                raise
        return job["job_id"]

    async def status(self, job_id: str) -> "schema.JobStatus":
        return schema.JobStatus.from_hash(job_id, await self._redis.hgetall(schema.job_key(job_id)))

    async def events(self, job_id: str, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        stream, last_id = schema.job_events_key(job_id), "0-0"
        while True:
            reply = await self._redis.xread({stream: last_id}, block=_block_ms(deadline, job_id), count=100)
            entries = reply[0][1] if reply else []
            for last_id, fields in entries:
                event = schema.parse_event(fields)
                yield event
                if event["state"] in schema.FINAL_STATES:
                    return
            if not entries and (await self.status(job_id)).state in schema.FINAL_STATES:
                return

    async def wait(self, job_id: str, timeout: float | None = None) -> "schema.JobStatus":
        async for _ in self.events(job_id, timeout=timeout):
            pass
        return await self.status(job_id)

    async def fetch(self, job_id: str) -> list[Image.Image]:
        locations = self._images(await self.status(job_id))
        return list(await asyncio.gather(*(asyncio.to_thread(self._get_image, b, k) for b, k in locations)))

    async def cancel(self, job_id: str) -> None:
        await self._redis.set(schema.cancel_key(job_id), "1", ex=schema.STATE_TTL_SECONDS)
        await asyncio.to_thread(self._revoke, job_id)


def _celery_app(broker_url: str) -> Celery:
    # JSON only, as the workers accept (DESIGN §4); the client never runs tasks, so no result backend.
    app = Celery("inpaint-client", broker=broker_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=False)
    return app


def _encoded_image(name: str, value) -> tuple[bytes, str]:
    """(file bytes, extension) of an input given as a PIL image, bytes or a path; PIL images are sent as PNG."""
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue(), "png"
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{name}: no such file: {path}")
        value = path.read_bytes()
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{name}: expected a PIL image, bytes, a path or an s3:// URI, got {type(value).__name__}")
    body = bytes(value)
    try:
        with Image.open(io.BytesIO(body)) as image:
            image_format = image.format
    except UnidentifiedImageError:
        raise ValueError(f"{name}: the bytes are not an image PIL can read") from None
    return body, image_format.lower()


def _split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.lstrip("/"):
        raise ValueError(f"uri: {uri!r} is not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def _block_ms(deadline: float | None, job_id: str) -> int:
    """How long the next stream read may block; raises TimeoutError once the deadline has passed."""
    if deadline is None:
        return EVENT_BLOCK_MS
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"job {job_id}: not finished within the timeout")
    return max(1, min(EVENT_BLOCK_MS, int(left * 1000)))


def _redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@")).geturl()
