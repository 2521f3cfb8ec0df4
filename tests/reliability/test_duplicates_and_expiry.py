"""Promises 5 and 6: duplicate deliveries and submissions are harmless (the job id is the idempotency key, outputs
are first-writer-wins, states only move forward); an expired job reads as `expired`; a full Redis (noeviction)
refuses a submission loudly."""
import time

import pytest
import redis

from api_client import schema, state
from api_client.client import InpaintClient
from tests.reliability.conftest import BUCKET
from tests import devstack


def test_many_deliveries_of_one_job_run_it_once(healthy_fleet):
    fleet = healthy_fleet
    job = fleet.raw_job(num_inference_steps=4, num_images=2)
    for _ in range(5):
        fleet.send_raw(job)
    status = fleet.wait_final(job["job_id"])
    assert status.state == schema.SUCCEEDED and status.attempt == 1
    stored = {key: fleet.s3.head_object(Bucket=BUCKET, Key=key)["ETag"] for key in fleet.output_keys(job["job_id"])}
    assert sorted(stored) == [f"jobs/{job['job_id']}/{i}.png" for i in range(2)]

    # A late duplicate of the finished job (the broker's redelivery after a visibility timeout) is dropped.
    fleet.send_raw(job)
    fleet.wait_for(job["job_id"], lambda _: fleet.redis.llen("inpaint") == 0 and not _queue_busy(fleet), 30)
    time.sleep(1)
    assert {key: fleet.s3.head_object(Bucket=BUCKET, Key=key)["ETag"] for key in stored} == stored
    events = fleet.events(job["job_id"])
    assert [e["state"] for e in events if e["type"] == "state"] == ["running", "succeeded"]
    assert fleet.status(job["job_id"]) == status


def _queue_busy(fleet) -> bool:
    return any(fleet.redis.llen(f"inpaint\x06\x16{band}") for band in (3, 6, 9))


def test_duplicate_submission_enqueues_once(healthy_fleet):
    fleet = healthy_fleet
    first = fleet.submit()
    again = fleet.submit(job_id=first)
    assert again == first
    status = fleet.wait_final(first)
    assert status.state == schema.SUCCEEDED and status.attempt == 1
    assert [e["state"] for e in fleet.events(first) if e["type"] == "state"] == ["queued", "running", "succeeded"]


def test_expired_state_reads_as_expired_and_ends_a_wait(healthy_fleet):
    fleet = healthy_fleet
    job_id = fleet.submit()
    fleet.wait_final(job_id)
    # What the state TTL does after INPAINT_STATE_TTL_S: the hash and the job's stream are gone.
    fleet.redis.delete(state.job_key(job_id), state.job_events_key(job_id))
    assert fleet.client.status(job_id).state == schema.EXPIRED
    started = time.monotonic()
    assert fleet.client.wait(job_id, timeout=30).state == schema.EXPIRED
    assert time.monotonic() - started < 5


def test_submission_to_a_full_redis_fails_loudly():
    with devstack.start_redis() as server:
        admin = redis.Redis.from_url(server.url)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")   # full from now on: every write is refused
        with InpaintClient(broker_url=server.url, bucket=BUCKET) as client:
            with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
                client.submit(f"s3://{BUCKET}/in/image.png", f"s3://{BUCKET}/in/mask.png", "a red square")
        admin.config_set("maxmemory", "0")
        assert admin.keys("*") == []   # no state, nothing queued
        admin.close()
