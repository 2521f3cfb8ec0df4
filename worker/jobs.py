"""What the `inpaint.run` task does, as plain functions: validate -> fetch inputs -> paint -> upload -> report.

`run_job(raw_job, runtime, worker, may_retry)` is the whole job; its collaborators (state store, storage, the
pipeline) come in through `Runtime`, so tests hand in their own.
"""
import contextlib
import dataclasses
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import redis
import torch
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from api_client import inputs, schema
from api_client.state import UPLOADING
from worker.inference.denoise import InpaintCancelled
from worker.events import CLAIMED, JobStore, ProgressReporter
from worker.lease import Heartbeat
from worker.inference.model.loader import ModelLoadError
from worker.inference.pipeline import InpaintArgumentError
from worker.settings import Settings
from worker.storage import Storage

__all__ = ["Runtime", "Outcome", "PipelineHolder", "run_job", "validate_job", "decode_image", "load_inputs",
           "job_seed", "paint", "encode_image", "upload_outputs", "retry_delay_s", "load_pipeline",
           "hard_time_limit", "SUCCEEDED", "FAILED", "CANCELED", "SKIPPED", "REJECTED", "RETRY"]

log = logging.getLogger("inpaint.jobs")

SUCCEEDED, FAILED, CANCELED = schema.SUCCEEDED, schema.FAILED, schema.CANCELED
SKIPPED = "skipped"      # already final, running under another live attempt, or taken over from this one
REJECTED = "rejected"    # no usable job_id: nothing can be recorded
RETRY = "retry"          # a transient error; the caller schedules another attempt

SAVE_OPTIONS = {"png": {"format": "PNG"}, "jpeg": {"format": "JPEG", "quality": 95},
                "webp": {"format": "WEBP", "quality": 95}}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one delivery ended, with what the worker's metrics record."""
    status: str
    error: schema.JobError | None = None
    attempt: int = 0
    run_s: float = 0.0
    queue_wait_s: float | None = None   # submission to the start of the first attempt (None on later ones)
    steps: int = 0                      # denoise steps of a succeeded run
    images: int = 0
    denoise_s: float | None = None

    def summary(self) -> dict:
        """A JSON-able summary (the Celery task's return value)."""
        return {"status": self.status, "attempt": self.attempt,
                "error": self.error.to_dict() if self.error else None}


def load_pipeline(settings: Settings):
    """The model, as the settings describe it. Imported here: only a process that runs jobs needs the model code."""
    from worker.inference.pipeline import InpaintPipeline

    return InpaintPipeline.from_pretrained(
        settings.model, device=settings.device or None, dtype=settings.dtype or None,
        revision=settings.model_revision or None, cache_dir=settings.model_cache_dir or None,
        local_files_only=settings.local_files_only, cuda_graphs=settings.cuda_graphs,
        max_graphs=settings.max_cuda_graphs)


class PipelineHolder:
    """Loads the pipeline once per process, on first use; a failed load is retried by the next job."""

    def __init__(self, load: Callable[[], object]):
        self._load, self._pipeline, self._lock = load, None, threading.Lock()

    def get(self):
        with self._lock:
            if self._pipeline is None:
                started = time.monotonic()
                try:
                    self._pipeline = self._load()
                except ModelLoadError as error:
                    raise schema.JobError(schema.MODEL_UNAVAILABLE, str(error)) from None
                except Exception as error:   # a bad config or a broken file: the model is as unavailable
                    log.exception("model load failed")
                    raise schema.JobError(schema.MODEL_UNAVAILABLE, f"{type(error).__name__}: {error}") from None
                log.info("model loaded", extra={"load_s": round(time.monotonic() - started, 3)})
            return self._pipeline

    @property
    def loaded(self):
        """The pipeline if it is loaded, else None (never starts a load)."""
        return self._pipeline


@contextlib.contextmanager
def hard_time_limit(seconds: float, on_expiry: Callable[[], None]):
    """Run the body; should it last past `seconds`, call `on_expiry` from a timer thread meanwhile. The task ends its
    process from there: a CUDA call that hangs (a wedged GPU) can be interrupted no other way."""
    timer = threading.Timer(seconds, on_expiry)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@dataclasses.dataclass
class Runtime:
    settings: Settings
    store: JobStore
    storage: Storage
    pipeline: Callable[[], object]   # returns the (cached) pipeline; raises JobError(model_unavailable)


def validate_job(raw, settings: Settings, storage: Storage) -> schema.Job:
    """The job, checked against the schema, the limits and the bucket allowlist, before any GPU work."""
    job = schema.Job.from_dict(raw)
    settings.limits.check_job(job)
    storage.check_bucket("image", job.image_location[0])
    storage.check_bucket("mask", job.mask_location[0])
    storage.check_bucket("output.bucket", job.output.bucket)
    return job


def decode_image(name: str, data: bytes, max_pixels: int) -> Image.Image:
    """A PNG, JPEG or WEBP image, checked from its header as the client checks it (api_client.inputs), then
    decoded; anything unreadable is invalid_input, a decompression bomb is limit_exceeded."""
    image = inputs.open_header(name, data, max_pixels)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise schema.JobError(schema.INVALID_INPUT, f"{name}: not a readable "
                                                    f"{', '.join(schema.INPUT_FORMATS)} image ({error})") from None
    return _eight_bit(image)


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer greys scaled to 8 bits (a plain convert would clip everything above 255)."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return image
    return image.convert("I").point(lambda value: value / 256).convert("L")


def load_inputs(job: schema.Job, storage: Storage, max_pixels: int) -> tuple[Image.Image, Image.Image]:
    """The job's image (RGB) and mask (L, white = repaint); the two must have the same size."""
    with ThreadPoolExecutor(max_workers=2) as pool:  # the two GETs overlap: one round trip, not two
        image_data = pool.submit(storage.read, "image", *job.image_location)
        mask_data = pool.submit(storage.read, "mask", *job.mask_location)
        image = decode_image("image", image_data.result(), max_pixels).convert("RGB")
        mask = decode_image("mask", mask_data.result(), max_pixels).convert("L")
    if mask.size != image.size:
        raise schema.JobError(schema.INVALID_INPUT, f"mask: size {mask.width}x{mask.height} differs from the "
                                                    f"image's {image.width}x{image.height}")
    return image, mask


def job_seed(job: schema.Job) -> int:
    """The job's seed, or one derived from its (random) job_id: a retried job paints the same pixels again."""
    if job.seed is not None:
        return job.seed
    return int(job.job_id[:16], 16) % (schema.MAX_SEED - job.num_images + 1)   # seed + i <= MAX_SEED - 1


def paint(pipeline, job: schema.Job, image: Image.Image, mask: Image.Image, seed: int, callback,
          on_phase=None) -> list:
    """The job's images. Out of GPU memory, the pipeline lets go of what it caches (CUDA graphs, free blocks) and
    the job runs once more (its progress starts again); out of memory again, it fails as too large for this GPU."""
    try:
        try:
            return _run_pipeline(pipeline, job, image, mask, seed, callback, on_phase)
        except torch.OutOfMemoryError:
            log.warning("out of GPU memory; releasing cached graphs and memory, then running the job again",
                        extra={"job_id": job.job_id})
            pipeline.release_memory()
            return _run_pipeline(pipeline, job, image, mask, seed, callback, on_phase)
    # Only the pipeline's own argument checks (size multiples, strength x steps, ...) are the caller's fault; any
    # other ValueError (inside torch, say) is a worker bug and ends as internal.
    except InpaintArgumentError as error:
        raise schema.JobError(schema.INVALID_INPUT, str(error)) from None
    except torch.OutOfMemoryError:
        pipeline.release_memory()  # for the next job
        size = f"{job.width or image.width}x{job.height or image.height}, {job.num_images} image(s)"
        raise schema.JobError(schema.LIMIT_EXCEEDED, f"out of GPU memory at {size}, even with the worker's caches "
                                                     "freed: lower width, height or num_images") from None


def _run_pipeline(pipeline, job: schema.Job, image: Image.Image, mask: Image.Image, seed: int, callback,
                  on_phase) -> list:
    return pipeline(job.prompt, image, mask, negative_prompt=job.negative_prompt,
                    num_inference_steps=job.num_inference_steps, guidance_scale=job.guidance_scale,
                    strength=job.strength, scheduler=job.scheduler, seed=seed,
                    num_images_per_prompt=job.num_images, height=job.height, width=job.width,
                    mask_blur=job.mask_blur, padding_mask_crop=job.padding_mask_crop,
                    keep_unmasked=job.keep_unmasked, callback=callback, on_phase=on_phase)


def encode_image(image: Image.Image, output_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **SAVE_OPTIONS[output_format])
    return buffer.getvalue()


def upload_outputs(job: schema.Job, images: list, seed: int, storage: Storage) -> list[dict]:
    """Store image i at <prefix><i>.<format>; the result's image entries."""
    entries = []
    for index, image in enumerate(images):
        key = job.output.key(index)
        stored = storage.write_once(job.output.bucket, key, encode_image(image, job.output.format),
                                    schema.CONTENT_TYPES[job.output.format],
                                    {"job-id": job.job_id, "seed": seed + index})
        entries.append({"uri": f"s3://{job.output.bucket}/{key}",
                        "url": storage.presigned_url(job.output.bucket, key), "seed": seed + index,
                        "width": image.width, "height": image.height, "sha256": stored.sha256})
    return entries


def retry_delay_s(settings: Settings, retries_so_far: int) -> float:
    return min(settings.retry_backoff_s * 2 ** retries_so_far, settings.retry_backoff_max_s)


def _execute(job: schema.Job, runtime: Runtime, reporter: ProgressReporter) -> dict:
    """Fetch, paint, upload; the result dict. Raises JobError, InpaintCancelled."""
    timings, started = {}, time.monotonic()
    image, mask = load_inputs(job, runtime.storage, runtime.settings.max_pixels)
    runtime.settings.limits.check_size(job.width or image.width, job.height or image.height)
    timings["fetch_s"] = time.monotonic() - started
    pipeline = runtime.pipeline()
    timings["model_s"] = time.monotonic() - started - timings["fetch_s"]
    seed = job_seed(job)
    images = paint(pipeline, job, image, mask, seed, reporter, on_phase=reporter.phase)
    timings["inference_s"] = time.monotonic() - started - timings["fetch_s"] - timings["model_s"]
    reporter.phase(UPLOADING)
    entries = upload_outputs(job, images, seed, runtime.storage)
    timings["upload_s"] = time.monotonic() - started - sum(timings.values())
    timings["total_s"] = time.monotonic() - started
    return {"images": entries, "timings": {name: round(value, 4) for name, value in timings.items()}}


def run_job(raw_job, runtime: Runtime, worker: str, may_retry: bool) -> Outcome:
    """Run one delivery of a job to its end; every ending is written to the job's state and events."""
    job_id = raw_job.get("job_id") if isinstance(raw_job, dict) else None
    if not schema.is_job_id(job_id):
        error = schema.JobError(schema.INVALID_INPUT, "job_id: missing or not a uuid4 hex; nothing recorded")
        log.error("job refused", extra={"job_id": str(job_id)[:64], "code": error.code})
        return Outcome(REJECTED, error)
    job, invalid = _validated(raw_job, runtime)
    # Only a valid job is kept in the state hash (for a watchdog to enqueue again); an invalid one may be huge.
    claim = runtime.store.claim(job_id, worker, runtime.settings.lease_s,
                                job.to_dict() if job else None, max_attempts=runtime.settings.max_attempts)
    if claim.outcome != CLAIMED:
        log.info("job not run again", extra={"job_id": job_id, "reason": claim.outcome, "state": claim.state})
        return Outcome(SKIPPED, attempt=claim.attempt)
    log.info("job started", extra={"job_id": job_id, "attempt": claim.attempt, "worker": worker})
    started = time.monotonic()
    # The heartbeat keeps this attempt's lease alive; if the process dies, the lease runs out and a watchdog
    # (worker.lease) sends the job to another worker. If this attempt loses the lease anyway (a long stall), the
    # reporter stops the denoise loop: the new attempt owns the job.
    heartbeat = Heartbeat(runtime.store.redis, job_id, claim.attempt, runtime.settings.lease_s,
                          runtime.settings.heartbeat_s)
    reporter = ProgressReporter(runtime.store, job_id, claim.attempt, runtime.settings.progress_interval_s,
                                deadline=started + runtime.settings.soft_time_limit_s,
                                lease_lost=lambda: heartbeat.lost)
    with heartbeat:
        outcome = _finish(job_id, claim.attempt, runtime, may_retry,
                          lambda: _attempt(job, invalid, runtime, reporter), heartbeat)
    first_wait = time.time() - claim.created_at if claim.attempt == 1 and claim.created_at else None
    return dataclasses.replace(outcome, run_s=time.monotonic() - started, queue_wait_s=first_wait,
                               steps=reporter.step if outcome.status == SUCCEEDED else 0)


def _validated(raw_job: dict, runtime: Runtime) -> tuple[schema.Job | None, schema.JobError | None]:
    try:
        return validate_job(raw_job, runtime.settings, runtime.storage), None
    except schema.JobError as error:
        return None, error


def _attempt(job: schema.Job | None, invalid: schema.JobError | None, runtime: Runtime,
             reporter: ProgressReporter) -> dict:
    if invalid is not None:
        raise invalid
    if runtime.store.cancel_requested(job.job_id):
        raise InpaintCancelled("canceled before it started")
    return _execute(job, runtime, reporter)


def _finish(job_id: str, attempt: int, runtime: Runtime, may_retry: bool, work: Callable[[], dict],
            heartbeat: Heartbeat) -> Outcome:
    store, fields = runtime.store, {"job_id": job_id, "attempt": attempt}
    try:
        result = work()
    except InpaintCancelled:
        error = _stop_error(store, job_id)
    except SoftTimeLimitExceeded:
        error = schema.JobError(schema.TIMEOUT, f"the job ran past {runtime.settings.soft_time_limit_s}s "
                                                "(INPAINT_SOFT_TIME_LIMIT_S)")
    except schema.JobError as job_error:
        error = job_error
    except redis.RedisError as redis_error:
        # The state store itself failed: record what can be recorded, let the caller retry the delivery.
        log.warning("state store error", extra={**fields, "error": str(redis_error)})
        error = schema.JobError(schema.STORAGE_UNAVAILABLE, f"state store: {redis_error}")
    except Exception:
        log.exception("job failed unexpectedly", extra=fields)
        error = schema.JobError(schema.INTERNAL, "unexpected worker error; see the worker's log")
    else:
        if not store.finish(job_id, SUCCEEDED, attempt, result=result):
            return _superseded(fields)
        log.info("job succeeded", extra={**fields, "timings": result["timings"]})
        return Outcome(SUCCEEDED, attempt=attempt, images=len(result["images"]),
                       denoise_s=result["timings"]["inference_s"])
    if heartbeat.lost:   # the stop (or failure) is this attempt's, not the job's: the new attempt reports
        return _superseded(fields)
    if error.transient and may_retry:
        if not store.release(job_id, attempt, error.to_dict()):
            return _superseded(fields)
        log.warning("job will be retried", extra={**fields, "code": error.code, "error": error.message})
        return Outcome(RETRY, error, attempt)
    state = CANCELED if error.code == schema.CANCELED_ERROR else FAILED
    if not store.finish(job_id, state, attempt, error=error.to_dict()):
        return _superseded(fields)
    log.info(f"job {state}", extra={**fields, "code": error.code, "error": error.message})
    return Outcome(state, error, attempt)


def _superseded(fields: dict) -> Outcome:
    """Another attempt owns the job (this one's lease was taken over) or it is final already: this attempt's ending
    is not the job's, so nothing is written and it counts as skipped, not as a success or failure."""
    log.warning("attempt superseded, its ending not recorded", extra=fields)
    return Outcome(SKIPPED, attempt=fields["attempt"])


def _stop_error(store: JobStore, job_id: str) -> schema.JobError:
    if store.cancel_requested(job_id):
        return schema.JobError(schema.CANCELED_ERROR, "canceled by request")
    return schema.JobError(schema.TIMEOUT, "the job ran past its time limit (INPAINT_SOFT_TIME_LIMIT_S)")
