"""The Celery application of the workers: Redis broker, JSON only, late acks, one job at a time per process.

`settings` (read once from the environment) and `app` are module globals; nothing heavy happens at import: the
model is loaded in the worker process (worker.tasks), never in a parent that forks.
"""
import json
import logging

from celery import Celery, signals, states
from celery.backends.base import DisabledBackend

from api_client import schema
from worker.settings import Settings

__all__ = ["app", "settings", "create_app", "JsonFormatter", "NoResultBackend"]

# LogRecord attributes that are not `extra` fields.
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class NoResultBackend(DisabledBackend):
    """Celery keeps no task results here: a job's state and result live in its hash (worker.events). Celery's own
    disabled backend raises on every state query, and a worker handling a revoke (each cancel) asks the state of
    every task it is not running, then logs "No result backend is configured". Here every task is unknown to
    Celery, which Celery calls PENDING, and the revoke is only recorded in the worker's memory."""

    def get_state(self, task_id):
        return states.PENDING

    get_status = get_state


def create_app(settings: Settings) -> Celery:
    app = Celery("inpaint", broker=settings.broker_url, backend=f"{__name__}:NoResultBackend", set_as_current=False)
    app.conf.update(
        # JSON only: a pickle-bodied message is refused before it is decoded.
        task_serializer="json", result_serializer="json", event_serializer="json",
        accept_content=["json"], result_accept_content=["json"],
        # A job is acknowledged only after it ran, and given back when its process dies mid-run; one at a time.
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_track_started=True, worker_send_task_events=True, task_send_sent_event=True,
        # State and results live in the job's hash (worker.events), not in a Celery result backend.
        task_ignore_result=True,
        task_soft_time_limit=settings.soft_time_limit_s, task_time_limit=settings.time_limit_s,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        task_default_queue=settings.queue, task_routes={schema.TASK_NAME: {"queue": settings.queue}},
        imports=["worker.tasks"],
    )
    return app


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_as_json(level) -> None:
    """Our own records (the `inpaint.*` loggers) as JSON lines, beside Celery's own."""
    ours = logging.getLogger("inpaint")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        ours.addHandler(handler)
        ours.propagate = False
    ours.setLevel(level)


@signals.after_setup_logger.connect
def _structured_logs(logger=None, loglevel=None, **kwargs) -> None:
    log_as_json(loglevel or settings.log_level)


settings = Settings.from_env()
app = create_app(settings)
