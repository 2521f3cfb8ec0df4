"""Every setting of an `inpaint-api` process, read once from environment variables (DESIGN §8).

The Redis, S3, queue and limit variables are the worker's (DESIGN §6), read by name here: the API never imports the
worker. `ApiSettings.describe()` gives the README's rows for the INPAINT_API_* and INPAINT_WEBHOOK_* variables.
"""
from dataclasses import dataclass, fields

from api_client import schema, state
from api_client.envsettings import FleetSettings, check_fields, describe_rows, from_env, setting

__all__ = ["ApiSettings"]

MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600  # S3's ceiling for SigV4 presigned URLs
# Variables the worker's settings already list in the README; describe() leaves them out.
SHARED_VARIABLES = frozenset({
    "INPAINT_BROKER_URL", "INPAINT_STATE_URL", "INPAINT_QUEUE", "INPAINT_S3_ENDPOINT_URL", "INPAINT_BUCKET",
    "INPAINT_ALLOWED_BUCKETS", "INPAINT_PRESIGN_EXPIRY_S", "INPAINT_MAX_INPUT_BYTES", "INPAINT_MAX_PIXELS",
    "INPAINT_MAX_STEPS", "INPAINT_MAX_IMAGES", "INPAINT_MAX_PROMPT_CHARS", "INPAINT_STATE_TTL_S",
    "INPAINT_EVENTS_MAXLEN", "INPAINT_LOG_LEVEL"})


@dataclass(frozen=True, repr=False)
class ApiSettings(FleetSettings):
    host: str = setting("INPAINT_API_HOST", "127.0.0.1", "address inpaint-api listens on (--host)")
    port: int = setting("INPAINT_API_PORT", 8000, "port inpaint-api listens on (--port)", low=1, high=65535)
    max_body_bytes: int = setting("INPAINT_API_MAX_BODY_BYTES", 48 * 1024 * 1024, "largest request body; larger "
                                  "is 413 (inline images are base64, a third larger than the file)", low=1024)
    max_wait_s: int = setting("INPAINT_API_MAX_WAIT_S", 60, "most seconds a `Prefer: wait=N` request is held",
                              low=0, high=600)
    backend_timeout_s: float = setting("INPAINT_API_BACKEND_TIMEOUT_S", 2.0, "connect and read timeout of each "
                                       "Redis and S3 call; past it the request answers 503", low=0.05)
    retry_after_s: int = setting("INPAINT_API_RETRY_AFTER_S", 5, "Retry-After of a 503 (Redis or S3 down)", low=1)
    keepalive_s: float = setting("INPAINT_API_KEEPALIVE_S", 15.0, "seconds between SSE keep-alive comments",
                                 low=0.05)
    idempotency_ttl_s: int = setting("INPAINT_API_IDEMPOTENCY_TTL_S", 24 * 3600, "how long an Idempotency-Key "
                                     "is remembered", low=1)
    upload_expiry_s: int = setting("INPAINT_API_UPLOAD_EXPIRY_S", 900, "lifetime of a POST /v1/uploads presigned "
                                   "PUT URL", low=1, high=MAX_PRESIGN_EXPIRY_S)
    queue_scan_max: int = setting("INPAINT_API_QUEUE_SCAN_MAX", 10000, "most queue entries read to compute one "
                                  "queue_position (beyond: null)", low=1)
    max_page: int = setting("INPAINT_API_MAX_PAGE", 100, "largest `limit` of GET /v1/jobs", low=1)
    webhook_allow_hosts: str = setting("INPAINT_WEBHOOK_ALLOW_HOSTS", "", "comma-separated host names or IPs a "
                                       "webhook may reach even in private ranges (matched exactly; for tests)")
    webhook_timeout_s: float = setting("INPAINT_WEBHOOK_TIMEOUT_S", 10.0, "a webhook POST not answered in this "
                                       "long is retried", low=0.1)
    webhook_max_attempts: int = setting("INPAINT_WEBHOOK_MAX_ATTEMPTS", 10, "POSTs of one event before its "
                                        "webhook is marked failed", low=1)
    webhook_backoff_s: float = setting("INPAINT_WEBHOOK_BACKOFF_S", 10.0, "wait before the first retry, doubled "
                                       "after each further failure (at most 30: the first retry comes within 30 s)",
                                       low=0.0, high=30.0)
    webhook_backoff_max_s: float = setting("INPAINT_WEBHOOK_BACKOFF_MAX_S", 600.0, "longest wait between two "
                                           "retries", low=0.0)
    webhook_reclaim_s: float = setting("INPAINT_WEBHOOK_RECLAIM_S", 60.0, "a delivery (or a read event) that its "
                                       "process has not finished in this long is taken over by another inpaint-api "
                                       "process (must exceed INPAINT_WEBHOOK_TIMEOUT_S)", low=1.0)
    webhook_concurrency: int = setting("INPAINT_WEBHOOK_CONCURRENCY", 16, "most webhook POSTs in flight per "
                                       "inpaint-api process", low=1)
    # The worker's variables (DESIGN §6), read by name.
    broker_url: str = setting("INPAINT_BROKER_URL", "redis://localhost:6379/0", "Celery broker (Redis)")
    state_url: str = setting("INPAINT_STATE_URL", "", "Redis for job state (empty = the broker's)")
    queue: str = setting("INPAINT_QUEUE", "inpaint", "default queue of a key created without --queues")
    s3_endpoint_url: str = setting("INPAINT_S3_ENDPOINT_URL", "", "S3 endpoint (empty = AWS)")
    bucket: str = setting("INPAINT_BUCKET", "", "bucket of inputs and outputs")
    allowed_buckets: str = setting("INPAINT_ALLOWED_BUCKETS", "", "buckets s3:// inputs may name")
    presign_expiry_s: int = setting("INPAINT_PRESIGN_EXPIRY_S", 3600, "lifetime of result URLs", low=1,
                                    high=MAX_PRESIGN_EXPIRY_S)
    max_input_bytes: int = setting("INPAINT_MAX_INPUT_BYTES", 20 * 1024 * 1024, "largest image or mask", low=1)
    max_pixels: int = setting("INPAINT_MAX_PIXELS", schema.Limits.max_pixels, "largest width x height", low=64)
    max_steps: int = setting("INPAINT_MAX_STEPS", schema.Limits.max_steps, "most steps", low=1)
    max_images: int = setting("INPAINT_MAX_IMAGES", schema.Limits.max_images, "most images per job", low=1)
    max_prompt_chars: int = setting("INPAINT_MAX_PROMPT_CHARS", schema.Limits.max_prompt_chars, "longest prompt",
                                    low=1)
    state_ttl_s: int = setting("INPAINT_STATE_TTL_S", state.STATE_TTL_SECONDS, "lifetime of job state", low=60)
    events_maxlen: int = setting("INPAINT_EVENTS_MAXLEN", state.EVENTS_STREAM_MAXLEN, "shared stream cap", low=1)
    log_level: str = setting("INPAINT_LOG_LEVEL", "INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self):
        check_fields(self, lambda item, value: value.upper())   # the one field with choices: log_level
        if not self.bucket:
            raise ValueError("INPAINT_BUCKET: required by inpaint-api (inline inputs and outputs go there)")
        if self.webhook_reclaim_s <= self.webhook_timeout_s:
            raise ValueError(f"INPAINT_WEBHOOK_RECLAIM_S={self.webhook_reclaim_s}: must exceed "
                             f"INPAINT_WEBHOOK_TIMEOUT_S={self.webhook_timeout_s}, or a POST still waiting for its "
                             "answer would be sent again by another process")

    @classmethod
    def from_env(cls, environ=None) -> "ApiSettings":
        return from_env(cls, environ)

    @classmethod
    def describe(cls) -> str:
        """The README rows of the variables only the API reads."""
        own = [f for f in fields(cls) if f.metadata["variable"] not in SHARED_VARIABLES]
        rows = describe_rows(cls)
        return "\n".join(row for row, item in zip(rows, fields(cls)) if item in own)

    @property
    def webhook_hosts(self) -> frozenset:
        return frozenset(h.strip() for h in self.webhook_allow_hosts.split(",") if h.strip())
