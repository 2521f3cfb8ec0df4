"""The Python client of DESIGN §7: submit jobs, read their state and events, fetch results, cancel.

The client talks to the same Redis (queue, job state, event streams) and S3 bucket as the workers, reads the same
environment variables (DESIGN §6), and sends the `inpaint.run` task by name through Celery, so it never imports the
worker (nor torch). `InpaintClient` is blocking; `AsyncInpaintClient` has the same methods as coroutines.
"""
import asyncio
import contextlib
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
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff
from botocore.exceptions import ClientError
from celery import Celery
from PIL import Image

from api_client import inputs, schema, state
from api_client.http import HttpInpaintClient
from api_client.s3 import is_missing_bucket, missing_bucket_message, s3_client
from api_client.schema import redact_url

__all__ = ["InpaintClient", "AsyncInpaintClient", "ClientConfig", "EnqueueError"]

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
DEFAULT_QUEUE = "inpaint"
CANCELABLE_STATES = (schema.QUEUED, schema.RUNNING)   # a cancel of a job in another state changes nothing
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
    limits: schema.Limits = schema.Limits()   # the workers' limits, checked before anything is sent

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
                   events_maxlen=_int_variable(env, "INPAINT_EVENTS_MAXLEN", state.EVENTS_STREAM_MAXLEN),
                   limits=_limits_from_env(env))


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
                 state_ttl_s: int = state.STATE_TTL_SECONDS, events_maxlen: int = state.EVENTS_STREAM_MAXLEN,
                 timeout_s: float | None = None, limits: schema.Limits = schema.Limits()):
        """timeout_s: connect and read timeout of each Redis, S3 and broker call (None: the libraries' own, S3's
        10 s connect and 60 s read); a server that needs answers fast (the HTTP API) sets it short.
        limits: the workers' limits, checked before anything is sent."""
        self.config = ClientConfig(broker_url, state_url, s3_endpoint_url, bucket, queue, state_ttl_s,
                                   events_maxlen, limits)
        self._s3 = s3_client(s3_endpoint_url, timeout_s)
        self._celery = _celery_app(broker_url, timeout_s)
        self._redis = self._redis_class.from_url(state_url or broker_url, decode_responses=True,
                                                 **_redis_timeouts(self._redis_class, timeout_s))
        self._scripts = state.Scripts(self._redis, state_ttl_s, events_maxlen)
        # Image and mask go up side by side: against a remote S3 each PUT is a round trip.
        self._uploader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="inpaint-upload")

    @property
    def redis(self):
        """The connection to the state Redis (redis.Redis, or redis.asyncio.Redis for the asyncio client)."""
        return self._redis

    @classmethod
    def from_env(cls, environ=None):
        """A client configured by the INPAINT_* variables of `environ` (default: os.environ)."""
        config = ClientConfig.from_env(environ)
        return cls(**{f.name: getattr(config, f.name) for f in fields(config)})

    def _prepare(self, image, mask, prompt: str, options: dict) -> _Submission:
        """The validated job and the input files to upload; raises JobError (a ValueError) before anything is sent:
        unreadable or mismatched inputs, anything over the workers' limits, a bad field."""
        options = dict(options)
        job_id = options.pop("job_id", None) or uuid.uuid4().hex
        if "output" in options:  # the client picks the destination: its bucket, under jobs/<job_id>/
            raise ValueError("submit() takes no output=; pass output_format=, and the client's bucket receives it")
        output_format = options.pop("output_format", "png")
        bucket = self._require_bucket()
        uploads, uris = [], {}
        for name, value in inputs.check_submission(image, mask, prompt, options, self.config.limits).items():
            if isinstance(value, str):   # an s3:// URI, sent as it is
                uris[name] = value
                continue
            uploads.append(_Upload(f"inputs/{job_id}/{name}.{value.extension}", value.body, value.content_type))
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
        with self._bucket_named(self.config.bucket):
            self._s3.put_object(Bucket=self.config.bucket, Key=upload.key, Body=upload.body,
                                ContentType=upload.content_type)

    @contextlib.contextmanager
    def _bucket_named(self, bucket: str):
        """S3's NoSuchBucket, which names neither the bucket nor the endpoint, as a storage_unavailable JobError
        that names both and says how to create the bucket."""
        try:
            yield
        except ClientError as error:
            if not is_missing_bucket(error):
                raise
            raise schema.JobError(schema.STORAGE_UNAVAILABLE, missing_bucket_message(self._s3, bucket)) from None

    def _send(self, job: dict, queue: str | None = None) -> None:
        """Publish the task by name, JSON, with the job_id as task id (so cancel can revoke it), on `queue`
        (default: the configured one)."""
        queue = queue or self.config.queue
        try:
            self._celery.send_task(schema.TASK_NAME, args=[job], task_id=job["job_id"], queue=queue,
                                   priority=job["priority"], serializer="json", retry=True,
                                   retry_policy=PUBLISH_RETRY_POLICY)
        except Exception as error:  # kombu raises many transport-specific types; the caller needs one
            raise EnqueueError(f"enqueue: could not send job {job['job_id']} to queue {queue!r} "
                               f"on {redact_url(self.config.broker_url)}: {error}") from error

    def _revoke(self, job_id: str) -> None:
        self._celery.control.revoke(job_id)

    def _create_queued(self, job: dict, extra_state: dict | None = None):
        """Record the job as queued, with `extra_state` fields in its hash (the CREATE_QUEUED script; an awaitable
        on the asyncio client)."""
        extra = [item for pair in (extra_state or {}).items() for item in pair]
        return self._scripts.run_job(state.CREATE_QUEUED, job["job_id"], json.dumps(job, sort_keys=True), *extra)

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
        with self._bucket_named(bucket):
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

    @classmethod
    def from_env(cls, environ=None):
        """With INPAINT_API_URL and INPAINT_API_KEY set: an HttpInpaintClient (the same methods, over the HTTP
        API); otherwise a client of the fleet's Redis and S3, configured by the INPAINT_* variables."""
        env = os.environ if environ is None else environ
        if env.get("INPAINT_API_URL") and env.get("INPAINT_API_KEY"):
            return HttpInpaintClient(env["INPAINT_API_URL"], env["INPAINT_API_KEY"], limits=_limits_from_env(env))
        return super().from_env(environ)

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

    def cancel(self, job_id: str) -> str:
        """Cancel the job; returns the state the cancel found (one atomic step, see state.CANCEL):
        `queued` (it is `canceled` now), `running` (its cancel flag is set: it stops at its next denoise step and
        ends `canceled`), a final state (`succeeded`, `failed`, `canceled`: nothing changed) or `expired` (no such
        job: nothing changed). A queued or running job's task is also revoked, so workers drop its messages."""
        found = self._cancel(job_id)
        if found in CANCELABLE_STATES:
            self._revoke(job_id)
        return found


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
        await self.submit_prepared(submission)
        return submission.job["job_id"]

    async def submit_prepared(self, submission: _Submission, queue: str | None = None,
                              extra_state: dict | None = None) -> bool:
        """Upload, record as queued (with `extra_state` fields in the job's hash) and enqueue on `queue` a
        submission from _prepare; False when the job_id has a state already (nothing is sent again)."""
        job = submission.job
        if await self._redis.exists(state.job_key(job["job_id"])):
            return False
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._uploader, self._upload, u) for u in submission.uploads))
        if not await self._create_queued(job, extra_state):
            return False
        try:
            await asyncio.to_thread(self._send, job, queue)
        except EnqueueError:
            await self._redis.delete(*self._queued_keys(job["job_id"]))
            raise
        return True

    async def status(self, job_id: str) -> schema.JobStatus:
        return schema.JobStatus.from_hash(job_id, await self._redis.hgetall(state.job_key(job_id)))

    async def events(self, job_id: str, timeout: float | None = None):
        async for entry in self.event_entries(job_id, timeout=timeout):
            if entry is not None:
                yield entry[1]

    async def event_entries(self, job_id: str, timeout: float | None = None, after: str = "0-0",
                            idle_s: float | None = None):
        """Yield (stream entry id, event) for the job's events after entry `after`, ending as events() does.
        With `idle_s`, also yield None whenever that long passed without an event (a server's keep-alive)."""
        reader = _EventReader(job_id, timeout, after, idle_s)
        while not reader.done:
            reply = await self._redis.xread(reader.streams, block=reader.block_ms(), count=100)
            for entry in reader.take_entries(reply):
                yield entry
            if reader.idle(reply):
                if _ended(await self.status(job_id)):
                    return
                if idle_s is not None:
                    yield None

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

    async def cancel(self, job_id: str) -> str:
        found = await self._cancel(job_id)
        if found in CANCELABLE_STATES:
            await asyncio.to_thread(self._revoke, job_id)
        return found


class _EventReader:
    """The I/O-free half of events(): where to read from, how long to block, when the job's events end."""

    def __init__(self, job_id: str, timeout: float | None, after: str = "0-0", block_s: float | None = None):
        self.job_id = job_id
        # A block never outlasts EVENT_BLOCK_MS: the client's read timeout (when it has one) must not cut it.
        self.block_limit_ms = EVENT_BLOCK_MS if block_s is None else max(1, min(EVENT_BLOCK_MS, int(block_s * 1000)))
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.stream, self.last_id = state.job_events_key(job_id), after
        self.done = False

    @property
    def streams(self) -> dict:
        return {self.stream: self.last_id}

    def block_ms(self) -> int:
        """How long the next read may block; raises TimeoutError once the deadline has passed."""
        if self.deadline is None:
            return self.block_limit_ms
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"job {self.job_id}: not finished within the timeout")
        return max(1, min(self.block_limit_ms, int(left * 1000)))

    def take(self, reply) -> list[dict]:
        """The events of one XREAD reply, up to and including the first final one."""
        return [event for _, event in self.take_entries(reply)]

    def take_entries(self, reply) -> list[tuple[str, dict]]:
        """(stream entry id, event) of one XREAD reply, up to and including the first final one."""
        entries = []
        for entry_id, fields_ in (reply[0][1] if reply else []):
            self.last_id = entry_id
            entries.append((entry_id, state.parse_event(fields_)))
            if entries[-1][1]["state"] in schema.FINAL_STATES:
                self.done = True
                break
        return entries

    def idle(self, reply) -> bool:
        """True after a read that found nothing new: time to re-read the hash, whose end the stream may lack."""
        return not reply and not self.done


def _ended(status: schema.JobStatus) -> bool:
    """No more events will come: the job is final, or its hash is gone (expired, or never existed)."""
    return status.final or status.state == schema.EXPIRED


def _redis_timeouts(redis_class, timeout_s: float | None) -> dict:
    """Connection options for a timeout: connect and read timeouts, and one immediate retry on a connection error
    (a pooled connection that a restarted Redis closed fails once; the retry reconnects)."""
    if timeout_s is None:
        return {}
    retry_class = redis.asyncio.retry.Retry if redis_class is redis.asyncio.Redis else redis.retry.Retry
    return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
            "retry": retry_class(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))}


def _celery_app(broker_url: str, timeout_s: float | None) -> Celery:
    # JSON only, as the workers accept (DESIGN §4); the client never runs tasks, so no result backend.
    app = Celery("inpaint-client", broker=broker_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=False)
    if timeout_s is not None:
        app.conf.update(broker_connection_timeout=timeout_s,
                        broker_transport_options={"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s})
    return app


def _int_variable(env, variable: str, default: int) -> int:
    value = env.get(variable) or str(default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{variable}: expected an integer, got {value!r}") from None


def _limits_from_env(env) -> schema.Limits:
    """The workers' INPAINT_MAX_* limits (DESIGN §3), read by the same names and defaults."""
    variables = {"max_pixels": "INPAINT_MAX_PIXELS", "max_steps": "INPAINT_MAX_STEPS",
                 "max_images": "INPAINT_MAX_IMAGES", "max_prompt_chars": "INPAINT_MAX_PROMPT_CHARS"}
    return schema.Limits(**{name: _int_variable(env, variable, getattr(schema.Limits, name))
                            for name, variable in variables.items()})
