"""The job schema shared by clients and workers (DESIGN §3-5). Pure Python: stdlib only.

Public names:
- `Job`, `OutputSpec`: a validated job; `Job.from_dict(d)` (raises `JobError` invalid_input), `Job.to_dict()`.
- `Limits`: max_pixels, max_steps, max_images, max_prompt_chars; `Limits.check_job(job)`, `Limits.check_fields(d)`,
  `Limits.check_size(w, h)`, `check_pixels(name, w, h, max_pixels)` (raise `JobError` limit_exceeded).
- `JobError(code, message)` (a ValueError) and the codes `INVALID_INPUT`, `INPUT_NOT_FOUND`, `LIMIT_EXCEEDED`,
  `STORAGE_UNAVAILABLE`, `MODEL_UNAVAILABLE`, `CANCELED_ERROR`, `TIMEOUT`, `INTERNAL`; `ERROR_CODES`,
  `TRANSIENT_ERRORS` (retried), the rest permanent.
- States `QUEUED`, `RUNNING`, `SUCCEEDED`, `FAILED`, `CANCELED`, `EXPIRED` (the hash is gone); `STATES`,
  `FINAL_STATES`. A state only moves forward: queued -> running -> one final state.
- `JobStatus` (dataclass) with `JobStatus.from_hash(job_id, mapping)`.
- `TASK_NAME` (the Celery task). Redis key names, events and the state scripts are in api_client.state.
- `SCHEDULERS`, `OUTPUT_FORMATS`, `CONTENT_TYPES`, `parse_s3_uri(name, uri) -> (bucket, key)`, `is_job_id(s)`;
  bounds `MAX_SEED` (image i uses seed + i, at most MAX_SEED), `MAX_PRIORITY`, `SIZE_MULTIPLE`.
- `INPUT_FORMATS` (PIL format name -> extension, the images workers decode); `redact_url(url)` (password
  masked, for messages and logs).
"""
import json
import math
import re
import uuid
from dataclasses import asdict, dataclass, fields
from urllib.parse import urlparse

TASK_NAME = "inpaint.run"

SCHEDULERS = ("pndm", "ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED, EXPIRED = (
    "queued", "running", "succeeded", "failed", "canceled", "expired")
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELED})

INVALID_INPUT = "invalid_input"
INPUT_NOT_FOUND = "input_not_found"
LIMIT_EXCEEDED = "limit_exceeded"
STORAGE_UNAVAILABLE = "storage_unavailable"
MODEL_UNAVAILABLE = "model_unavailable"
CANCELED_ERROR = "canceled"
TIMEOUT = "timeout"
INTERNAL = "internal"
ERROR_CODES = (INVALID_INPUT, INPUT_NOT_FOUND, LIMIT_EXCEEDED, STORAGE_UNAVAILABLE, MODEL_UNAVAILABLE,
               CANCELED_ERROR, TIMEOUT, INTERNAL)
# Worth another attempt (storage or model hub may come back); every other code fails the job for good.
TRANSIENT_ERRORS = frozenset({STORAGE_UNAVAILABLE, MODEL_UNAVAILABLE})

MAX_SEED = 2**63 - 1
MAX_PRIORITY = 9            # Celery's Redis transport knows priorities 0-9
MAX_PREFIX_CHARS = 512      # S3 keys are at most 1024 bytes
SIZE_MULTIPLE = 8
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class JobError(ValueError):
    """A job that cannot run (or stopped), with one of ERROR_CODES and a message naming the problem."""

    def __init__(self, code: str, message: str):
        if code not in ERROR_CODES:
            raise ValueError(f"code: {code!r} is not one of {', '.join(ERROR_CODES)}")
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT_ERRORS

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


def _invalid(message: str) -> JobError:
    return JobError(INVALID_INPUT, message)


def is_job_id(value) -> bool:
    """True for a uuid4 in its 32-character lowercase hex form."""
    if not isinstance(value, str) or len(value) != 32:
        return False
    try:
        parsed = uuid.UUID(hex=value)
    except ValueError:
        return False
    return parsed.hex == value and parsed.version == 4


def parse_s3_uri(name: str, uri) -> tuple[str, str]:
    """(bucket, key) of an `s3://bucket/key` URI; any other scheme (http: fetches are an SSRF risk) is refused."""
    if not isinstance(uri, str):
        raise _invalid(f"{name}: expected an s3://bucket/key string, got {type(uri).__name__}")
    if not uri.startswith("s3://"):
        raise _invalid(f"{name}: {uri[:100]!r} is not an s3://bucket/key URI (only s3:// inputs are accepted)")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not _BUCKET_NAME.match(bucket):
        raise _invalid(f"{name}: {bucket!r} is not a valid S3 bucket name")
    if not key:
        raise _invalid(f"{name}: {uri!r} has no object key after the bucket")
    return bucket, key


def _check_type(name: str, value, kind, nullable: bool = False):
    if value is None and nullable:
        return value
    # bool is an int subclass, but `true` is never a valid step count or seed.
    wrong_bool = isinstance(value, bool) and kind is not bool
    if wrong_bool or not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _invalid(f"{name}: expected {expected}{' or null' if nullable else ''}, got {value!r}")
    return value


def _check_int(name: str, value, low: int, high: int | None = None, nullable: bool = False):
    _check_type(name, value, int, nullable)
    if value is not None and (value < low or (high is not None and value > high)):
        raise _invalid(f"{name}: {value} is outside [{low}, {'inf' if high is None else high}]")
    return value


@dataclass(frozen=True)
class OutputSpec:
    bucket: str
    prefix: str
    format: str = "png"

    @classmethod
    def from_dict(cls, value, job_id: str) -> "OutputSpec":
        _check_type("output", value, dict)
        _reject_unknown("output", value, {f.name for f in fields(cls)})
        if "bucket" not in value:
            raise _invalid("output.bucket: required")
        bucket = _check_type("output.bucket", value["bucket"], str)
        if not _BUCKET_NAME.match(bucket):
            raise _invalid(f"output.bucket: {bucket!r} is not a valid S3 bucket name")
        prefix = _check_type("output.prefix", value.get("prefix", f"jobs/{job_id}/"), str)
        if len(prefix) > MAX_PREFIX_CHARS or prefix.startswith("/"):
            raise _invalid(f"output.prefix: must not start with '/' and be at most {MAX_PREFIX_CHARS} characters")
        output_format = value.get("format", "png")
        if output_format not in OUTPUT_FORMATS:
            raise _invalid(f"output.format: {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
        return cls(bucket=bucket, prefix=prefix, format=output_format)

    def key(self, index: int) -> str:
        """The deterministic key of image `index`: a redelivered job writes the same objects again."""
        return f"{self.prefix}{index}.{self.format}"


def _reject_unknown(name: str, value: dict, known: set) -> None:
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise _invalid(f"{name}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")


@dataclass(frozen=True)
class Job:
    job_id: str
    image: str
    mask: str
    prompt: str
    output: OutputSpec
    # null = none given. SD1.5 models treat null and "" alike (as diffusers does); SDXL models with
    # force_zeros_for_empty_prompt use zero negative embeddings for null and encode "" as text.
    negative_prompt: str | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    strength: float = 1.0
    scheduler: str | None = None
    seed: int | None = None
    num_images: int = 1
    width: int | None = None
    height: int | None = None
    mask_blur: int = 0
    padding_mask_crop: int | None = None
    keep_unmasked: bool = True
    priority: int = 5
    webhook: str | None = None

    REQUIRED = ("job_id", "image", "mask", "prompt", "output")

    @classmethod
    def from_dict(cls, value) -> "Job":
        """The validated job; raises JobError(invalid_input) naming the first bad field."""
        _check_type("job", value, dict)
        _reject_unknown("job", value, {f.name for f in fields(cls)})
        for name in cls.REQUIRED:
            if name not in value:
                raise _invalid(f"{name}: required")
        if not is_job_id(value["job_id"]):
            raise _invalid(f"job_id: {str(value['job_id'])[:64]!r} is not a uuid4 in lowercase hex (uuid4().hex)")
        args = {f.name: value.get(f.name, f.default) for f in fields(cls) if f.name != "output"}
        args["output"] = OutputSpec.from_dict(value["output"], value["job_id"])
        job = cls(**args)
        job._check()
        return job

    def _check(self) -> None:
        parse_s3_uri("image", self.image)
        parse_s3_uri("mask", self.mask)
        _check_type("prompt", self.prompt, str)
        _check_type("negative_prompt", self.negative_prompt, str, nullable=True)
        _check_int("num_inference_steps", self.num_inference_steps, 1)
        _check_type("guidance_scale", self.guidance_scale, (int, float))
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise _invalid(f"guidance_scale: {self.guidance_scale} is not a finite number >= 0")
        _check_type("strength", self.strength, (int, float))
        if not 0 < self.strength <= 1:  # NaN fails this too
            raise _invalid(f"strength: {self.strength} is outside (0, 1]")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise _invalid(f"scheduler: {self.scheduler!r} is not null or one of {', '.join(SCHEDULERS)}")
        _check_int("num_images", self.num_images, 1)
        _check_int("seed", self.seed, 0, MAX_SEED - self.num_images, nullable=True)
        for name in ("width", "height"):
            size = _check_int(name, getattr(self, name), SIZE_MULTIPLE, nullable=True)
            if size is not None and size % SIZE_MULTIPLE:
                raise _invalid(f"{name}: {size} is not a multiple of {SIZE_MULTIPLE}")
        _check_int("mask_blur", self.mask_blur, 0)
        _check_int("padding_mask_crop", self.padding_mask_crop, 0, nullable=True)
        _check_type("keep_unmasked", self.keep_unmasked, bool)
        _check_int("priority", self.priority, 0, MAX_PRIORITY)
        if self.webhook is not None:
            raise _invalid("webhook: webhooks are not delivered by this service; leave it null and read the "
                           "events stream instead")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def image_location(self) -> tuple[str, str]:
        return parse_s3_uri("image", self.image)

    @property
    def mask_location(self) -> tuple[str, str]:
        return parse_s3_uri("mask", self.mask)


@dataclass(frozen=True)
class Limits:
    """What one job may ask for; a job over a limit fails with limit_exceeded before any GPU work."""
    max_pixels: int = 1024 * 1024
    max_steps: int = 150
    max_images: int = 8
    max_prompt_chars: int = 2000

    def check_job(self, job: Job) -> None:
        self.check_fields(job.to_dict())
        if job.width is not None and job.height is not None:
            self.check_size(job.width, job.height)

    def check_fields(self, values: dict) -> None:
        """The limits on a job's fields, given by name (absent ones have the schema's defaults); values of the wrong
        type are left to Job.from_dict."""
        defaults = {item.name: item.default for item in fields(Job)}
        value = lambda name: values.get(name, defaults.get(name))   # noqa: E731
        checks = (("num_inference_steps", value("num_inference_steps"), self.max_steps),
                  ("num_images", value("num_images"), self.max_images),
                  ("prompt", _length(value("prompt")), self.max_prompt_chars),
                  ("negative_prompt", _length(value("negative_prompt")), self.max_prompt_chars))
        for name, number, limit in checks:
            if isinstance(number, int) and not isinstance(number, bool) and number > limit:
                unit = " characters" if "prompt" in name else ""
                raise JobError(LIMIT_EXCEEDED, f"{name}: {number}{unit} is over the limit of {limit}{unit}")

    def check_size(self, width: int, height: int, name: str = "size") -> None:
        check_pixels(name, width, height, self.max_pixels)


def check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    """limit_exceeded when width x height is over `max_pixels` (the setting INPAINT_MAX_PIXELS)."""
    if width * height > max_pixels:
        raise JobError(LIMIT_EXCEEDED, f"{name}: {width}x{height} = {width * height} pixels is over the limit of "
                                       f"{max_pixels} pixels (INPAINT_MAX_PIXELS)")


def _length(text):
    return len(text) if isinstance(text, str) else None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _json_or_none(value):
    return json.loads(value) if value else None


def _float_or_none(value):
    return float(value) if value not in (None, "") else None


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str
    step: int = 0
    total_steps: int = 0
    attempt: int = 0
    worker: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: dict | None = None
    result: dict | None = None
    phase: str = ""              # while running: one of state.PHASES

    @classmethod
    def from_hash(cls, job_id: str, mapping: dict) -> "JobStatus":
        """The status in the job's state hash (str or bytes keys); an empty hash is an expired (or unknown) job."""
        values = {_text(k): _text(v) for k, v in mapping.items()}
        if not values:
            return cls(job_id=job_id, state=EXPIRED)
        return cls(job_id=job_id, state=values.get("state", EXPIRED),
                   step=int(values.get("step") or 0), total_steps=int(values.get("total_steps") or 0),
                   attempt=int(values.get("attempt") or 0), worker=values.get("worker") or None,
                   created_at=_float_or_none(values.get("created_at")),
                   started_at=_float_or_none(values.get("started_at")),
                   finished_at=_float_or_none(values.get("finished_at")),
                   error=_json_or_none(values.get("error")), result=_json_or_none(values.get("result")),
                   phase=values.get("phase") or "")

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


# The image formats workers decode, as PIL names them, with the file extension each is stored under.
INPUT_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


def redact_url(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    parsed = urlparse(url)
    if not parsed.password:
        return url
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)).geturl()
