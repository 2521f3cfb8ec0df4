"""The `inpaint.run` task, thin: the work is worker.jobs.run_job; this wires it to Celery's retries and signals.

The runtime (Redis state store, S3 client, model holder) is built once per worker process, on first use; the
model itself loads at `worker_process_init` (the solo pool sends it too), after any fork.
"""
import logging
import os
import time

import redis
from billiard.process import current_process
from celery import signals
from celery.exceptions import TimeLimitExceeded

from api_client import schema
from worker import jobs, lease, metrics
from worker.app import app, settings
from worker.events import JobStore
from worker.storage import Storage

__all__ = ["run", "runtime"]

log = logging.getLogger("inpaint.tasks")
# The solo pool (worker/__main__.py) enforces no time limit; the task's own timer does, a little after the hard
# limit so that a prefork pool, which does enforce it, always acts first.
HARD_LIMIT_GRACE_S = 5
HARD_LIMIT_EXIT_STATUS = 124  # as timeout(1)
MODEL_UNAVAILABLE_EXIT_STATUS = 3  # the model did not load: nothing was consumed, a restart may help

_runtime: jobs.Runtime | None = None
_pipelines = jobs.PipelineHolder(lambda: jobs.load_pipeline(settings))


def runtime() -> jobs.Runtime:
    global _runtime
    if _runtime is None:
        _runtime = jobs.Runtime(settings=settings, store=JobStore.from_settings(settings),
                                storage=Storage.from_settings(settings), pipeline=_pipelines.get)
    return _runtime


@app.task(name=schema.TASK_NAME, bind=True)
def run(self, job: dict) -> dict:
    retries = self.request.retries
    delay = jobs.retry_delay_s(settings, retries)
    try:
        with jobs.hard_time_limit(settings.time_limit_s + HARD_LIMIT_GRACE_S, lambda: _end_at_hard_limit(job)):
            outcome = jobs.run_job(job, runtime(), worker=self.request.hostname,
                                   may_retry=retries < settings.max_retries)
    except redis.RedisError as error:  # the state store is down: nothing could be recorded, try the delivery again
        raise self.retry(exc=error, countdown=delay, max_retries=settings.max_retries)
    metrics.record_job(outcome.status, outcome.queue_wait_s, outcome.run_s, outcome.steps, outcome.images,
                       outcome.denoise_s)
    _observe_pipeline(_pipelines.loaded)
    if outcome.status == jobs.RETRY:
        # The retry's message carries the job on; a watchdog must not send a second copy meanwhile.
        lease.forget(runtime().store.redis, job["job_id"])
        # The backoff is waited out here rather than as a countdown: a worker whose storage is away takes no new
        # job meanwhile, instead of failing the whole backlog one job after another.
        time.sleep(delay)
        raise self.retry(countdown=0, max_retries=settings.max_retries)
    return outcome.summary()


@signals.worker_process_init.connect
def _start_process(**kwargs) -> None:
    """Serve metrics, load the model and warm it up, then turn /ready 200. Celery sends this before the worker
    consumes, so a worker whose model will not load never takes a job: it tries INPAINT_MAX_RETRIES more times
    with backoff, then exits with MODEL_UNAVAILABLE_EXIT_STATUS, leaving the queue to healthy workers; whatever
    restarts it (container, unit, supervisor) tries again with a fresh process and CUDA context."""
    log.info("worker settings", extra={"settings": settings.redacted()})
    _serve_metrics()
    _start_watchdog()
    started = time.monotonic()
    pipeline = _load_model_or_exit()
    _warm_up(pipeline)
    _observe_pipeline(pipeline)
    metrics.set_ready(True)
    log.info("model ready", extra={"model": settings.model, "load_s": round(time.monotonic() - started, 3)})


def _load_model_or_exit():
    """The pipeline, loaded within 1 + INPAINT_MAX_RETRIES tries; SystemExit, which Celery lets end the process
    (an exception would only be logged and the worker would consume anyway), when none succeeds."""
    tries = settings.max_retries + 1
    for retries in range(tries):
        try:
            return runtime().pipeline()
        except schema.JobError as error:   # any load failure: the holder names it and its cause
            log.error("model not loaded", extra={"code": error.code, "error": error.message, "try": retries + 1,
                                                 "tries": tries, "model": settings.model})
        if retries + 1 < tries:
            time.sleep(jobs.retry_delay_s(settings, retries))
    log.critical("model unavailable; the worker exits without taking jobs",
                 extra={"code": schema.MODEL_UNAVAILABLE, "exit_status": MODEL_UNAVAILABLE_EXIT_STATUS})
    raise SystemExit(MODEL_UNAVAILABLE_EXIT_STATUS)


def _warm_up(pipeline) -> None:
    """Run the INPAINT_WARMUP shapes. A failure is logged and the rest skipped: the model itself works, jobs only
    pay the capture (or hit the same error, reported per job) on their first run of that shape."""
    for shape in settings.warmup_shapes:
        try:
            pipeline.warmup(**shape)
        except Exception as error:
            log.exception("warm-up failed", extra={**shape, "code": schema.INTERNAL, "error": str(error)})
            return
        log.info("warmed up", extra=shape)


def _observe_pipeline(pipeline) -> None:
    """Read what the pipeline knows into the metrics: GPU memory, and the CUDA graphs its runner captured (the
    inference library counts them; it does not import the service's metrics)."""
    if pipeline is not None:
        metrics.observe_gpu_memory(pipeline.device)
        metrics.observe_graph_captures(pipeline.runner.captures)


def _start_watchdog() -> None:
    store = runtime().store
    lease.Watchdog(store.redis, _dispatch, settings.watchdog_interval_s, ttl_s=settings.state_ttl_s,
                   events_maxlen=settings.events_maxlen).start()


def _dispatch(job: dict) -> None:
    """Send a job whose lease expired to the queue again, at the front (priority 0): it already waited its turn
    once, and must not wait behind the whole backlog again."""
    app.send_task(schema.TASK_NAME, args=[job], task_id=job["job_id"], queue=settings.queue, priority=0,
                  serializer="json")


def _serve_metrics() -> None:
    # A prefork pool's child i serves on the next port after child i - 1's; the solo pool's process has no index.
    index = getattr(current_process(), "index", None) or 0
    try:
        metrics.start_metrics_server(metrics.metrics_port(settings.metrics_port, index))
    except (OSError, ValueError) as error:   # jobs still run without metrics; the log says why
        log.error("metrics not served", extra={"error": str(error)})


@signals.task_revoked.connect
def _record_revoked(request=None, expired=False, **kwargs) -> None:
    """A job revoked before it ran never reaches run_job: record its ending here."""
    job_id = getattr(request, "id", None)
    if not schema.is_job_id(job_id):
        return
    if expired:
        error = schema.JobError(schema.TIMEOUT, "the job expired in the queue")
        runtime().store.finish(job_id, schema.FAILED, error=error.to_dict())
    else:
        error = schema.JobError(schema.CANCELED_ERROR, "canceled before it ran")
        runtime().store.finish(job_id, schema.CANCELED, error=error.to_dict())


@signals.task_failure.connect
def _record_hard_timeout(exception=None, args=None, **kwargs) -> None:
    """The hard time limit killed the job's process (prefork pools): the job cannot report it, the parent does."""
    if isinstance(exception, TimeLimitExceeded):
        _fail_at_hard_limit(_job_id(args[0] if args else None))


def _job_id(job) -> str | None:
    return job.get("job_id") if isinstance(job, dict) else None


def _fail_at_hard_limit(job_id: str | None) -> None:
    if schema.is_job_id(job_id):
        error = schema.JobError(schema.TIMEOUT, f"killed at the hard time limit of {settings.time_limit_s}s "
                                                "(INPAINT_TIME_LIMIT_S)")
        runtime().store.finish(job_id, schema.FAILED, error=error.to_dict())


def _end_at_hard_limit(job) -> None:
    """The job outlived the hard limit (the soft one is checked between steps, so the GPU or a call is stuck): record
    it as failed, then end the process; its supervisor or container starts a fresh one, with a fresh CUDA context."""
    job_id = _job_id(job)
    log.critical("job past the hard time limit; ending the worker process",
                 extra={"job_id": job_id, "time_limit_s": settings.time_limit_s})
    try:
        _fail_at_hard_limit(job_id)
    finally:
        logging.shutdown()
        os._exit(HARD_LIMIT_EXIT_STATUS)
