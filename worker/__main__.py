"""`inpaint-worker [--gpus SPEC] [celery worker options]` (also `python -m worker`): a worker with the service's
defaults.

Defaults: the solo pool with one process (one worker per GPU), prefetch 1, task events on, the queue from
INPAINT_QUEUE, the log level from INPAINT_LOG_LEVEL. Options given on the command line come after the defaults
and so override them (e.g. `-P prefork`). With `--gpus all|0,1,...|none` (or INPAINT_GPUS) this process only
supervises: one worker process per GPU (worker.gpus).
"""
import sys

from worker import gpus
from worker.settings import Settings


def worker_argv(settings: Settings, extra: list[str]) -> list[str]:
    return ["worker", "--pool", "solo", "--concurrency", "1", "--prefetch-multiplier", "1", "--task-events",
            "--queues", settings.queue, "--loglevel", settings.log_level, *extra]


def main(argv=None) -> None:
    try:
        settings = Settings.from_env()
        spec, celery_options = gpus.split_gpus_option(list(sys.argv[1:] if argv is None else argv), settings.gpus)
        if spec:
            sys.exit(gpus.supervise(spec, celery_options, metrics_port=settings.metrics_port,
                                    log_level=settings.log_level, device=settings.device))
    except ValueError as error:  # a clear line naming the variable or option, not a traceback from inside Celery
        sys.exit(f"inpaint-worker: {error}")
    from worker.tasks import app

    app.worker_main(worker_argv(settings, celery_options))


if __name__ == "__main__":
    main()
