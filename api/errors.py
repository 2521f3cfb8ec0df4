"""Errors of the HTTP API (DESIGN §8): always `{"error": {"code", "message"}}`, never a bare 500.

`ApiError(status, code, message, headers)` is raised by handlers; `install(app, settings)` maps it and every other
failure to JSON: malformed JSON 400, bad fields 422 (the job schema's `invalid_input` / `limit_exceeded`), Redis, S3
or the broker down 503 `unavailable` with Retry-After, anything unexpected 500 `internal` (logged, not shown).
"""
import logging

from botocore.exceptions import BotoCoreError, ClientError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api_client import schema
from api_client.client import EnqueueError

__all__ = ["ApiError", "install", "error_body", "UNAUTHORIZED", "NOT_FOUND", "CONFLICT", "PAYLOAD_TOO_LARGE",
           "RATE_LIMITED", "UNAVAILABLE", "METHOD_NOT_ALLOWED"]

log = logging.getLogger("inpaint.api")

UNAUTHORIZED, NOT_FOUND, CONFLICT = "unauthorized", "not_found", "conflict"
PAYLOAD_TOO_LARGE, RATE_LIMITED, UNAVAILABLE = "payload_too_large", "rate_limited", "unavailable"
METHOD_NOT_ALLOWED = "method_not_allowed"
# The HTTP status of a job-schema error code raised while a request is checked.
_JOB_ERROR_STATUS = {schema.INPUT_NOT_FOUND: 422, schema.STORAGE_UNAVAILABLE: 503}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def _json_error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path", "header"))
        parts.append(f"{where or 'request'}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)


def install(app: FastAPI, retry_after_s: int) -> None:
    """Register the exception handlers on `app`."""
    unavailable_headers = {"Retry-After": str(retry_after_s)}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _json_error(error.status, error.code, error.message, error.headers)

    @app.exception_handler(schema.JobError)
    async def job_error(request: Request, error: schema.JobError):
        status = _JOB_ERROR_STATUS.get(error.code, 422)
        return _json_error(status, error.code, error.message, unavailable_headers if status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return _json_error(422, schema.INVALID_INPUT, _validation_message(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: NOT_FOUND, 405: METHOD_NOT_ALLOWED}.get(error.status_code, schema.INVALID_INPUT)
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 404:
            message = f"{request.url.path}: no such resource"
        return _json_error(error.status_code, code, message, getattr(error, "headers", None))

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, error: RedisError):
        log.warning("redis unavailable: %s: %s", type(error).__name__, str(error)[:200],
                    extra={"path": request.url.path})
        return _json_error(503, UNAVAILABLE, "the job store (Redis) does not answer; retry later",
                           unavailable_headers)

    @app.exception_handler(EnqueueError)
    async def queue_down(request: Request, error: EnqueueError):
        log.warning("queue unavailable", extra={"path": request.url.path})
        return _json_error(503, UNAVAILABLE, "the job queue does not answer; retry later", unavailable_headers)

    async def storage_down(request: Request, error: Exception):
        log.warning("storage unavailable: %s: %s", type(error).__name__, str(error)[:200],
                    extra={"path": request.url.path})
        return _json_error(503, UNAVAILABLE, "the object store (S3) does not answer; retry later",
                           unavailable_headers)

    app.add_exception_handler(BotoCoreError, storage_down)
    app.add_exception_handler(ClientError, storage_down)

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception):
        log.exception("unexpected error", extra={"path": request.url.path})
        return _json_error(500, schema.INTERNAL, "an internal error; it was logged")
