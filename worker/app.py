"""The Celery application of the workers: Redis broker, JSON only, late acks, one job at a time per process.

`settings` (read once from the environment) and `app` are module globals; nothing heavy happens at import: the
model is loaded in the worker process (worker.tasks), never in a parent that forks.
"""
import json
import logging
import sys

from celery import Celery, signals, states
from celery.backends.base import DisabledBackend
from celery.utils.log import get_multiprocessing_logger

from api_client import schema
from worker.settings import Settings

__all__ = ["app", "settings", "create_app", "JsonFormatter", "TextFormatter", "configure_logs", "NoResultBackend"]

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


def _extra_fields(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage(), **_extra_fields(record)}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """One line per record for people: time, level, logger, message, then the `extra` fields as key=value (values
    as JSON); a traceback follows on its own lines."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in _extra_fields(record).items())
        return super().formatMessage(record) + (f" {extras}" if extras else "")


FORMATTERS = {"json": JsonFormatter, "text": TextFormatter}


def configure_logs(level, log_format: str) -> None:
    """Every line this process logs in one format (INPAINT_LOG_FORMAT): ours (`inpaint.*`, which propagate to the
    root logger) and Celery's, which a worker process gets through the signals below. The supervisor of `--gpus`,
    where Celery configures nothing, calls this itself."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    _format_handlers(root, log_format)
    _format_handlers(get_multiprocessing_logger(), log_format)
    logging.captureWarnings(True)   # Python warnings (Celery's SecurityWarning, ...) as records, not raw text
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:   # loaded with the model code: its records through our handlers too
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
    logging.getLogger("inpaint").setLevel(level)


def _format_handlers(logger: logging.Logger | None, log_format: str) -> None:
    for handler in logger.handlers if logger is not None else []:
        handler.setFormatter(FORMATTERS[log_format]())


@signals.after_setup_logger.connect
def _one_log_format(logger=None, loglevel=None, **kwargs) -> None:
    configure_logs(loglevel or settings.log_level, settings.log_format)


@signals.after_setup_task_logger.connect
def _one_task_log_format(logger=None, **kwargs) -> None:
    _format_handlers(logger, settings.log_format)


settings = Settings.from_env()
app = create_app(settings)
