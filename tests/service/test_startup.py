"""worker.tasks._start_process (worker_process_init): a model that will not load is tried again with backoff, then
the process exits without consuming; a failed warm-up is logged and the process still turns ready."""
import logging
import types
import uuid

import pytest

from api_client import schema
from api_client.client import InpaintClient
from tests.service.conftest import BUCKET, WORKER_ENV, sample_image, sample_mask
from tests import devstack
from worker import metrics, tasks


def fake_pipeline(warmup=lambda **shape: None, captures: int = 0) -> types.SimpleNamespace:
    """What _start_process uses of a pipeline: warmup(), its device and its runner's capture count."""
    return types.SimpleNamespace(warmup=warmup, device="cpu", runner=types.SimpleNamespace(captures=captures))


def failing_warmup(**shape):
    raise RuntimeError("CUDA graph capture failed")


@pytest.fixture
def started(monkeypatch):
    """Runs _start_process with the given pipeline getter, no metrics server, no watchdog and no sleeping; returns
    the ready flags set. The backoff delays asked for are in `started.sleeps`, the capture counts the metrics read
    in `started.captures`."""
    ready, sleeps, captures = [], [], []
    monkeypatch.setattr(tasks, "_serve_metrics", lambda: None)
    monkeypatch.setattr(tasks, "_start_watchdog", lambda: None)
    monkeypatch.setattr(tasks.time, "sleep", sleeps.append)
    monkeypatch.setattr(metrics, "set_ready", ready.append)
    monkeypatch.setattr(metrics, "observe_graph_captures", captures.append)

    def start(pipeline, warmup="", max_retries=2):
        monkeypatch.setattr(tasks, "runtime", lambda: types.SimpleNamespace(pipeline=pipeline))
        monkeypatch.setattr(tasks, "settings", tasks.settings.__class__(warmup=warmup, max_retries=max_retries,
                                                                        retry_backoff_s=1.5))
        tasks._start_process()
        return ready
    start.sleeps, start.captures = sleeps, captures
    return start


def failing_load(failures: int):
    """A pipeline getter failing `failures` times as PipelineHolder does, then returning a pipeline."""
    calls = []

    def load():
        calls.append(1)
        if len(calls) <= failures:
            raise schema.JobError(schema.MODEL_UNAVAILABLE, "ValueError: unet/config.json: bad sample_size")
        return fake_pipeline()
    load.calls = calls
    return load


def test_a_model_that_never_loads_ends_the_process_before_it_consumes(started, caplog):
    load = failing_load(failures=10)
    with caplog.at_level(logging.ERROR, logger="inpaint.tasks"), pytest.raises(SystemExit) as exited:
        started(load, max_retries=2)
    assert exited.value.code == tasks.MODEL_UNAVAILABLE_EXIT_STATUS
    assert len(load.calls) == 3 and started.sleeps == [1.5, 3.0]   # 1 + INPAINT_MAX_RETRIES tries, backing off
    records = [r for r in caplog.records if r.getMessage() == "model not loaded"]
    assert [getattr(r, "try") for r in records] == [1, 2, 3]
    assert all(r.code == schema.MODEL_UNAVAILABLE and "bad sample_size" in r.error for r in records)


def test_a_load_that_fails_once_is_tried_again_and_the_process_turns_ready(started):
    load = failing_load(failures=1)
    assert started(load, max_retries=2) == [True]
    assert len(load.calls) == 2 and started.sleeps == [1.5]


def test_without_retries_a_failed_load_exits_at_once(started):
    with pytest.raises(SystemExit):
        started(failing_load(failures=1), max_retries=0)
    assert started.sleeps == []


def test_a_failed_warmup_is_logged_and_the_process_still_turns_ready(started, caplog):
    with caplog.at_level(logging.ERROR, logger="inpaint.tasks"):
        assert started(lambda: fake_pipeline(failing_warmup), warmup="64x64:2:ddim") == [True]
    [record] = [r for r in caplog.records if r.getMessage() == "warm-up failed"]
    assert record.code == schema.INTERNAL and "capture failed" in record.error and record.width == 64


def test_the_graphs_the_runner_captured_at_warm_up_reach_the_metrics(started):
    assert started(lambda: fake_pipeline(captures=2), warmup="64x64:2:ddim") == [True]
    assert started.captures == [2]


def test_a_worker_whose_model_will_not_load_exits_and_leaves_the_job_to_a_good_one(redis_server, s3_server,
                                                                                    tiny_model_dir, tmp_path):
    queue = f"startup-{uuid.uuid4().hex[:8]}"  # a queue of its own: the shared test workers must not take the job
    (tmp_path / "empty-model").mkdir()
    env = devstack.worker_env(redis_server.url, s3_server.endpoint_url, BUCKET, tmp_path / "empty-model",
                              **{**WORKER_ENV, "INPAINT_QUEUE": queue, "INPAINT_MAX_RETRIES": "1",
                                 "INPAINT_RETRY_BACKOFF_S": "0.1"})
    client = InpaintClient(broker_url=redis_server.url, s3_endpoint_url=s3_server.endpoint_url, bucket=BUCKET,
                           queue=queue)
    try:
        job_id = client.submit(sample_image(), sample_mask(), "a red square", num_inference_steps=2,
                               scheduler="ddim", seed=1)
        broken = devstack.start_worker(env, log_path=tmp_path / "broken.log")
        assert broken.wait(90) == tasks.MODEL_UNAVAILABLE_EXIT_STATUS, broken.log_text()[-3000:]
        assert broken.log_text().count('"model not loaded"') == 2
        assert client.status(job_id).state == schema.QUEUED

        good = devstack.start_worker({**env, "INPAINT_MODEL": str(tiny_model_dir)}, log_path=tmp_path / "good.log")
        try:
            finished = client.wait(job_id, timeout=120)
        finally:
            good.terminate()
            good.stop()
        assert finished.state == schema.SUCCEEDED and finished.attempt == 1, good.log_text()[-3000:]
    finally:
        client.close()
