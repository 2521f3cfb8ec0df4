"""The /v1 routes (DESIGN §8): parse the request, call api.service, answer. Every route needs a key."""
import json
import re
import time
from dataclasses import MISSING, fields
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from api import errors
from api.errors import ApiError
from api.service import API_FIELDS, JobService
from api_client import keys, schema

__all__ = ["router", "job_body_schema", "openapi_components"]

router = APIRouter(prefix="/v1")
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d{1,6})(?:$|[,;\s])")
_MAX_IDEMPOTENCY_KEY = 255
ERROR_RESPONSES = {status: {"description": text, "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/Error"}}}} for status, text in (
    (400, "malformed JSON"), (401, "missing, unknown or revoked key"), (404, "no such job (or another key's)"),
    (413, "body over INPAINT_API_MAX_BODY_BYTES"), (422, "bad or unknown fields (invalid_input, limit_exceeded)"),
    (429, "rate or active-job limit (rate_limited)"), (503, "Redis, S3 or the queue down (unavailable)"))}


def service(request: Request) -> JobService:
    return request.app.state.service


async def api_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> keys.ApiKey:
    return await service(request).authenticate(authorization)


Key = Annotated[keys.ApiKey, Depends(api_key)]


def job_body_schema() -> dict:
    """The JSON Schema of a POST /v1/jobs body, from the job schema's fields (one definition of the fields)."""
    types = {int: "integer", float: "number", str: "string", bool: "boolean"}
    properties = {}
    for item in fields(schema.Job):
        if item.name in ("job_id", "output", "webhook"):
            continue
        kind = item.type if isinstance(item.type, type) else str(item.type)
        json_type = types.get(kind) or ("integer" if "int" in str(kind) else "string")
        nullable = "None" in str(kind)
        properties[item.name] = {"type": [json_type, "null"] if nullable else json_type}
        if item.default is not MISSING:
            properties[item.name]["default"] = item.default
    properties["guidance_scale"]["type"] = "number"
    properties["strength"]["type"] = "number"
    properties["scheduler"]["enum"] = [*schema.SCHEDULERS, None]
    properties["image"]["description"] = properties["mask"]["description"] = \
        "data:image/png;base64,... (or jpeg, webp) or s3://bucket/key (an upload, or an allowed bucket)"
    properties.update({
        "queue": {"type": "string", "description": "one of the key's queues (default: its first)"},
        "webhook": {"type": "string", "format": "uri", "description": "URL the job's events are POSTed to"},
        "webhook_events_filter": {"type": "array", "items": {"enum": ["start", "progress", "completed"]},
                                  "default": ["completed"]},
        "output_format": {"enum": list(schema.OUTPUT_FORMATS), "default": "png"}})
    assert set(API_FIELDS) <= set(properties)
    return {"type": "object", "required": ["image", "mask", "prompt"], "properties": properties,
            "additionalProperties": False}


def _prefer_wait(prefer: str | None, limit: int) -> int | None:
    match = _PREFER_WAIT.search(f" {prefer} ") if prefer else None
    return min(int(match.group(1)), limit) if match else None


def _idempotency(value: str | None) -> str | None:
    if value is None:
        return None
    if not 0 < len(value) <= _MAX_IDEMPOTENCY_KEY or not value.isprintable():
        raise ApiError(422, schema.INVALID_INPUT, f"Idempotency-Key: 1 to {_MAX_IDEMPOTENCY_KEY} printable "
                                                  "characters")
    return value


async def _json_body(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        raise ApiError(400, schema.INVALID_INPUT, f"body: not valid JSON ({error})") from None


@router.post("/jobs", status_code=201, responses=ERROR_RESPONSES,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/JobRequest"}}}}})
async def submit_job(request: Request, response: Response, key: Key,
                     idempotency_key: Annotated[str | None, Header()] = None,
                     prefer: Annotated[str | None, Header()] = None) -> dict:
    """Submit a job. Answers 201 with the job object (200 for a repeated Idempotency-Key and body)."""
    jobs = service(request)
    submitted = await jobs.submit(key, await _json_body(request), _idempotency(idempotency_key))
    job = submitted.job
    wait = _prefer_wait(prefer, jobs.settings.max_wait_s)
    if wait:
        job = await jobs.wait(key, job["id"], wait)
        response.headers["Preference-Applied"] = f"wait={wait}"
    response.status_code = 201 if submitted.created else 200
    response.headers["Location"] = job["urls"]["self"]
    return job


@router.get("/jobs", responses=ERROR_RESPONSES)
async def list_jobs(request: Request, key: Key,
                    state: Literal[schema.STATES] | None = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
                    cursor: Annotated[str | None, Query(pattern=r"^\d{1,12}(\.\d{1,9})?$")] = None) -> dict:
    """The key's jobs, newest first; pass `next_cursor` back as `cursor` for the next page."""
    jobs = service(request)
    found, next_cursor = await jobs.list_jobs(key, state, min(limit, jobs.settings.max_page), cursor)
    return {"jobs": found, "next_cursor": next_cursor}


@router.get("/jobs/{job_id}", responses=ERROR_RESPONSES)
async def get_job(request: Request, job_id: str, authorization: Annotated[str | None, Header()] = None) -> dict:
    """The job object (queue_position while queued)."""
    key, values = await service(request).authenticated_job(authorization, job_id)
    return await service(request).job(key, job_id, values)


@router.post("/jobs/{job_id}/cancel", status_code=202, responses=ERROR_RESPONSES)
async def cancel_job(request: Request, job_id: str, key: Key) -> dict:
    """Ask the job to stop: a queued job ends canceled at once, a running one at its next step."""
    return await service(request).cancel(key, job_id)


@router.get("/jobs/{job_id}/events", responses={**ERROR_RESPONSES, 200: {
    "description": "Server-sent events: `id:` the stream entry id, `data:` the event as JSON",
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def job_events(request: Request, job_id: str, key: Key,
                     last_event_id: Annotated[str | None, Header()] = None):
    """The job's events as SSE, from its first (or after Last-Event-ID), until its final state."""
    entries = await service(request).events(key, job_id, last_event_id)
    return StreamingResponse(_sse(entries, service(request).settings.keepalive_s), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse(entries, keepalive_s: float):
    last_sent = time.monotonic()
    try:
        async for entry in entries:
            if entry is None:
                if time.monotonic() - last_sent < keepalive_s:
                    continue
                yield ": keep-alive\n\n"
            else:
                entry_id, event = entry
                yield f"id: {entry_id}\ndata: {json.dumps(event)}\n\n"
            last_sent = time.monotonic()
    except Exception as error:   # headers are sent: end the stream; the client resumes with Last-Event-ID
        errors.log.warning("event stream ended early", extra={"error": type(error).__name__})
    finally:
        await entries.aclose()


@router.post("/uploads", status_code=201, responses=ERROR_RESPONSES,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                 "type": "object", "required": ["content_type"], "additionalProperties": False,
                 "properties": {"content_type": {"enum": ["image/png", "image/jpeg", "image/webp"]}}}}}}})
async def create_upload(request: Request, key: Key) -> dict:
    """A presigned PUT URL for an input too large to inline; use the returned `uri` as image or mask."""
    body = await _json_body(request)
    if not isinstance(body, dict) or set(body) != {"content_type"}:
        raise ApiError(422, schema.INVALID_INPUT, "body: expected {\"content_type\": \"image/png\"} (or jpeg, webp)")
    return service(request).presign_upload(key, body["content_type"])


@router.get("/webhook-secret", responses=ERROR_RESPONSES)
async def webhook_secret(key: Key) -> dict:
    """The key's webhook signing secret (Standard Webhooks, `whsec_...`)."""
    return {"webhook_secret": key.webhook_secret}


def openapi_components() -> dict:
    return {"JobRequest": job_body_schema(),
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}}

