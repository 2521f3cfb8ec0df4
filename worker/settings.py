"""Every worker setting, read once from environment variables into one frozen object (DESIGN §6).

`Settings.from_env()` reads and checks them (a bad value raises ValueError naming the variable);
`Settings.describe()` lists each variable with its default and meaning (the README's table);
`settings.redacted()` is a printable dict without credentials.
"""
from dataclasses import dataclass

from api_client import schema, state
from api_client.envsettings import FleetSettings, check_fields, describe_rows, from_env
from api_client.envsettings import setting as _setting
from api_client.schema import redact_url  # re-exported: others import it from here
from worker.inference.names import DTYPES, GRAPH_MODES, KERNEL_MODES, dtype_key

__all__ = ["Settings", "redact_url"]

LOG_FORMATS = ("json", "text")
MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600  # S3's ceiling for SigV4 presigned URLs


@dataclass(frozen=True, repr=False)
class Settings(FleetSettings):
    broker_url: str = _setting("INPAINT_BROKER_URL", "redis://localhost:6379/0",
                               "Celery broker (Redis); also holds job state and events unless INPAINT_STATE_URL")
    state_url: str = _setting("INPAINT_STATE_URL", "", "Redis for job state hashes and event streams "
                                                       "(empty = the broker's)")
    queue: str = _setting("INPAINT_QUEUE", "inpaint", "queue the workers consume")
    model: str = _setting("INPAINT_MODEL", "stable-diffusion-v1-5/stable-diffusion-inpainting",
                          "hub id or local folder (diffusers layout, safetensors only)")
    model_revision: str = _setting("INPAINT_MODEL_REVISION", "", "hub revision (empty = main)")
    model_cache_dir: str = _setting("INPAINT_MODEL_CACHE_DIR", "", "hub cache folder (empty = huggingface_hub's)")
    local_files_only: bool = _setting("INPAINT_LOCAL_FILES_ONLY", False, "never download the model, use the cache")
    device: str = _setting("INPAINT_DEVICE", "", "torch device (empty = cuda if available, else cpu)")
    dtype: str = _setting("INPAINT_DTYPE", "auto", "auto, float16, bfloat16 or float32 (auto: float16 on cuda, "
                                                   "bfloat16 on a CPU with AMX or AVX-512 BF16, else float32)",
                          choices=("auto", "", *DTYPES))
    cuda_graphs: str = _setting("INPAINT_CUDA_GRAPHS", "auto", "denoise loop as CUDA-graph replay: auto, on or off",
                                choices=GRAPH_MODES)
    max_cuda_graphs: int = _setting("INPAINT_MAX_CUDA_GRAPHS", 8, "captured graphs kept (one per job shape)",
                                    low=1)
    kernels: str = _setting("INPAINT_KERNELS", "auto", "attention/GroupNorm kernels: auto (Triton on CUDA), "
                                                       "triton or torch", choices=KERNEL_MODES)
    s3_endpoint_url: str = _setting("INPAINT_S3_ENDPOINT_URL", "", "S3 endpoint (empty = AWS; MinIO, R2, ...)")
    bucket: str = _setting("INPAINT_BUCKET", "", "default bucket for inputs and outputs")
    allowed_buckets: str = _setting("INPAINT_ALLOWED_BUCKETS", "", "comma-separated buckets jobs may read and "
                                                                   "write (empty = INPAINT_BUCKET only)")
    presign_expiry_s: int = _setting("INPAINT_PRESIGN_EXPIRY_S", 3600, "lifetime of the result's presigned URLs",
                                     low=1, high=MAX_PRESIGN_EXPIRY_S)
    max_input_bytes: int = _setting("INPAINT_MAX_INPUT_BYTES", 20 * 1024 * 1024, "largest image or mask file read",
                                    low=1)
    max_pixels: int = _setting("INPAINT_MAX_PIXELS", schema.Limits.max_pixels, "largest output (and input) "
                                                                              "width x height", low=64)
    max_steps: int = _setting("INPAINT_MAX_STEPS", schema.Limits.max_steps, "most num_inference_steps", low=1)
    max_images: int = _setting("INPAINT_MAX_IMAGES", schema.Limits.max_images, "most num_images per job", low=1)
    max_prompt_chars: int = _setting("INPAINT_MAX_PROMPT_CHARS", schema.Limits.max_prompt_chars,
                                     "longest prompt and negative prompt", low=1)
    soft_time_limit_s: int = _setting("INPAINT_SOFT_TIME_LIMIT_S", 600, "a job running longer fails with timeout",
                                      low=1)
    time_limit_s: int = _setting("INPAINT_TIME_LIMIT_S", 660, "hard limit: the job's process is killed "
                                                              "(must exceed the soft limit)", low=2)
    max_retries: int = _setting("INPAINT_MAX_RETRIES", 3, "retries of a transient failure (storage, model hub)",
                                low=0)
    max_attempts: int = _setting("INPAINT_MAX_ATTEMPTS", 5, "starts of one job, retries and redeliveries after a "
                                                           "lost worker included, before it fails for good", low=1)
    lease_s: float = _setting("INPAINT_LEASE_S", 30.0, "a running job's lease: a job whose worker stopped renewing "
                                                       "it this long is sent to another worker", low=1.0)
    heartbeat_s: float = _setting("INPAINT_HEARTBEAT_S", 10.0, "how often the running job's lease is renewed "
                                                               "(under half of INPAINT_LEASE_S)", low=0.05)
    watchdog_interval_s: float = _setting("INPAINT_WATCHDOG_INTERVAL_S", 10.0, "how often each worker looks for "
                                                                              "expired leases", low=0.05)
    retry_backoff_s: float = _setting("INPAINT_RETRY_BACKOFF_S", 2.0, "first retry delay, doubled each retry",
                                      low=0.0)
    retry_backoff_max_s: float = _setting("INPAINT_RETRY_BACKOFF_MAX_S", 60.0, "longest retry delay", low=0.0)
    state_ttl_s: int = _setting("INPAINT_STATE_TTL_S", state.STATE_TTL_SECONDS, "lifetime of a job's state hash "
                                                                               "and event stream", low=60)
    events_maxlen: int = _setting("INPAINT_EVENTS_MAXLEN", state.EVENTS_STREAM_MAXLEN, "approximate cap of the "
                                                                                      "shared events stream", low=1)
    progress_interval_s: float = _setting("INPAINT_PROGRESS_INTERVAL_S", 0.5, "least time between two progress "
                                                                              "events of a job", low=0.0)
    gpus: str = _setting("INPAINT_GPUS", "", "run one worker process per GPU: all, none or a list such as 0,1 "
                                             "(as --gpus; empty = this process is the worker)")
    metrics_port: int = _setting("INPAINT_METRICS_PORT", 0, "port of /metrics, /ready, /healthz (0 = off); "
                                                            "worker process i serves on this port + i", low=0,
                                 high=65535)
    warmup: str = _setting("INPAINT_WARMUP", "", "job shapes to run once at start-up (CUDA graphs captured, kernels "
                                                 "tuned), comma-separated WIDTHxHEIGHT:STEPS[:SCHEDULER[:BATCH]], e.g. "
                                                 "512x512:50:pndm (empty = none)")
    log_level: str = _setting("INPAINT_LOG_LEVEL", "INFO", "worker log level",
                              choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = _setting("INPAINT_LOG_FORMAT", "json", "worker log lines, Celery's own included: json (one "
                                                             "object per line) or text (one line for people)",
                               choices=LOG_FORMATS)

    def __post_init__(self):
        check_fields(self, _normalized)
        if self.time_limit_s <= self.soft_time_limit_s:
            raise ValueError(f"INPAINT_TIME_LIMIT_S={self.time_limit_s}: must exceed INPAINT_SOFT_TIME_LIMIT_S="
                             f"{self.soft_time_limit_s}, so the job can report its timeout before it is killed")
        self.warmup_shapes  # parse now: a malformed INPAINT_WARMUP fails at start-up, naming the entry
        if self.heartbeat_s * 2 > self.lease_s:
            raise ValueError(f"INPAINT_HEARTBEAT_S={self.heartbeat_s}: must be at most half of INPAINT_LEASE_S="
                             f"{self.lease_s}, so one late heartbeat does not lose a live job")
        if self.max_attempts <= self.max_retries:
            raise ValueError(f"INPAINT_MAX_ATTEMPTS={self.max_attempts}: must exceed INPAINT_MAX_RETRIES="
                             f"{self.max_retries}, or the last retry could never start")

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        return from_env(cls, environ)

    @classmethod
    def describe(cls) -> str:
        """One Markdown table row per variable: name, default, meaning; then boto3's own variables."""
        rows = ["| variable | default | meaning |", "| --- | --- | --- |", *describe_rows(cls)]
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            rows.append(f"| `{variable}` | (boto3's) | S3 credentials and region, read by boto3 itself |")
        return "\n".join(rows)

    @property
    def warmup_shapes(self) -> list[dict]:
        """INPAINT_WARMUP as keyword arguments of InpaintPipeline.warmup."""
        return [_warmup_shape(entry.strip()) for entry in self.warmup.split(",") if entry.strip()]

    @property
    def visibility_timeout_s(self) -> int:
        # A Redis message unacknowledged this long is delivered again: it must outlast the longest run (the hard
        # limit) plus the longest retry countdown, or a healthy job would run twice.
        return int(self.time_limit_s + self.retry_backoff_max_s + 60)


def _normalized(item, value: str) -> str:
    if item.name == "dtype":
        return dtype_key(value)   # as the loader reads it
    return value.upper() if item.name == "log_level" else value.lower()


def _warmup_shape(entry: str) -> dict:
    parts = entry.split(":")
    try:
        width, height = (int(v) for v in parts[0].lower().split("x"))
        shape = {"width": width, "height": height, "num_inference_steps": int(parts[1])}
        if len(parts) > 2 and parts[2]:
            shape["scheduler"] = parts[2]
        if len(parts) > 3:
            shape["batch"] = int(parts[3])
    except (ValueError, IndexError):
        raise ValueError(f"INPAINT_WARMUP entry {entry!r}: expected WIDTHxHEIGHT:STEPS[:SCHEDULER[:BATCH]], "
                         "e.g. 512x512:50:pndm") from None
    if len(parts) > 4 or min(width, height, shape["num_inference_steps"], shape.get("batch", 1)) < 1:
        raise ValueError(f"INPAINT_WARMUP entry {entry!r}: sizes, steps and batch must be positive integers")
    if shape.get("scheduler", schema.SCHEDULERS[0]) not in schema.SCHEDULERS:
        raise ValueError(f"INPAINT_WARMUP entry {entry!r}: scheduler must be one of {', '.join(schema.SCHEDULERS)}")
    return shape
