"""The workers' Celery application (worker/app.py): what it asks of Celery's result backend, and its logs."""
import json
import logging
import os
import re
import subprocess
import sys
import uuid
from types import SimpleNamespace

import pytest
from celery.worker import control, state as worker_state

from worker.app import app


def test_a_revoke_asks_no_result_backend(caplog):
    """A worker handling a revoke (each cancel) asks the result backend for the state of every task it is not
    running; Celery's disabled backend raised there, logging "No result backend is configured" on every cancel."""
    job_id = uuid.uuid4().hex
    with caplog.at_level(logging.WARNING):
        control._revoke(SimpleNamespace(app=app, consumer=None), {job_id})
    assert job_id in worker_state.revoked
    assert not caplog.records, [record.getMessage() for record in caplog.records]


# What a worker process logs once Celery has set up its logging (as `celery worker` does): Celery's own lines, a
# task's, ours with extra fields, a print redirected by Celery, an exception.
LOGGING_SCRIPT = """
import logging
from celery.utils.log import get_task_logger
from worker.app import app
app.log.setup(loglevel="INFO", redirect_stdouts=True)
logging.getLogger("celery.worker.consumer.connection").info("Connected to %s", "redis://127.0.0.1:1/0")
get_task_logger("inpaint.run").info("a task's line")
logging.getLogger("inpaint.tasks").info("model ready", extra={"load_s": 1.5, "model": "tiny"})
print("a print inside a task")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("inpaint.jobs").exception("job failed unexpectedly", extra={"job_id": "j"})
"""


def logged_lines(log_format: str) -> list[str]:
    env = {**os.environ, "INPAINT_LOG_FORMAT": log_format}
    done = subprocess.run([sys.executable, "-c", LOGGING_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def test_json_logs_are_one_object_per_line_celerys_included():
    entries = [json.loads(line) for line in logged_lines("json")]   # fails on any line that is not JSON
    assert [(e["logger"], e["message"]) for e in entries] == [
        ("celery.worker.consumer.connection", "Connected to redis://127.0.0.1:1/0"),
        ("inpaint.run", "a task's line"), ("inpaint.tasks", "model ready"),
        ("celery.redirected", "a print inside a task"), ("inpaint.jobs", "job failed unexpectedly")]
    assert (entries[2]["load_s"], entries[2]["model"]) == (1.5, "tiny")
    assert "ZeroDivisionError" in entries[4]["exception"]


def test_text_logs_are_one_line_per_record_in_one_shape():
    lines = logged_lines("text")
    shape = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) [\w.]+: ")
    records = [line for line in lines if shape.match(line)]
    assert [line.split(" ", 3)[3] for line in records] == [
        "celery.worker.consumer.connection: Connected to redis://127.0.0.1:1/0", "inpaint.run: a task's line",
        'inpaint.tasks: model ready load_s=1.5 model="tiny"', "celery.redirected: a print inside a task",
        'inpaint.jobs: job failed unexpectedly job_id="j"']
    traceback = lines[lines.index(records[-1]) + 1:]
    assert traceback[0] == "Traceback (most recent call last):" and "ZeroDivisionError" in traceback[-1]


@pytest.mark.parametrize("value", ["xml", ""])
def test_the_log_format_setting(value):
    from worker.settings import Settings

    if value:
        with pytest.raises(ValueError, match="INPAINT_LOG_FORMAT='xml': expected one of json, text"):
            Settings.from_env({"INPAINT_LOG_FORMAT": value})
    else:
        assert Settings.from_env({}).log_format == "json"
