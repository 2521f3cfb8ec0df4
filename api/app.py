"""The FastAPI application and the `inpaint-api` command (DESIGN §8).

`create_app(settings)` builds the app: the /v1 routes, /healthz, /readyz, /metrics, errors as JSON, a body-size
limit, and a lifespan that opens and closes the Redis, S3 and broker connections. Stateless: any number of
processes may serve behind a load balancer.
"""
import argparse
import logging
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from api import errors, page, routes, webhooks
from api.service import JobService
from api.settings import ApiSettings

__all__ = ["create_app", "main", "BodyLimit", "Metrics"]

log = logging.getLogger("inpaint.api")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` is 413, by its Content-Length before anything is read, or by
    counting a streamed (chunked) body as it arrives."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise errors.ApiError(413, errors.PAYLOAD_TOO_LARGE, self._message())
            return message

        await self.app(scope, counted_receive, send)

    def _message(self) -> str:
        return f"body: over the limit of {self.max_bytes} bytes (INPAINT_API_MAX_BODY_BYTES); upload large " \
               "images with POST /v1/uploads"

    async def _too_large(self, scope, receive, send):
        response = JSONResponse(errors.error_body(errors.PAYLOAD_TOO_LARGE, self._message()), status_code=413,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


class Metrics:
    """ASGI middleware: requests by route and status, and their latency, in the app's own registry."""

    def __init__(self, app, registry: CollectorRegistry):
        self.app = app
        self.requests = Counter("inpaint_api_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=registry)
        self.latency = Histogram("inpaint_api_request_seconds", "time to the response's start, by route",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=registry)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()

        async def observed_send(message):
            if message["type"] == "http.response.start":
                # The router has put the matched route into the (shared) scope by now.
                route = getattr(scope.get("route"), "path", "unmatched")
                self.requests.labels(scope["method"], route, str(message["status"])).inc()
                self.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, observed_send)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.service = JobService(settings)
        dispatcher = webhooks.Dispatcher(app.state.service.redis, settings).start()
        try:
            yield
        finally:
            await dispatcher.stop()
            await app.state.service.aclose()

    app = FastAPI(title="inpaint-fleet", version="1.0", lifespan=lifespan,
                  description="Stable Diffusion inpainting jobs over HTTP: API keys, jobs, server-sent events, "
                              "idempotency, signed webhooks (docs/http-api.md).")
    app.state.settings = settings
    errors.install(app, settings.retry_after_s)
    app.include_router(routes.router)
    app.include_router(page.router)   # the web page at / (issue 15)
    _add_operations(app, settings)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.openapi = lambda: _openapi(app)
    return app


def _add_operations(app: FastAPI, settings: ApiSettings) -> None:
    registry = CollectorRegistry()
    app.add_middleware(Metrics, registry=registry)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict:
        """The process serves."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"description": "Redis or S3 does not answer"}})
    async def readyz(request: Request):
        """Redis and S3 answer (the readiness probe)."""
        checks = await request.app.state.service.ready()
        down = [name for name, up in checks.items() if not up]
        if not down:
            return {"status": "ready", **checks}
        body = {**errors.error_body(errors.UNAVAILABLE, f"{' and '.join(down)} not answering"), **checks}
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics of this process."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        spec.setdefault("components", {}).setdefault("schemas", {}).update(routes.openapi_components())
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in spec["paths"].items():
            if path.startswith("/v1"):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
        app.openapi_schema = spec
    return app.openapi_schema


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="inpaint-api", description="Serve the inpaint-fleet HTTP API (DESIGN §8)"
                                     " with uvicorn; settings from INPAINT_API_* and the worker's variables.")
    parser.add_argument("--host", help="listen address (default INPAINT_API_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default INPAINT_API_PORT, 8000)")
    args = parser.parse_args(argv)
    try:
        settings = ApiSettings.from_env()
    except ValueError as error:
        parser.exit(2, f"inpaint-api: error: {error}\n")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(settings), host=args.host or settings.host, port=args.port or settings.port,
                log_level=settings.log_level.lower(), proxy_headers=True, server_header=False)
    return 0
