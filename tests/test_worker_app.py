"""The workers' Celery application (worker/app.py): what it asks of Celery's result backend, and its logs."""
import logging
import uuid
from types import SimpleNamespace

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
