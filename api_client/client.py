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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import redis
import redis.asyncio
from celery import Celery
from PIL import Image, UnidentifiedImageError

from api_client import schema, state
from api_client.s3 import s3_client
from api_client.schema import redact_url

__all__ = ["InpaintClient", "AsyncInpaintClient", "ClientConfig", "EnqueueError"]

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
DEFAULT_QUEUE = "inpaint"
INPUT_FORMATS = schema.INPUT_FORMATS
# How long one blocking stream read waits before the client re-reads the job's hash (a job whose stream expired
# or was trimmed still ends the iteration).
EVENT_BLOCK_MS = 1000
# Publishing retries briefly, then raises: a caller must learn that the job was not enqueued.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}

class EnqueueError(RuntimeError):
    """The job could not be put on the queue; nothing of it is left behind, so the same job_id may be resubmitted."""


@dataclass(frozen=True)
class ClientConfig:
    broker_url: str = DEFAULT_BROKER_URL
    state_url: str | None = None          # None: the broker's Redis holds the state and events too
    s3_endpoint_url: str | None = None    # None: AWS
    bucket: str | None = None
    queue: str = DEFAULT_QUEUE
    state_ttl_s: int = state.STATE_TTL_SECONDS
    events_maxlen: int = state.EVENTS_STREAM_MAXLEN

    @classmethod
    def from_env(cls, environ=None) -> "ClientConfig":
        """The worker's variables (DESIGN §6), read by name: the client does not import the worker's settings."""
        env = os.environ if environ is None else environ
        return cls(broker_url=env.get("INPAINT_BROKER_URL") or DEFAULT_BROKER_URL,
                   state_url=env.get("INPAINT_STATE_URL") or None,
                   s3_endpoint_url=env.get("INPAINT_S3_ENDPOINT_URL") or None,
                   bucket=env.get("INPAINT_BUCKET") or None,
                   queue=env.get("INPAINT_QUEUE") or DEFAULT_QUEUE,
                   state_ttl_s=_int_variable(env, "INPAINT_STATE_TTL_S", state.STATE_TTL_SECONDS),
                   events_maxlen=_int_variable(env, "INPAINT_EVENTS_MAXLEN", state.EVENTS_STREAM_MAXLEN))


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
    """What the blocking and the asyncio client share: configuration, S3, Celery, and the pure job logic.

    Subclasses set `_redis_class`: redis.Redis or redis.asyncio.Redis.
    """

    def __init__(self, broker_url: str = DEFAULT_BROKER_URL, state_url: str | None = None,
                 s3_endpoint_url: str | None = None, bucket: str | None = None, queue: str = DEFAULT_QUEUE,
                 state_ttl_s: int = state.STATE_TTL_SECONDS, events_maxlen: int = state.EVENTS_STREAM_MAXLEN):
        self.config = ClientConfig(broker_url, state_url, s3_endpoint_url, bucket, queue, state_ttl_s,
                                   events_maxlen)
        self._s3 = s3_client(s3_endpoint_url)
        self._celery = _celery_app(broker_url)
        self._redis = self._redis_class.from_url(state_url or broker_url, decode_responses=True)
        self._scripts = state.Scripts(self._redis, state_ttl_s, events_maxlen)
        # Image and mask go up side by side: against a remote S3 each PUT is a round trip.
        self._uploader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="inpaint-upload")

    @classmethod
    def from_env(cls, environ=None):
        """A client configured by the INPAINT_* variables of `environ` (default: os.environ)."""
        config = ClientConfig.from_env(environ)
        return cls(**{f.name: getattr(config, f.name) for f in fields(config)})

    def _prepare(self, image, mask, prompt: str, options: dict) -> _Submission:
        """The validated job and the input files to upload; raises ValueError before anything is sent."""
        options = dict(options)
        job_id = options.pop("job_id", None) or uuid.uuid4().hex
        if "output" in options:  # the client picks the destination: its bucket, under jobs/<job_id>/
            raise ValueError("submit() takes no output=; pass output_format=, and the client's bucket receives it")
        output_format = options.pop("output_format", "png")
        bucket = self._require_bucket()
        uploads, uris = [], {}
        for name, value in (("image", image), ("mask", mask)):
            if isinstance(value, str) and value.startswith("s3://"):
                uris[name] = value
                continue
            body, extension = _encoded_image(name, value)
            uploads.append(_Upload(f"inputs/{job_id}/{name}.{extension}", body, schema.CONTENT_TYPES[extension]))
            uris[name] = f"s3://{bucket}/{uploads[-1].key}"
        job = schema.Job.from_dict({
            "job_id": job_id, "image": uris["image"], "mask": uris["mask"], "prompt": prompt, **options,
            "output": {"bucket": bucket, "format": output_format}})  # the schema's prefix: jobs/<job_id>/
        return _Submission(job=job.to_dict(), uploads=uploads)

    def _require_bucket(self) -> str:
        if not self.config.bucket:
            raise ValueError("bucket: no S3 bucket configured; set INPAINT_BUCKET or pass bucket=")
        return self.config.bucket

    def _upload(self, upload: _Upload) -> None:
        self._s3.put_object(Bucket=self.config.bucket, Key=upload.key, Body=upload.body,
                            ContentType=upload.content_type)

    def _send(self, job: dict) -> None:
        """Publish the task by name, JSON, with the job_id as task id (so cancel can revoke it)."""
        try:
            self._celery.send_task(schema.TASK_NAME, args=[job], task_id=job["job_id"], queue=self.config.queue,
                                   priority=job["priority"], serializer="json", retry=True,
                                   retry_policy=PUBLISH_RETRY_POLICY)
        except Exception as error:  # kombu raises many transport-specific types; the caller needs one
            raise EnqueueError(f"enqueue: could not send job {job['job_id']} to queue {self.config.queue!r} "
                               f"on {redact_url(self.config.broker_url)}: {error}") from error

    def _revoke(self, job_id: str) -> None:
        self._celery.control.revoke(job_id)

    def _create_queued(self, job: dict):
        """Record the job as queued (the CREATE_QUEUED script; an awaitable on the asyncio client)."""
        return self._scripts.run_job(state.CREATE_QUEUED, job["job_id"], json.dumps(job, sort_keys=True))

    def _cancel(self, job_id: str):
        """Set the cancel flag, end a queued job (the CANCEL script; an awaitable on the asyncio client)."""
        error = {"code": schema.CANCELED_ERROR, "message": "canceled by the client before it started"}
        return self._scripts.run_job(state.CANCEL, job_id, json.dumps(error), extra_keys=[state.cancel_key(job_id)])

    @staticmethod
    def _queued_keys(job_id: str) -> tuple[str, str]:
        """What a submit whose task could not be sent takes back: the job's hash and stream."""
        return state.job_key(job_id), state.job_events_key(job_id)

    def _images(self, status: schema.JobStatus) -> list[tuple[str, str]]:
        if status.state != schema.SUCCEEDED:
            raise ValueError(f"job {status.job_id}: no images to fetch, the job is {status.state}")
        return [schema.parse_s3_uri("result", image["uri"]) for image in status.result["images"]]

    def _get_bytes(self, bucket: str, key: str) -> bytes:
        return self._s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    def _get_image(self, bucket: str, key: str) -> Image.Image:
        image = Image.open(io.BytesIO(self._get_bytes(bucket, key)))
        image.load()
        return image

    def _save(self, bucket: str, key: str, folder) -> Path:
        # Named <job_id>-<file name>: the output keys are jobs/<job_id>/<i>.<format> (DESIGN §4).
        path = Path(folder) / "-".join(key.split("/")[-2:])
        path.write_bytes(self._get_bytes(bucket, key))
        return path


class InpaintClient(_ClientCore):
    """Blocking client (DESIGN §7). Use as a context manager, or call close()."""

    _redis_class = redis.Redis

    def close(self) -> None:
        self._uploader.shutdown()
        self._redis.close()
        self._celery.close()

    def __enter__(self) -> "InpaintClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def submit(self, image, mask, prompt: str, **job_options) -> str:
        """Validate, upload local inputs, record the job as queued and enqueue it; returns the job_id.

        image, mask: PIL images, bytes, paths or s3:// URIs. job_options: the job's fields (DESIGN §3) plus
        `job_id` and `output_format`. Submits are idempotent by job_id: one that has a state is not sent again.
        """
        submission = self._prepare(image, mask, prompt, job_options)
        job = submission.job
        if self._redis.exists(state.job_key(job["job_id"])):
            return job["job_id"]
        list(self._uploader.map(self._upload, submission.uploads))
        if self._create_queued(job):
            try:
                self._send(job)
            except EnqueueError:
                self._redis.delete(*self._queued_keys(job["job_id"]))
                raise
        return job["job_id"]

    def status(self, job_id: str) -> schema.JobStatus:
        """The job's state; `expired` when its hash is gone (or it never existed)."""
        return schema.JobStatus.from_hash(job_id, self._redis.hgetall(state.job_key(job_id)))

    def events(self, job_id: str, timeout: float | None = None):
        """Yield the job's events (state.parse_event dicts) from its first; ends after a final state, or when
        the job's hash is gone.

        Raises TimeoutError when `timeout` seconds pass first.
        """
        reader = _EventReader(job_id, timeout)
        while not reader.done:
            reply = self._redis.xread(reader.streams, block=reader.block_ms(), count=100)
            yield from reader.take(reply)
            if reader.idle(reply) and _ended(self.status(job_id)):
                return

    def wait(self, job_id: str, timeout: float | None = None) -> schema.JobStatus:
        """The job's final status; raises TimeoutError after `timeout` seconds."""
        for _ in self.events(job_id, timeout=timeout):
            pass
        return self.status(job_id)

    def fetch(self, job_id: str) -> list[Image.Image]:
        """A succeeded job's images, from the S3 URIs in its result."""
        return [self._get_image(bucket, key) for bucket, key in self._images(self.status(job_id))]

    def download(self, job_id: str, folder) -> list[Path]:
        """Save a succeeded job's image files, byte for byte, in `folder`; returns their paths."""
        locations = self._images(self.status(job_id))
        Path(folder).mkdir(parents=True, exist_ok=True)
        return [self._save(bucket, key, folder) for bucket, key in locations]

    def cancel(self, job_id: str) -> None:
        """Set the job's cancel flag (read between denoise steps), end it now if still queued, revoke the task."""
        self._cancel(job_id)
        self._revoke(job_id)


class AsyncInpaintClient(_ClientCore):
    """The asyncio twin of InpaintClient: Redis through redis.asyncio, S3 and Celery calls in threads."""

    _redis_class = redis.asyncio.Redis

    async def aclose(self) -> None:
        await self._redis.aclose()
        await asyncio.to_thread(self._uploader.shutdown)
        await asyncio.to_thread(self._celery.close)

    async def __aenter__(self) -> "AsyncInpaintClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def submit(self, image, mask, prompt: str, **job_options) -> str:
        submission = await asyncio.to_thread(self._prepare, image, mask, prompt, job_options)
        job = submission.job
        if await self._redis.exists(state.job_key(job["job_id"])):
            return job["job_id"]
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._uploader, self._upload, u) for u in submission.uploads))
        if await self._create_queued(job):
            try:
                await asyncio.to_thread(self._send, job)
            except EnqueueError:
                await self._redis.delete(*self._queued_keys(job["job_id"]))
                raise
        return job["job_id"]

    async def status(self, job_id: str) -> schema.JobStatus:
        return schema.JobStatus.from_hash(job_id, await self._redis.hgetall(state.job_key(job_id)))

    async def events(self, job_id: str, timeout: float | None = None):
        reader = _EventReader(job_id, timeout)
        while not reader.done:
            reply = await self._redis.xread(reader.streams, block=reader.block_ms(), count=100)
            for event in reader.take(reply):
                yield event
            if reader.idle(reply) and _ended(await self.status(job_id)):
                return

    async def wait(self, job_id: str, timeout: float | None = None) -> schema.JobStatus:
        async for _ in self.events(job_id, timeout=timeout):
            pass
        return await self.status(job_id)

    async def fetch(self, job_id: str) -> list[Image.Image]:
        locations = self._images(await self.status(job_id))
        return list(await asyncio.gather(*(asyncio.to_thread(self._get_image, b, k) for b, k in locations)))

    async def download(self, job_id: str, folder) -> list[Path]:
        locations = self._images(await self.status(job_id))
        await asyncio.to_thread(Path(folder).mkdir, parents=True, exist_ok=True)
        return list(await asyncio.gather(*(asyncio.to_thread(self._save, b, k, folder) for b, k in locations)))

    async def cancel(self, job_id: str) -> None:
        await self._cancel(job_id)
        await asyncio.to_thread(self._revoke, job_id)


class _EventReader:
    """The I/O-free half of events(): where to read from, how long to block, when the job's events end."""

    def __init__(self, job_id: str, timeout: float | None):
        self.job_id = job_id
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.stream, self.last_id = state.job_events_key(job_id), "0-0"
        self.done = False

    @property
    def streams(self) -> dict:
        return {self.stream: self.last_id}

    def block_ms(self) -> int:
        """How long the next read may block; raises TimeoutError once the deadline has passed."""
        if self.deadline is None:
            return EVENT_BLOCK_MS
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"job {self.job_id}: not finished within the timeout")
        return max(1, min(EVENT_BLOCK_MS, int(left * 1000)))

    def take(self, reply) -> list[dict]:
        """The events of one XREAD reply, up to and including the first final one."""
        events = []
        for entry_id, fields_ in (reply[0][1] if reply else []):
            self.last_id = entry_id
            events.append(state.parse_event(fields_))
            if events[-1]["state"] in schema.FINAL_STATES:
                self.done = True
                break
        return events

    def idle(self, reply) -> bool:
        """True after a read that found nothing new: time to re-read the hash, whose end the stream may lack."""
        return not reply and not self.done


def _ended(status: schema.JobStatus) -> bool:
    """No more events will come: the job is final, or its hash is gone (expired, or never existed)."""
    return status.final or status.state == schema.EXPIRED


def _celery_app(broker_url: str) -> Celery:
    # JSON only, as the workers accept (DESIGN §4); the client never runs tasks, so no result backend.
    app = Celery("inpaint-client", broker=broker_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=False)
    return app


def _encoded_image(name: str, value) -> tuple[bytes, str]:
    """(file bytes, extension) of an input given as a PIL image, bytes or a path; PIL images are sent as PNG,
    files as they are (PNG, JPEG or WEBP)."""
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
    if image_format not in INPUT_FORMATS:
        raise ValueError(f"{name}: {image_format} images are not accepted; send {', '.join(INPUT_FORMATS)} "
                         "(or a PIL image, sent as PNG)")
    return body, INPUT_FORMATS[image_format]


def _int_variable(env, variable: str, default: int) -> int:
    value = env.get(variable) or str(default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{variable}: expected an integer, got {value!r}") from None

