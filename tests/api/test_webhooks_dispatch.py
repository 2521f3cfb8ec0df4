"""The webhook dispatcher with real processes: a private redis-server, job events written by the worker's own state
store, and a local receiver (127.0.0.1, allowed through INPAINT_WEBHOOK_ALLOW_HOSTS) that verifies each signature
with the `standardwebhooks` package."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import redis.asyncio

from api import webhooks
from api_client import keys, schema, state as state_keys
from tests import devstack
from tests.api.receiver import HOLD, WebhookReceiver
from worker.events import JobStore

ROOT = Path(__file__).resolve().parents[2]
FAST = {"INPAINT_WEBHOOK_TIMEOUT_S": "2", "INPAINT_WEBHOOK_BACKOFF_S": "0.2", "INPAINT_WEBHOOK_BACKOFF_MAX_S": "0.5",
        "INPAINT_WEBHOOK_RECLAIM_S": "3", "INPAINT_WEBHOOK_MAX_ATTEMPTS": "5",
        "INPAINT_WEBHOOK_ALLOW_HOSTS": "127.0.0.1", "INPAINT_BUCKET": "inpaint-test"}


@pytest.fixture(scope="module")
def redis_server():
    with devstack.start_redis() as server:
        yield server


@pytest.fixture
def state(redis_server):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushdb()   # our private server: each test starts empty
    yield client
    client.close()


@pytest.fixture
def api_key(state) -> keys.NewKey:
    return keys.create_key(state, "webhook-tests", ["inpaint"])


@pytest.fixture
def receiver(api_key):
    server = WebhookReceiver(api_key.webhook_secret)
    yield server
    server.close()


def settings(**overrides):
    from api.settings import ApiSettings

    return ApiSettings.from_env({**FAST, **{name: str(value) for name, value in overrides.items()}})


def submitted_job(state, url: str, events=("completed",)) -> str:
    """A queued job with a webhook, written as the API's submit writes it, owned by the tests' only key."""
    job_id = uuid.uuid4().hex
    owner = keys.list_keys(state)[0].key_id
    fields = {"owner": owner, "webhook_url": url, "webhook_events": json.dumps(list(events)),
              "webhook_state": "pending", "webhook_attempts": "0"}
    state_keys.Scripts(state).run_job(state_keys.CREATE_QUEUED, job_id, json.dumps({"job_id": job_id}),
                                      *[item for pair in fields.items() for item in pair])
    return job_id


def run_job(state, job_id: str, steps: int = 2, final: str = schema.SUCCEEDED) -> None:
    """The worker's writes of one run: claim (start), progress, final state."""
    store = JobStore(state)
    claim = store.claim(job_id, "worker-1", lease_s=30, job=None)
    for step in range(1, steps + 1):
        store.progress(job_id, claim.attempt, step, steps)
    store.finish(job_id, final, claim.attempt, result={"images": []} if final == schema.SUCCEEDED else None,
                 error=None if final == schema.SUCCEEDED else {"code": "internal", "message": "boom"})


async def until(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.05)


def dispatching(redis_url: str, scenario, count: int = 1, **overrides):
    """Run `scenario(dispatchers)` while `count` dispatchers run; each has its own Redis client."""
    async def main():
        clients = [redis.asyncio.Redis.from_url(redis_url, decode_responses=True) for _ in range(count)]
        dispatchers = [webhooks.Dispatcher(client, settings(**overrides)) for client in clients]
        for dispatcher in dispatchers:
            dispatcher.start()
        try:
            await until(lambda: all(d._group_ready for d in dispatchers), what="consumer group")
            return await scenario(dispatchers)
        finally:
            for dispatcher in dispatchers:
                await dispatcher.stop()
            for client in clients:
                await client.aclose()
    return asyncio.run(main())


def job_fields(state, job_id: str) -> dict:
    return state.hgetall(state_keys.job_key(job_id))


def test_a_failed_first_delivery_is_retried_with_the_same_id_and_a_valid_signature(redis_server, state,
                                                                                     receiver):
    receiver.answers = [500, 200]
    job_id = submitted_job(state, receiver.url())

    async def scenario(_):
        run_job(state, job_id)
        await until(lambda: job_fields(state, job_id).get("webhook_state") == "delivered", what="delivered")

    dispatching(redis_server.url, scenario)
    first, second = receiver.deliveries   # the default filter: only job.completed
    assert first.msg_id == second.msg_id and first.body == second.body
    assert first.payload is not None and second.payload is not None   # both signatures verify
    payload = second.payload
    assert payload["type"] == "job.completed" and payload["timestamp"].endswith("Z")
    assert payload["data"]["id"] == job_id and payload["data"]["state"] == "succeeded"
    assert first.headers["content-type"] == "application/json"
    fields = job_fields(state, job_id)
    assert fields["webhook_attempts"] == "2" and fields["webhook_state"] == "delivered"


def test_start_progress_and_completed_follow_the_jobs_filter(redis_server, state, receiver):
    everything = submitted_job(state, receiver.url("/all"), events=("start", "progress", "completed"))
    progress_only = submitted_job(state, receiver.url("/progress"), events=("progress",))

    async def scenario(_):
        run_job(state, everything, steps=3)
        run_job(state, progress_only, steps=2, final=schema.FAILED)
        await until(lambda: len(receiver.deliveries) >= 7, what="7 deliveries")
        await asyncio.sleep(1.5)   # nothing more comes

    dispatching(redis_server.url, scenario)
    types = {path: sorted(d.payload["type"] for d in receiver.deliveries if d.path == path)
             for path in ("/all", "/progress")}
    assert types == {"/all": ["job.completed", "job.progress", "job.progress", "job.progress", "job.start"],
                     "/progress": ["job.progress", "job.progress"]}
    assert len({d.msg_id for d in receiver.deliveries}) == 7   # one id per event
    assert job_fields(state, everything)["webhook_state"] == "delivered"


def test_410_stops_the_jobs_webhook(redis_server, state, receiver):
    receiver.answers = [410]
    job_id = submitted_job(state, receiver.url(), events=("start", "completed"))

    async def scenario(_):
        store = JobStore(state)
        claim = store.claim(job_id, "worker-1", lease_s=30, job=None)
        await until(lambda: job_fields(state, job_id).get("webhook_state") == "failed", what="failed")
        store.finish(job_id, schema.SUCCEEDED, claim.attempt, result={"images": []})   # job.completed: not sent
        await asyncio.sleep(1.5)

    dispatching(redis_server.url, scenario)
    assert [d.payload["type"] for d in receiver.deliveries] == ["job.start"]
    assert job_fields(state, job_id)["webhook_attempts"] == "1"


def test_retries_stop_after_the_most_attempts(redis_server, state, receiver):
    receiver.answers = [503] * 10
    job_id = submitted_job(state, receiver.url())

    async def scenario(_):
        run_job(state, job_id)
        await until(lambda: job_fields(state, job_id).get("webhook_state") == "failed", what="failed")
        await asyncio.sleep(1.0)

    dispatching(redis_server.url, scenario, INPAINT_WEBHOOK_MAX_ATTEMPTS=3)
    assert len(receiver.deliveries) == 3 and len({d.msg_id for d in receiver.deliveries}) == 1
    assert job_fields(state, job_id)["webhook_attempts"] == "3"


def test_redirects_are_not_followed(redis_server, state, receiver):
    receiver.answers = [302, 302]
    job_id = submitted_job(state, receiver.url())

    async def scenario(_):
        run_job(state, job_id)
        await until(lambda: job_fields(state, job_id).get("webhook_state") == "failed", what="failed")

    dispatching(redis_server.url, scenario, INPAINT_WEBHOOK_MAX_ATTEMPTS=2)
    assert [d.path for d in receiver.deliveries] == ["/hook", "/hook"]   # never /elsewhere


def test_the_address_is_checked_again_at_delivery(redis_server, state, receiver):
    job_id = submitted_job(state, receiver.url())   # accepted at submit, refused now: 127.0.0.1 not allowed

    async def scenario(_):
        run_job(state, job_id)
        await until(lambda: job_fields(state, job_id).get("webhook_state") == "failed", what="failed")

    dispatching(redis_server.url, scenario, INPAINT_WEBHOOK_ALLOW_HOSTS="")
    assert receiver.deliveries == []
    record, = [state.hgetall(key) for key in state.keys(state_keys.webhook_delivery_key("*"))]
    assert record["state"] == "failed" and "127.0.0.1 is a loopback address" in record["last_error"]


def test_a_revoked_key_fails_the_delivery_without_a_post(redis_server, state, receiver):
    job_id = submitted_job(state, receiver.url())
    keys.revoke_key(state, "webhook-tests")

    async def scenario(_):
        run_job(state, job_id)
        await until(lambda: job_fields(state, job_id).get("webhook_state") == "failed", what="failed")

    dispatching(redis_server.url, scenario)
    assert receiver.deliveries == [] and job_fields(state, job_id)["webhook_attempts"] == "0"


def test_jobs_without_webhook_or_outside_the_filter_send_nothing(redis_server, state, receiver):
    plain = uuid.uuid4().hex
    state_keys.Scripts(state).run_job(state_keys.CREATE_QUEUED, plain, json.dumps({"job_id": plain}))
    start_only = submitted_job(state, receiver.url(), events=("start",))

    async def scenario(_):
        run_job(state, plain)
        run_job(state, start_only)
        await until(lambda: len(receiver.deliveries) == 1, what="one delivery")
        await asyncio.sleep(1.0)
        # every entry acknowledged
        assert state.xpending(state_keys.EVENTS_STREAM, state_keys.WEBHOOKS_GROUP)["pending"] == 0

    dispatching(redis_server.url, scenario)
    assert [d.payload["type"] for d in receiver.deliveries] == ["job.start"]


def test_several_dispatchers_deliver_each_event_once(redis_server, state, receiver):
    job_ids = [submitted_job(state, receiver.url()) for _ in range(8)]

    async def scenario(_):
        for job_id in job_ids:
            run_job(state, job_id, steps=1)
        await until(lambda: len(receiver.deliveries) >= 8, what="8 deliveries")
        await asyncio.sleep(1.5)   # no duplicate follows

    dispatching(redis_server.url, scenario, count=3)
    assert sorted(d.payload["data"]["id"] for d in receiver.deliveries) == sorted(job_ids)
    assert all(job_fields(state, job_id)["webhook_attempts"] == "1" for job_id in job_ids)


def test_an_event_read_by_a_process_that_died_is_taken_over(redis_server, state, receiver):
    job_id = submitted_job(state, receiver.url())
    state.xgroup_create(state_keys.EVENTS_STREAM, state_keys.WEBHOOKS_GROUP, id="$", mkstream=True)
    run_job(state, job_id)
    # A process that read the entries and died before scheduling them: they stay pending in the group.
    stolen = state.xreadgroup(state_keys.WEBHOOKS_GROUP, "dead-process", {state_keys.EVENTS_STREAM: ">"}, count=100)
    assert len(stolen[0][1]) == 4   # start, two progress steps, completed

    async def scenario(_):
        await until(lambda: job_fields(state, job_id).get("webhook_state") == "delivered", what="delivered")
        assert state.xpending(state_keys.EVENTS_STREAM, state_keys.WEBHOOKS_GROUP)["pending"] == 0

    dispatching(redis_server.url, scenario, INPAINT_WEBHOOK_RECLAIM_S=2.5)
    assert len(receiver.deliveries) == 1 and receiver.deliveries[0].payload["data"]["id"] == job_id


DISPATCHER_PROCESS = """
import asyncio, os, redis.asyncio
from api.settings import ApiSettings
from api.webhooks import Dispatcher

async def main():
    client = redis.asyncio.Redis.from_url(os.environ["TEST_REDIS_URL"], decode_responses=True)
    await Dispatcher(client, ApiSettings.from_env()).run()

asyncio.run(main())
"""


def test_a_dispatcher_killed_mid_delivery_loses_nothing(redis_server, state, receiver, tmp_path):
    receiver.answers = [HOLD]   # the first POST hangs until the dispatcher that sent it is dead
    # That dispatcher's lease on the delivery (INPAINT_WEBHOOK_RECLAIM_S) then runs out: the next one takes it.
    job_id = submitted_job(state, receiver.url())
    log = open(tmp_path / "dispatcher.log", "wb")
    process = subprocess.Popen([sys.executable, "-c", DISPATCHER_PROCESS], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT,
                               env={**os.environ, **FAST, "TEST_REDIS_URL": redis_server.url,
                                    "INPAINT_WEBHOOK_RECLAIM_S": "4"})
    try:
        deadline = time.monotonic() + 30
        while not state.exists(state_keys.EVENTS_STREAM) or not state.xinfo_groups(state_keys.EVENTS_STREAM):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "dispatcher.log").read_text()
            time.sleep(0.05)
        run_job(state, job_id)
        receiver.wait_for(1, timeout=30)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert job_fields(state, job_id)["webhook_state"] == "pending"
    # the killed process's lease on the delivery
    (msg_id, lease_ms), = state.zrange(state_keys.WEBHOOKS_DUE_KEY, 0, -1, withscores=True)
    assert lease_ms > time.time() * 1000
    receiver.release()

    async def scenario(_):
        await until(lambda: job_fields(state, job_id).get("webhook_state") == "delivered", what="delivered")

    dispatching(redis_server.url, scenario)
    first, second = receiver.wait_for(2)
    assert first.msg_id == second.msg_id == msg_id and second.payload["data"]["id"] == job_id


def test_the_dispatcher_outlives_a_redis_restart():
    server = devstack.start_redis()

    async def main():
        client = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
        dispatcher = webhooks.Dispatcher(client, settings()).start()
        try:
            await until(lambda: dispatcher._group_ready, what="consumer group")
            server.stop()
            await asyncio.sleep(1.5)   # reads fail meanwhile; the dispatcher waits and tries again
            restarted = devstack.start_redis(port=server.port)   # empty: no stream, no group
            try:
                fresh = redis.Redis.from_url(restarted.url, decode_responses=True)
                stream = state_keys.EVENTS_STREAM
                await until(lambda: fresh.exists(stream) and fresh.xinfo_groups(stream), what="the group made again")
                receiver = WebhookReceiver(keys.create_key(fresh, "after-restart", ["inpaint"]).webhook_secret)
                try:
                    job_id = submitted_job(fresh, receiver.url())
                    run_job(fresh, job_id)
                    await until(lambda: job_fields(fresh, job_id).get("webhook_state") == "delivered",
                                what="delivered after the restart")
                    assert receiver.deliveries[0].payload["data"]["id"] == job_id
                finally:
                    receiver.close()
                    fresh.close()
            finally:
                await dispatcher.stop()
                restarted.stop()
        finally:
            await client.aclose()

    asyncio.run(main())
