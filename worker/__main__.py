"""`inpaint-worker [--gpus SPEC] [celery worker options]` (also `python -m worker`): a worker with the service's
defaults.

Defaults: the solo pool with one process (one worker per GPU), prefetch 1, task events on, the queue from
INPAINT_QUEUE, the log level from INPAINT_LOG_LEVEL. Options given on the command line come after the defaults
and so override them (e.g. `-P prefork`). With `--gpus all|0,1,...|none` (or INPAINT_GPUS) this process only
supervises: one worker process per GPU (worker.gpus). `--help` shows ours before anything loads; in an install
without the [worker] extra (the client alone) the command says so in one line and exits 2.
"""
import importlib.util
import os
import sys

from worker import gpus
from worker.settings import Settings

HELP_OPTIONS = ("-h", "--help")
# The top-level modules of the [worker] extra (pyproject.toml) that a worker process imports.
WORKER_EXTRA_MODULES = ("torch", "transformers", "safetensors", "huggingface_hub", "numpy", "prometheus_client")
EXIT_MISSING_EXTRA = 2


def worker_argv(settings: Settings, extra: list[str]) -> list[str]:
    # JSON logs: no start-up banner either, the one multi-line text Celery prints outside its logging.
    quiet = ["--quiet"] if settings.log_format == "json" else []
    return [*quiet, "worker", "--pool", "solo", "--concurrency", "1", "--prefetch-multiplier", "1", "--task-events",
            "--queues", settings.queue, "--loglevel", settings.log_level, *extra]


def help_text(settings: Settings) -> str:
    """Our options and the defaults handed to Celery first, then where Celery's own options go."""
    argv = worker_argv(settings, [])
    defaults = " ".join(argv[argv.index("worker") + 1:])
    return f"""usage: inpaint-worker [--gpus all|none|0,1,...] [celery worker options]

Runs an inpaint-fleet worker: takes jobs from the queue, paints them with INPAINT_MODEL and uploads the images.
Every setting is an INPAINT_* environment variable (the README's Settings table).

options:
  --gpus SPEC   one worker process per GPU, each pinned to its device: all, none (one process on the CPU) or a
                list such as 0,1 (default: INPAINT_GPUS: {settings.gpus or "empty, this process is the worker"})
  -h, --help    show this help and exit

defaults handed to `celery worker` (one job at a time per process; late acks and JSON-only messages are set
in the app):
  {defaults}
  (--queues from INPAINT_QUEUE, --loglevel from INPAINT_LOG_LEVEL)

Any other option goes to `celery worker` after these, so it overrides them (e.g. -n NAME@%h, -Q QUEUES,
-P prefork, --without-mingle); `celery worker --help` lists them all.
"""


def missing_worker_extra() -> list[str]:
    """The [worker] extra's modules this install lacks (found without importing them)."""
    return [name for name in WORKER_EXTRA_MODULES if importlib.util.find_spec(name) is None]


def main(argv=None) -> None:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.from_env()
        if any(argument in HELP_OPTIONS for argument in arguments):
            print(help_text(settings), end="")
            sys.exit(0)
        missing = missing_worker_extra()
        if missing:
            print(f"inpaint-worker: this install has the client only; a worker needs the [worker] extra (missing: "
                  f"{', '.join(missing)}): pip install 'inpaint-fleet[worker]'", file=sys.stderr)
            sys.exit(EXIT_MISSING_EXTRA)
        spec, celery_options = gpus.split_gpus_option(arguments, settings.gpus)
        if spec:
            sys.exit(gpus.supervise(spec, celery_options, metrics_port=settings.metrics_port,
                                    log_level=settings.log_level, device=settings.device,
                                    log_format=settings.log_format))
    except ValueError as error:  # a clear line naming the variable or option, not a traceback from inside Celery
        sys.exit(f"inpaint-worker: {error}")
    from worker.app import configure_logs

    # Lines before Celery sets its logging up (its root-user warning, import warnings) in the format too; no
    # download or weight-loading progress bars, which are neither format.
    configure_logs(settings.log_level, settings.log_format)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from worker.tasks import app

    app.worker_main(worker_argv(settings, celery_options))


if __name__ == "__main__":
    main()
