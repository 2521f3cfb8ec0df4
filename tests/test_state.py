"""api_client.state against a real redis-server: the key names, the exact event entries and hashes the scripts
write (DESIGN §4, byte for byte), the script registry, and that a new event field is one edit for every writer."""
import json
import uuid

import pytest
import redis

from api_client import state
from api_client.client import InpaintClient
from tests import devstack
from worker import lease
from worker.events import JobStore

TTL_S = 3600


@pytest.fixture(scope="module")
def redis_url():
    server = devstack.start_redis()
    yield server.url
    server.stop()


@pytest.fixture
def store(redis_url):
    connection = redis.Redis.from_url(redis_url, decode_responses=True)
    yield connection
    connection.flushdb()
    connection.close()


def entries(store, stream: str) -> list[dict]:
    return [fields for _, fields in store.xrange(stream)]


def test_redis_names():
    job_id = uuid.uuid4().hex
    assert state.job_key(job_id) == f"inpaint:job:{job_id}"
    assert state.job_events_key(job_id) == f"inpaint:events:{job_id}"
    assert state.cancel_key(job_id) == f"inpaint:cancel:{job_id}"
    assert (state.EVENTS_STREAM, state.LEASES_KEY) == ("inpaint:events", "inpaint:leases")
    assert (state.STATE_TTL_SECONDS, state.EVENTS_STREAM_MAXLEN) == (7 * 24 * 3600, 100_000)


def test_submit_and_cancel_write_the_documented_hash_and_entries(store):
    job_id, scripts = uuid.uuid4().hex, state.Scripts(store, TTL_S, 1000)
    assert scripts.run_job(state.CREATE_QUEUED, job_id, '{"job_id": "x"}', now=5.25) == 1
    assert scripts.run_job(state.CREATE_QUEUED, job_id, "{}", now=6.0) == 0   # a duplicate submit changes nothing
    assert store.hgetall(state.job_key(job_id)) == {
        "job_id": job_id, "state": "queued", "step": "0", "total_steps": "0", "attempt": "0", "created_at": "5.25",
        "job": '{"job_id": "x"}'}
    error = '{"code": "canceled", "message": "m"}'
    assert scripts.run_job(state.CANCEL, job_id, error, extra_keys=[state.cancel_key(job_id)], now=7.5) == "queued"
    assert store.get(state.cancel_key(job_id)) == "1" and 0 < store.ttl(state.cancel_key(job_id)) <= TTL_S
    assert store.hget(state.job_key(job_id), "error") == error
    queued = {"job_id": job_id, "type": "state", "state": "queued", "step": "0", "total_steps": "0", "ts": "5.25",
              "data": "{}", "phase": ""}
    canceled = {**queued, "state": "canceled", "ts": "7.5", "data": '{"error": ' + error + "}"}
    assert entries(store, state.job_events_key(job_id)) == entries(store, state.EVENTS_STREAM) == [queued, canceled]
    assert [list(entry) for entry in entries(store, state.EVENTS_STREAM)] == [[f.name for f in state.EVENT_FIELDS]] * 2
    assert 0 < store.ttl(state.job_key(job_id)) <= TTL_S and 0 < store.ttl(state.job_events_key(job_id)) <= TTL_S


def test_parse_event_reads_text_or_bytes_and_fills_missing_fields():
    fields = {b"job_id": b"j", b"type": b"progress", b"state": b"running", b"step": b"3", b"total_steps": b"20",
              b"ts": b"5.25", b"data": b'{"x": 1}', b"phase": b"denoising"}
    assert state.parse_event(fields) == {"job_id": "j", "type": "progress", "state": "running", "step": 3,
                                         "total_steps": 20, "ts": 5.25, "data": {"x": 1}, "phase": "denoising"}
    assert state.parse_event({"type": "state"}) == {"job_id": "", "type": "state", "state": "", "step": 0,
                                                    "total_steps": 0, "ts": 0.0, "data": {}, "phase": ""}


def test_only_the_prelude_writes_event_entries():
    assert {"create_queued", "cancel", "claim", "progress", "finish", "release", "renew_lease",
            "expire_lease"} <= set(state.SCRIPTS)
    for script in state.SCRIPTS.values():
        assert "XADD" not in script.lua.upper(), script.name
    assert state.job_prelude().count("XADD") == 2   # one entry, in the job's stream and in the shared one


def test_registry_refuses_a_second_script_of_one_name_and_a_wrong_runner(store):
    with pytest.raises(ValueError, match="script 'claim' is already defined"):
        state.define_script("claim", "return 1")
    scripts = state.Scripts(store)
    with pytest.raises(ValueError, match="not a job script: call run"):
        scripts.run_job(state.RENEW_LEASE, "j")
    with pytest.raises(ValueError, match="is a job script: call run_job"):
        scripts.run(state.CLAIM, [], [])


def test_a_new_event_field_is_one_edit(monkeypatch, redis_url, store):
    """One added EventField shows up in the entries of the client's submit, the worker's writes and the lease
    expiry, in both streams, and in parse_event."""
    attempt = state.EventField("attempt", "field('attempt', '0')", int)
    monkeypatch.setattr(state, "EVENT_FIELDS", (*state.EVENT_FIELDS, attempt))

    with InpaintClient(broker_url=redis_url, bucket="state-tests", queue="state-tests") as client:
        job_id = client.submit("s3://state-tests/in/image.png", "s3://state-tests/in/mask.png", "a door")
    worker_store = JobStore(store, ttl_s=TTL_S)
    claim = worker_store.claim(job_id, "w1", lease_s=10, job=None, now=1000.0)
    assert worker_store.progress(job_id, claim.attempt, 1, 4)
    assert lease.renew(store, job_id, claim.attempt, lease_s=10, now=1000.0)
    assert lease.redispatch_expired(store, lambda job: None, ttl_s=TTL_S, now=1011.0) == [job_id]

    for stream in (state.job_events_key(job_id), state.EVENTS_STREAM):
        events = [state.parse_event(fields) for fields in entries(store, stream)]
        assert [(e["type"], e["state"], e["attempt"]) for e in events] == [
            ("state", "queued", 0), ("state", "running", 1), ("progress", "running", 1), ("retry", "running", 1)]
    assert json.loads(entries(store, state.EVENTS_STREAM)[-1]["data"])["reason"] == "lease_expired"
