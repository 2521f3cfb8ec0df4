"""worker.lease against a real redis-server: heartbeats renew only the owning attempt, the watchdog re-dispatches
an expired lease exactly once, and the attempt count bounds the redeliveries."""
import time
import uuid

import pytest
import redis

from api_client import schema, state
from tests import devstack
from worker import lease
from worker.events import BUSY, CLAIMED, JobStore

LEASE_S = 10.0


@pytest.fixture(scope="module")
def client():
    with devstack.start_redis() as server:
        connection = redis.Redis.from_url(server.url, decode_responses=True)
        yield connection
        connection.close()


@pytest.fixture
def store(client):
    return JobStore(client, ttl_s=3600, events_maxlen=1000)


def claimed_job(store, worker="w1", now=1000.0) -> str:
    job_id = uuid.uuid4().hex
    claim = store.claim(job_id, worker, LEASE_S, job={"job_id": job_id, "prompt": "p"}, max_attempts=3, now=now)
    assert claim.outcome == CLAIMED
    return job_id


def lease_events(client, job_id):
    return [e for e in (state.parse_event(f) for _, f in client.xrange(state.job_events_key(job_id)))
            if e["type"] == "retry"]


def test_renew_moves_the_lease_of_the_owning_attempt_only(store, client):
    job_id = claimed_job(store)
    assert lease.renew(client, job_id, attempt=1, lease_s=LEASE_S, now=1005.0)
    assert float(client.hget(state.job_key(job_id), "lease_until")) == 1015.0
    assert client.zscore(state.LEASES_KEY, job_id) == 1015.0
    assert not lease.renew(client, job_id, attempt=2, lease_s=LEASE_S, now=1006.0)   # not its attempt
    assert float(client.hget(state.job_key(job_id), "lease_until")) == 1015.0


def test_renew_of_a_final_job_drops_it_from_the_leases(store, client):
    job_id = claimed_job(store)
    lease.renew(client, job_id, 1, LEASE_S, now=1001.0)
    store.finish(job_id, schema.SUCCEEDED, attempt=1, result={"images": []})
    assert not lease.renew(client, job_id, 1, LEASE_S, now=1002.0)
    assert client.zscore(state.LEASES_KEY, job_id) is None


def test_expired_lease_is_dispatched_once(store, client):
    job_id = claimed_job(store)
    lease.renew(client, job_id, 1, LEASE_S, now=1000.0)
    sent = []
    assert job_id not in lease.redispatch_expired(client, sent.append, now=1009.0)   # still live
    assert job_id in lease.redispatch_expired(client, sent.append, now=1011.0)
    assert sent[-1] == {"job_id": job_id, "prompt": "p"}
    # Another watchdog, or a later look while the copy waits behind a backlog, does not send it again.
    assert job_id not in lease.redispatch_expired(client, sent.append, now=1012.0)
    assert job_id not in lease.redispatch_expired(client, sent.append, now=5000.0)
    [event] = lease_events(client, job_id)
    assert event["data"] == {"attempt": 1, "reason": "lease_expired", "worker": "w1"}
    assert event["state"] == schema.RUNNING and event["ts"] == 1011.0


def test_finished_or_renewed_jobs_are_not_dispatched(store, client):
    finished, renewed = claimed_job(store), claimed_job(store)
    for job_id in (finished, renewed):
        lease.renew(client, job_id, 1, LEASE_S, now=1000.0)
    store.finish(finished, schema.FAILED, attempt=1, error={"code": "internal", "message": "x"})
    client.hset(state.job_key(renewed), "lease_until", "2000.0")   # renewed after the set was last looked at
    sent = []
    lease.redispatch_expired(client, sent.append, now=1500.0)
    assert [job["job_id"] for job in sent if job["job_id"] in (finished, renewed)] == []
    assert client.zscore(state.LEASES_KEY, finished) is None
    assert client.zscore(state.LEASES_KEY, renewed) == 2000.0


def test_a_dead_attempt_is_taken_over_and_can_no_longer_write(store, client):
    job_id = claimed_job(store, worker="w1", now=1000.0)
    lease.renew(client, job_id, 1, LEASE_S, now=1000.0)
    assert store.claim(job_id, "w2", LEASE_S, job=None, now=1005.0).outcome == BUSY   # w1 is alive
    lease.redispatch_expired(client, lambda job: None, now=1011.0)
    takeover = store.claim(job_id, "w2", LEASE_S, job=None, max_attempts=3, now=1011.5)
    assert (takeover.outcome, takeover.attempt) == (CLAIMED, 2)
    # The first attempt, if it was only slow, has lost the job: its heartbeat, progress and result are refused.
    assert not lease.renew(client, job_id, 1, LEASE_S, now=1012.0)
    assert not store.progress(job_id, 1, 1, 2)
    assert not store.finish(job_id, schema.SUCCEEDED, attempt=1, result={"images": []})
    assert store.finish(job_id, schema.SUCCEEDED, attempt=2, result={"images": []})
    states = [e["state"] for e in (state.parse_event(f) for _, f in client.xrange(state.job_events_key(job_id)))]
    assert states == ["running", "running", "running", "succeeded"]   # claim, lease expiry, claim, end


def test_a_job_that_keeps_killing_workers_fails_after_max_attempts(store, client):
    job_id = claimed_job(store, now=1000.0)
    now = 1000.0
    for attempt in (2, 3):
        now += LEASE_S + 1
        lease.redispatch_expired(client, lambda job: None, now=now)
        assert store.claim(job_id, f"w{attempt}", LEASE_S, job=None, max_attempts=3, now=now).attempt == attempt
    now += LEASE_S + 1
    gave_up = store.claim(job_id, "w4", LEASE_S, job=None, max_attempts=3, now=now)
    status = store.status(job_id)
    assert gave_up.state == status.state == schema.FAILED and status.attempt == 3
    assert status.error["code"] == schema.INTERNAL and "3 times" in status.error["message"]
    assert not lease.redispatch_expired(client, lambda job: None, now=now + 100)


def test_heartbeat_keeps_renewing_and_notices_a_takeover(store, client):
    job_id = claimed_job(store, now=time.time())
    with lease.Heartbeat(client, job_id, attempt=1, lease_s=2.0, interval_s=0.05) as heartbeat:
        first = float(client.hget(state.job_key(job_id), "lease_until"))
        time.sleep(0.3)
        assert float(client.hget(state.job_key(job_id), "lease_until")) > first
        client.hset(state.job_key(job_id), "attempt", "2")   # another attempt took the job over
        time.sleep(0.3)
        assert heartbeat.lost
    assert client.hget(state.job_key(job_id), "attempt") == "2"


def test_watchdog_thread_survives_a_failing_dispatch_and_sends_again(store, client):
    client.delete(state.LEASES_KEY)   # only this job is watched (this test's own redis-server)
    job_id = claimed_job(store, now=time.time() - 100)
    lease.renew(client, job_id, 1, 1.0, now=time.time() - 50)
    calls = []

    def dispatch(job):
        calls.append(job["job_id"])
        if len(calls) == 1:
            raise ConnectionError("broker away")

    watchdog = lease.Watchdog(client, dispatch, interval_s=0.05).start()
    try:
        deadline = time.monotonic() + 5
        while calls.count(job_id) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        watchdog.stop()
    assert calls.count(job_id) == 2   # the failed send was repeated, the successful one was not
    assert client.zscore(state.LEASES_KEY, job_id) is None


def test_a_job_given_back_for_a_retry_is_left_to_its_retry(store, client):
    job_id = claimed_job(store, now=1000.0)
    lease.renew(client, job_id, 1, LEASE_S, now=1000.0)
    store.release(job_id, 1, {"code": schema.STORAGE_UNAVAILABLE, "message": "s3 away"})
    # A heartbeat that fires after the release does not take the lease back.
    assert not lease.renew(client, job_id, 1, LEASE_S, now=1001.0)
    lease.forget(client, job_id)
    assert job_id not in lease.redispatch_expired(client, lambda job: None, now=2000.0)
    # Any worker may claim the retry: the released job has no live lease.
    claim = store.claim(job_id, "w2", LEASE_S, job=None, now=1002.0)
    assert (claim.outcome, claim.attempt) == (CLAIMED, 2)
