"""worker.tasks._start_process (worker_process_init): whatever fails while loading or warming the model is logged
with a code and never escapes to Celery; only a working model makes the process ready."""
import logging
import types

import pytest

from api_client import schema
from worker import metrics, tasks


class WarmupFails:
    def warmup(self, **shape):
        raise RuntimeError("CUDA graph capture failed")


@pytest.fixture
def started(monkeypatch):
    """Runs _start_process with the given pipeline getter, no metrics server and no watchdog; the ready flags set."""
    ready = []
    monkeypatch.setattr(tasks, "_serve_metrics", lambda: None)
    monkeypatch.setattr(tasks, "_start_watchdog", lambda: None)
    monkeypatch.setattr(metrics, "set_ready", ready.append)

    def start(pipeline, warmup=""):
        monkeypatch.setattr(tasks, "runtime", lambda: types.SimpleNamespace(pipeline=pipeline))
        monkeypatch.setattr(tasks, "settings", tasks.settings.__class__(warmup=warmup))
        tasks._start_process()
        return ready
    return start


def raise_value_error():
    raise ValueError("unet/config.json: bad sample_size")


def test_an_unexpected_load_failure_is_logged_and_leaves_the_process_not_ready(started, caplog):
    with caplog.at_level(logging.ERROR, logger="inpaint.tasks"):
        assert started(raise_value_error) == []
    [record] = [r for r in caplog.records if r.getMessage() == "model not loaded"]
    assert record.code == schema.MODEL_UNAVAILABLE and "bad sample_size" in record.error


def test_a_failed_warmup_is_logged_and_the_process_still_turns_ready(started, caplog):
    with caplog.at_level(logging.ERROR, logger="inpaint.tasks"):
        assert started(WarmupFails, warmup="64x64:2:ddim") == [True]
    [record] = [r for r in caplog.records if r.getMessage() == "warm-up failed"]
    assert record.code == schema.INTERNAL and "capture failed" in record.error and record.width == 64
