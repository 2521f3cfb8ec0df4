"""What the HTTP API does, apart from HTTP: authenticate a key, admit and submit a job for it, read, list and
cancel its jobs, follow their events, presign uploads. The routes (api/routes.py) only parse and answer.

Submission goes through the Python client's own path (AsyncInpaintClient: the job schema, the input upload, the
queued state and its event, the Celery message), so a job sent over HTTP is the job the client would send.
"""
import asyncio
import base64
import binascii
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass

from kombu.transport.redis import Channel

from api import errors, webhooks
from api.errors import ApiError
from api.render import render_job
from api.settings import ApiSettings
from api_client import keys, schema, state
from api_client.client import AsyncInpaintClient

__all__ = ["JobService", "Submitted", "API_FIELDS"]

# Body fields of POST /v1/jobs beyond the job schema's (DESIGN §8).
API_FIELDS = ("queue", "webhook", "webhook_events_filter", "output_format")
_DATA_URI = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[a-z0-9=._-]+)*;base64,", re.IGNORECASE)
_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


@dataclass(frozen=True)
class Submitted:
    job: dict          # the job object
    created: bool      # False: an earlier submission with the same Idempotency-Key and body


class JobService:
    def __init__(self, settings: ApiSettings):
        self.settings = settings
        timeout = settings.backend_timeout_s
        self.client = AsyncInpaintClient(
            broker_url=settings.broker_url, state_url=settings.state_url or None,
            s3_endpoint_url=settings.s3_endpoint_url or None, bucket=settings.bucket, queue=settings.queue,
            state_ttl_s=settings.state_ttl_s, events_maxlen=settings.events_maxlen, timeout_s=timeout)
        self.redis = self.client.redis
        self._scripts = state.Scripts(self.redis, settings.state_ttl_s, settings.events_maxlen)
        self._s3 = self.client._s3

    async def aclose(self) -> None:
        await self.client.aclose()

    # --- keys -------------------------------------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> keys.ApiKey:
        key = _bearer(authorization)
        return _checked_key(await self.redis.hgetall(keys.record_key(keys.key_id_of(key))), key)

    async def authenticated_job(self, authorization: str | None, job_id: str) -> tuple[keys.ApiKey, dict]:
        """The key and its job's hash, both read in one round trip (the polling path: GET /v1/jobs/{id})."""
        key = _bearer(authorization)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.record_key(keys.key_id_of(key)))
            if schema.is_job_id(job_id):
                pipe.hgetall(state.job_key(job_id))
            record, *job = await pipe.execute()
        api_key = _checked_key(record, key)
        return api_key, _owned(api_key, job_id, job[0] if job else {})

    # --- jobs -------------------------------------------------------------------------------------------------

    async def submit(self, key: keys.ApiKey, body, idempotency: str | None) -> Submitted:
        """Check, admit (rate, active cap, Idempotency-Key) and submit the job of a POST /v1/jobs body."""
        if not isinstance(body, dict):
            raise schema.JobError(schema.INVALID_INPUT, f"body: expected a JSON object, got {type(body).__name__}")
        # In a thread: the webhook URL check resolves its host, which would block the event loop.
        request = await asyncio.to_thread(_JobRequest.parse, body, key, self.settings)
        job_id = uuid.uuid4().hex
        submission = await asyncio.to_thread(self._prepare, request, job_id)
        outcome, admitted_id = await self._admit_job(key, job_id, _digest(body), idempotency)
        if outcome == "existing":
            return Submitted(await self.job(key, admitted_id), created=False)
        try:
            await self.client.submit_prepared(submission, request.queue, request.state_fields(key))
        except BaseException:
            await self._undo_admission(key, job_id, idempotency)
            raise
        return Submitted(await self.job(key, job_id), created=True)

    def _prepare(self, request: "_JobRequest", job_id: str):
        try:
            submission = self.client._prepare(request.image, request.mask, request.prompt,
                                              {**request.options, "job_id": job_id})
        except schema.JobError:
            raise
        except ValueError as error:   # the client's own input checks (not an image, a format it does not send)
            raise _invalid(str(error)) from None
        self.settings.limits.check_job(schema.Job.from_dict(submission.job))
        return submission

    async def _admit_job(self, key: keys.ApiKey, job_id: str, digest: str, idempotency: str | None):
        now = time.time()
        idem_key = keys.idempotency_key(key.key_id, idempotency or "")
        outcome, value = await self._scripts.run(
            state.ADMIT, [keys.active_key(key.key_id), keys.rate_key(key.key_id, int(now // 60)),
                          keys.jobs_key(key.key_id), idem_key],
            [job_id, key.rate, key.max_active, "1" if idempotency else "0", digest,
             self.settings.idempotency_ttl_s, repr(now), self.settings.state_ttl_s, state.job_key("")])
        if outcome == "conflict":
            raise ApiError(409, errors.CONFLICT, "Idempotency-Key was used with another body (job "
                                                 f"{value}); send a new key for a new job")
        if outcome == "rate_limited":
            retry = max(1, -(-int(value) // 1000))
            raise ApiError(429, errors.RATE_LIMITED, f"this key may submit {key.rate} jobs a minute; retry in "
                                                     f"{retry} s", {"Retry-After": str(retry)})
        if outcome == "busy":
            raise ApiError(429, errors.RATE_LIMITED, f"this key has {value} jobs queued or running, its limit; "
                                                     "retry when one ends", {"Retry-After": "5"})
        return outcome, value

    async def _undo_admission(self, key: keys.ApiKey, job_id: str, idempotency: str | None) -> None:
        try:
            await self._scripts.run(state.ROLLBACK_ADMISSION, [keys.active_key(key.key_id), keys.jobs_key(key.key_id),
                                    keys.idempotency_key(key.key_id, idempotency or "")], [job_id])
        except Exception:   # the original failure is what the caller must learn; Redis may be the one down
            errors.log.warning("could not undo an admission", extra={"job_id": job_id})

    async def job_hash(self, key: keys.ApiKey, job_id: str) -> dict:
        """The job's state hash, if `key` owns it (else 404)."""
        values = await self.redis.hgetall(state.job_key(job_id)) if schema.is_job_id(job_id) else {}
        return _owned(key, job_id, values)

    async def job(self, key: keys.ApiKey, job_id: str, values: dict | None = None) -> dict:
        values = values or await self.job_hash(key, job_id)
        position = await self.queue_position(job_id, values) if values.get("state") == schema.QUEUED else None
        return render_job(job_id, values, self.presign, position)

    async def queue_position(self, job_id: str, values: dict) -> int | None:
        """Messages served before the job (see state.QUEUE_POSITION: O(position), capped)."""
        queue = values.get("queue") or self.settings.queue
        priority = json.loads(values.get("job") or "{}").get("priority", 5)
        steps = Channel.priority_steps   # kombu's Redis transport: one list per step, lower steps served first
        own = max(step for step in steps if step <= priority)
        lists = [_priority_list(queue, step) for step in steps if step < own] + [_priority_list(queue, own)]
        position = await self._scripts.run(state.QUEUE_POSITION, lists, [job_id, self.settings.queue_scan_max])
        return None if position == -2 else max(0, position)

    def presign(self, uri: str) -> str:
        bucket, key = schema.parse_s3_uri("result", uri)
        return self._s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                               ExpiresIn=self.settings.presign_expiry_s)

    async def cancel(self, key: keys.ApiKey, job_id: str) -> dict:
        await self.job_hash(key, job_id)
        await self.client.cancel(job_id)
        return await self.job(key, job_id)

    async def wait(self, key: keys.ApiKey, job_id: str, seconds: float) -> dict:
        """The job object once the job ends, or after `seconds`."""
        try:
            async for _ in self.client.event_entries(job_id, timeout=seconds):
                pass
        except TimeoutError:
            pass
        return await self.job(key, job_id)

    async def list_jobs(self, key: keys.ApiKey, state_filter: str | None, limit: int, cursor: str | None):
        """(job objects newest first, next cursor or None). The cursor is the last job's creation score."""
        high = f"({cursor}" if cursor else "+inf"
        jobs, index = [], keys.jobs_key(key.key_id)
        while len(jobs) < limit:
            page = await self.redis.zrevrangebyscore(index, high, "-inf", start=0, num=limit, withscores=True)
            if not page:
                return jobs, None
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id, _ in page:
                    pipe.hgetall(state.job_key(job_id))
                hashes = await pipe.execute()
            for (job_id, score), values in zip(page, hashes):
                high = f"({score!r}"
                if not values:
                    await self.redis.zrem(index, job_id)   # expired: the index forgets it
                elif state_filter in (None, values.get("state")):
                    jobs.append(render_job(job_id, values, self.presign))
                    if len(jobs) == limit:
                        return jobs, repr(score)
        return jobs, None

    async def events(self, key: keys.ApiKey, job_id: str, after: str | None):
        """(entry id, event) pairs after `after` (None: from the first), None on idle; ends after a final state."""
        await self.job_hash(key, job_id)
        if after is not None and not _ENTRY_ID.match(after):
            raise schema.JobError(schema.INVALID_INPUT, f"Last-Event-ID: {after[:64]!r} is not a stream entry id "
                                                        "such as 1700000000000-0")
        return self.client.event_entries(job_id, after=after or "0-0", idle_s=self.settings.keepalive_s)

    # --- uploads ----------------------------------------------------------------------------------------------

    def presign_upload(self, key: keys.ApiKey, content_type) -> dict:
        extensions = {value: name for name, value in schema.CONTENT_TYPES.items()}
        if not isinstance(content_type, str) or content_type not in extensions:
            raise schema.JobError(schema.INVALID_INPUT, f"content_type: {str(content_type)[:64]!r} is not one of "
                                                        f"{', '.join(extensions)}")
        object_key = f"{upload_prefix(key)}{uuid.uuid4().hex}.{extensions[content_type]}"
        url = self._s3.generate_presigned_url(
            "put_object", Params={"Bucket": self.settings.bucket, "Key": object_key, "ContentType": content_type},
            ExpiresIn=self.settings.upload_expiry_s)
        return {"uri": f"s3://{self.settings.bucket}/{object_key}", "upload_url": url, "method": "PUT",
                "headers": {"Content-Type": content_type}, "expires_in": self.settings.upload_expiry_s}

    async def ready(self) -> dict:
        """Whether Redis and S3 answer: {"redis": bool, "s3": bool}."""
        async def redis_ok():
            try:
                return bool(await self.redis.ping())
            except Exception:
                return False

        def s3_ok():
            try:
                self._s3.head_bucket(Bucket=self.settings.bucket)
                return True
            except Exception:
                return False

        redis_up, s3_up = await asyncio.gather(redis_ok(), asyncio.to_thread(s3_ok))
        return {"redis": redis_up, "s3": s3_up}


def _bearer(authorization: str | None) -> str:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, errors.UNAUTHORIZED, "send the API key as 'Authorization: Bearer <key>'",
                       {"WWW-Authenticate": "Bearer"})
    return key.strip()


def _checked_key(record: dict, key: str) -> keys.ApiKey:
    if not keys.matches(record, key):
        raise ApiError(401, errors.UNAUTHORIZED, "unknown or revoked API key", {"WWW-Authenticate": "Bearer"})
    return keys.parse_record(record)


def _owned(key: keys.ApiKey, job_id: str, values: dict) -> dict:
    """The job's hash; 404 when it is unknown, expired or another key's (alike, so ids leak nothing)."""
    if not values or values.get("owner") != key.key_id:
        raise ApiError(404, errors.NOT_FOUND, f"job {job_id[:64]}: no such job")
    return values


def upload_prefix(key: keys.ApiKey) -> str:
    """Where a key's uploads go in the service bucket; its s3:// inputs there must lie under it."""
    return f"uploads/{key.key_id}/"


def _priority_list(queue: str, step: int) -> str:
    """The Redis list kombu keeps for `queue`'s priority step (Channel._q_for_pri: step 0 is the bare name)."""
    return f"{queue}{Channel.sep}{step}" if step else queue


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _invalid(message: str) -> schema.JobError:
    return schema.JobError(schema.INVALID_INPUT, message)


@dataclass(frozen=True)
class _JobRequest:
    """A POST /v1/jobs body split into the client's submit() arguments and the API's own fields."""
    image: object     # bytes (from a data URI) or an s3:// URI
    mask: object
    prompt: object
    options: dict
    queue: str
    webhook: str | None
    webhook_events: list

    @classmethod
    def parse(cls, body: dict, key: keys.ApiKey, settings: ApiSettings) -> "_JobRequest":
        body = dict(body)
        for name in ("job_id", "output"):
            if name in body:
                raise _invalid(f"{name}: not accepted over HTTP (the service picks the job id and the output "
                               "location)")
        for name in ("image", "mask", "prompt"):
            if name not in body:
                raise _invalid(f"{name}: required")
        queue = body.pop("queue", None) or key.queues[0]
        if queue not in key.queues:
            raise _invalid(f"queue: {str(queue)[:64]!r} is not one of this key's queues ({', '.join(key.queues)})")
        webhook, webhook_events = _webhook_fields(body, settings)
        image = _input("image", body.pop("image"), key, settings)
        mask = _input("mask", body.pop("mask"), key, settings)
        return cls(image=image, mask=mask, prompt=body.pop("prompt"), options=body, queue=queue,
                   webhook=webhook, webhook_events=webhook_events)

    def state_fields(self, key: keys.ApiKey) -> dict:
        """The job hash's API fields: owner, queue and the webhook's (read by render_job and the dispatcher)."""
        fields = {"owner": key.key_id, "queue": self.queue}
        if self.webhook:
            fields.update(webhook_url=self.webhook, webhook_events=json.dumps(self.webhook_events),
                          webhook_state="pending", webhook_attempts="0")
        return fields


def _webhook_fields(body: dict, settings: ApiSettings) -> tuple[str | None, list]:
    webhook = body.pop("webhook", None)
    events = body.pop("webhook_events_filter", None)
    if events is None:
        events = list(webhooks.DEFAULT_EVENTS)
    if not isinstance(events, list) or not events or any(e not in webhooks.EVENT_FILTERS for e in events):
        raise _invalid(f"webhook_events_filter: expected a non-empty list of {', '.join(webhooks.EVENT_FILTERS)}")
    if webhook is None:
        return None, events
    if not isinstance(webhook, str):
        raise _invalid("webhook: expected a URL string")
    try:
        webhooks.check_webhook_url(webhook, settings.webhook_hosts)
    except ValueError as error:
        raise _invalid(f"webhook: {error}") from None
    return webhook, sorted(set(events), key=webhooks.EVENT_FILTERS.index)


def _input(name: str, value, key: keys.ApiKey, settings: ApiSettings):
    """An inline data URI as its bytes, or an s3:// URI in an allowed bucket (in the service's bucket: under the
    key's upload prefix, so one key cannot read another's inputs or outputs)."""
    if not isinstance(value, str):
        raise _invalid(f"{name}: expected a data:image/...;base64,... URI or an s3:// URI")
    match = _DATA_URI.match(value[:200])
    if match:
        return _decoded(name, value[match.end():], settings.max_input_bytes)
    bucket, object_key = schema.parse_s3_uri(name, value)
    if bucket not in settings.bucket_allowlist:
        raise _invalid(f"{name}: bucket {bucket!r} is not one inputs may come from "
                       f"({', '.join(sorted(settings.bucket_allowlist))})")
    if bucket == settings.bucket and not object_key.startswith(upload_prefix(key)):
        raise _invalid(f"{name}: in bucket {bucket!r} only this key's uploads (POST /v1/uploads) may be used")
    return value


def _decoded(name: str, data: str, max_bytes: int) -> bytes:
    if len(data) * 3 // 4 > max_bytes + 3:
        raise schema.JobError(schema.LIMIT_EXCEEDED, f"{name}: the image is over the limit of {max_bytes} bytes")
    try:
        body = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{name}: the data URI's base64 is malformed") from None
    if len(body) > max_bytes:
        raise schema.JobError(schema.LIMIT_EXCEEDED, f"{name}: {len(body)} bytes is over the limit of {max_bytes}")
    return body
