"""worker.events against a real redis-server: forward-only states, attempts and leases, both streams, throttling."""
import json
import uuid

import pytest
import redis

from api_client import schema, state
from worker.events import ALREADY_FINAL, BUSY, CLAIMED, JobStore, ProgressReporter

TTL_S = 3600


@pytest.fixture(scope="module")
def client(redis_server):
    # Database 2: these tests cap the shared stream, which the worker tests (database 0) read back.
    connection = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/2", decode_responses=True)
    yield connection
    connection.close()


@pytest.fixture
def store(client):
    return JobStore(client, ttl_s=TTL_S, events_maxlen=1000)


def new_job_id() -> str:
    return uuid.uuid4().hex


def events(client, job_id: str) -> list[dict]:
    return [state.parse_event(fields) for _, fields in client.xrange(state.job_events_key(job_id))]


def submit(client, job_id: str, now: float | None = None) -> None:
    """What the client's submit records: the job queued, with its JSON."""
    state.Scripts(client, TTL_S).run_job(state.CREATE_QUEUED, job_id, json.dumps({"job_id": job_id}), now=now)


def test_claim_creates_running_state_and_events_in_both_streams(store, client):
    job_id = new_job_id()
    claim = store.claim(job_id, "w1", lease_s=60, job={"job_id": job_id}, now=1000.0)
    assert (claim.outcome, claim.state, claim.attempt, claim.created_at) == (CLAIMED, schema.RUNNING, 1, 1000.0)
    fields = client.hgetall(state.job_key(job_id))
    assert fields["state"] == "running" and fields["attempt"] == "1" and fields["worker"] == "w1"
    assert float(fields["started_at"]) == 1000.0 and float(fields["lease_until"]) == 1060.0
    assert json.loads(fields["job"]) == {"job_id": job_id}
    [event] = events(client, job_id)
    assert event == {"job_id": job_id, "type": "state", "state": "running", "step": 0, "total_steps": 0,
                     "ts": 1000.0, "data": {"attempt": 1, "worker": "w1"}, "phase": "fetching"}
    shared = [state.parse_event(f) for _, f in client.xrange(state.EVENTS_STREAM) if f["job_id"] == job_id]
    assert shared == [event]
    assert 0 < client.ttl(state.job_key(job_id)) <= TTL_S
    assert 0 < client.ttl(state.job_events_key(job_id)) <= TTL_S


def test_live_lease_of_another_worker_is_not_claimed_again(store):
    job_id = new_job_id()
    store.claim(job_id, "w1", lease_s=60, job={}, now=1000.0)
    assert store.claim(job_id, "w2", lease_s=60, job={}, now=1030.0).outcome == BUSY
    # The lease has passed: the first attempt is presumed dead and the job is taken over.
    takeover = store.claim(job_id, "w2", lease_s=60, job={}, now=1061.0)
    assert (takeover.outcome, takeover.attempt) == (CLAIMED, 2)


def test_same_worker_takes_over_its_own_ended_attempt(store):
    job_id = new_job_id()
    store.claim(job_id, "w1", lease_s=60, job={}, now=1000.0)
    assert store.claim(job_id, "w1", lease_s=60, job={}, now=1001.0).attempt == 2


def test_a_job_that_keeps_killing_its_worker_fails_after_max_attempts(store, client):
    job_id = new_job_id()
    for attempt in (1, 2):
        assert store.claim(job_id, "w1", lease_s=60, job={}, max_attempts=2).attempt == attempt
    gave_up = store.claim(job_id, "w1", lease_s=60, job={}, max_attempts=2)
    assert (gave_up.outcome, gave_up.state) == (ALREADY_FINAL, schema.FAILED)
    status = store.status(job_id)
    assert status.state == schema.FAILED and status.error["code"] == schema.INTERNAL
    assert "2 times" in status.error["message"]
    assert events(client, job_id)[-1]["data"] == {"error": status.error}


def test_final_state_is_written_once_and_never_claimed_again(store, client):
    job_id = new_job_id()
    attempt = store.claim(job_id, "w1", lease_s=60, job={}).attempt
    assert store.finish(job_id, schema.SUCCEEDED, attempt, result={"images": [], "seed": 2**63 - 1})
    assert not store.finish(job_id, schema.FAILED, attempt, error={"code": "internal", "message": "late"})
    assert store.claim(job_id, "w2", lease_s=60, job={}).outcome == ALREADY_FINAL
    status = store.status(job_id)
    assert status.state == schema.SUCCEEDED and status.error is None
    assert status.result["seed"] == 2**63 - 1   # 64-bit integers survive (no JSON decoding in Lua)
    assert events(client, job_id)[-1]["data"]["result"]["seed"] == 2**63 - 1
    assert [e["state"] for e in events(client, job_id)] == ["running", "succeeded"]


def test_stale_attempt_cannot_write(store):
    job_id = new_job_id()
    store.claim(job_id, "w1", lease_s=1, job={}, now=1000.0)
    assert store.claim(job_id, "w2", lease_s=60, job={}, now=1002.0).attempt == 2
    assert not store.progress(job_id, 1, 1, 4)
    assert not store.finish(job_id, schema.SUCCEEDED, 1, result={"images": []})
    assert store.progress(job_id, 2, 1, 4)
    assert store.status(job_id).step == 1 and store.status(job_id).worker == "w2"


def test_claim_of_a_submitted_job_reports_its_submission_time(store, client):
    job_id = new_job_id()
    submit(client, job_id, now=50.0)
    claim = store.claim(job_id, "w1", lease_s=60, job=None, now=60.0)
    assert (claim.outcome, claim.created_at) == (CLAIMED, 50.0)
    assert json.loads(client.hget(state.job_key(job_id), "job")) == {"job_id": job_id}   # kept, not replaced


def test_queued_job_can_be_canceled_without_an_attempt(store, client):
    job_id = new_job_id()
    submit(client, job_id)
    assert store.finish(job_id, schema.CANCELED, error={"code": "canceled", "message": "by request"})
    assert store.status(job_id).state == schema.CANCELED
    assert not store.finish(new_job_id(), schema.CANCELED)   # no hash: nothing to end


def test_finish_refuses_a_non_final_state(store):
    with pytest.raises(ValueError, match="state"):
        store.finish(new_job_id(), schema.RUNNING)


def test_release_lets_another_worker_retry(store, client):
    job_id = new_job_id()
    store.claim(job_id, "w1", lease_s=600, job={}, now=1000.0)
    assert store.release(job_id, 1, {"code": "storage_unavailable", "message": "down"})
    retry = store.claim(job_id, "w2", lease_s=600, job={}, now=1001.0)
    assert (retry.outcome, retry.attempt) == (CLAIMED, 2)
    kinds = [(e["type"], e["state"]) for e in events(client, job_id)]
    assert kinds == [("state", "running"), ("retry", "running"), ("state", "running")]
    assert events(client, job_id)[1]["data"] == {"attempt": 1, "error": {"code": "storage_unavailable",
                                                                         "message": "down"}}


def test_shared_stream_is_capped(client):
    store = JobStore(client, ttl_s=TTL_S, events_maxlen=10)
    for _ in range(300):
        job_id = new_job_id()
        store.claim(job_id, "w", lease_s=60, job={})
    # MAXLEN ~ trims whole stream nodes (100 entries by default), never below the cap.
    assert 10 <= client.xlen(state.EVENTS_STREAM) <= 210


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_is_throttled_but_the_last_step_always_written(store, client):
    job_id = new_job_id()
    attempt = store.claim(job_id, "w1", lease_s=60, job={}).attempt
    clock = FakeClock()
    reporter = ProgressReporter(store, job_id, attempt, interval_s=1.0, clock=clock)
    for step in range(1, 11):
        clock.now = step * 0.3
        assert reporter(step, 10) is True
    steps = [e["step"] for e in events(client, job_id) if e["type"] == "progress"]
    assert steps == [1, 5, 9, 10]   # t = 0.3, 1.5, 2.7, then the last step
    assert store.status(job_id).step == 10 and store.status(job_id).total_steps == 10


def test_phases_are_in_the_hash_and_every_event_and_cleared_at_the_end(store, client):
    job_id = new_job_id()
    attempt = store.claim(job_id, "w1", lease_s=60, job={}).attempt
    assert store.status(job_id).phase == state.FETCHING   # a claim starts by fetching the inputs
    reporter = ProgressReporter(store, job_id, attempt, interval_s=0)
    reporter.phase(state.ENCODING)
    reporter.phase(state.DENOISING)
    reporter(1, 2)
    reporter(2, 2)
    reporter.phase(state.DECODING)
    reporter.phase(state.UPLOADING)
    status = store.status(job_id)
    assert (status.phase, status.step, status.total_steps) == (state.UPLOADING, 2, 2)
    store.finish(job_id, schema.SUCCEEDED, attempt, result={"images": []})
    assert [(e["phase"], e["step"], e["total_steps"]) for e in events(client, job_id)] == [
        ("fetching", 0, 0), ("encoding", 0, 0), ("denoising", 0, 0), ("denoising", 1, 2), ("denoising", 2, 2),
        ("decoding", 2, 2), ("uploading", 2, 2), ("", 2, 2)]
    assert store.status(job_id).phase == ""
    assert not store.progress(job_id, attempt, 2, 2, state.UPLOADING)   # a final job takes no more phases


def test_reporter_stops_on_cancel_flag_and_on_deadline(store, client):
    job_id = new_job_id()
    attempt = store.claim(job_id, "w1", lease_s=60, job={}).attempt
    clock = FakeClock()
    reporter = ProgressReporter(store, job_id, attempt, interval_s=0, deadline=5.0, clock=clock)
    assert reporter(1, 10) is True
    client.set(state.cancel_key(job_id), "1")
    assert reporter(2, 10) is False
    client.delete(state.cancel_key(job_id))
    clock.now = 6.0
    assert reporter(3, 10) is False
