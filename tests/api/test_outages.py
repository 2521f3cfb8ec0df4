"""Redis or S3 down: the API answers 503 `unavailable` with Retry-After within its backend timeout (no hang), stays
up (/healthz), reports itself unready (/readyz), and serves again by itself once they are back."""
import time

import pytest

from tests import devstack
from tests.api.conftest import API_ENV, BUCKET, IDLE_QUEUE, job_body
from tests.reliability.conftest import RestartableRedis

BACKEND_TIMEOUT_S = 1.0


@pytest.fixture
def outage_stack(tmp_path):
    """A restartable Redis (AOF: job state survives the restart), a moto S3 of its own, one inpaint-api."""
    redis_server = RestartableRedis()
    s3_server = devstack.start_s3()
    devstack.create_bucket(s3_server.endpoint_url, BUCKET)
    env = {**devstack.worker_env(redis_server.url, s3_server.endpoint_url, BUCKET, "unused"), **API_ENV,
           "INPAINT_API_BACKEND_TIMEOUT_S": str(BACKEND_TIMEOUT_S), "INPAINT_API_RETRY_AFTER_S": "3"}
    api = devstack.start_api(env, log_path=tmp_path / "api.log")
    yield redis_server, s3_server, api
    api.stop()
    s3_server.stop()
    redis_server.close()


def timed(call):
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def assert_unavailable(response, seconds: float) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "unavailable"
    assert response.headers["Retry-After"] == "3"
    assert seconds < 10 * BACKEND_TIMEOUT_S


def eventually(call, status: int, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        response = call()
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def new_client(redis_server, key_name):
    import httpx
    import redis

    from api_client import keys

    with redis.Redis.from_url(redis_server.url, decode_responses=True) as connection:
        key = keys.create_key(connection, key_name, (IDLE_QUEUE,), rate=0, max_active=0).key
    return key, httpx


def test_redis_down_is_503_then_the_api_recovers_alone(outage_stack, key_name):
    redis_server, _, api = outage_stack
    key, httpx = new_client(redis_server, key_name)
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        job = client.post("/v1/jobs", json=job_body()).json()
        redis_server.stop()
        for call in (lambda: client.get(f"/v1/jobs/{job['id']}"), lambda: client.post("/v1/jobs", json=job_body()),
                     lambda: client.get(f"/v1/jobs/{job['id']}/events"), lambda: client.get("/readyz")):
            assert_unavailable(*timed(call))
        assert client.get("/healthz").status_code == 200

        redis_server.start()
        assert eventually(lambda: client.get("/readyz"), 200).status_code == 200
        assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "queued"
        assert client.post("/v1/jobs", json=job_body()).status_code == 201


def test_s3_down_is_503_and_the_admission_is_undone(outage_stack, key_name):
    redis_server, s3_server, api = outage_stack
    key, httpx = new_client(redis_server, key_name)
    headers = {"Idempotency-Key": "outage-1"}
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        s3_server.stop()
        assert_unavailable(*timed(lambda: client.post("/v1/jobs", json=job_body(), headers=headers)))
        assert_unavailable(*timed(lambda: client.get("/readyz")))
        assert client.get("/v1/jobs").json()["jobs"] == []   # no half-made job is left behind

        restarted = devstack.start_s3(port=s3_server.port)
        try:
            devstack.create_bucket(restarted.endpoint_url, BUCKET)
            retried = eventually(lambda: client.post("/v1/jobs", json=job_body(), headers=headers), 201)
            assert retried.status_code == 201, retried.text   # the same Idempotency-Key works once S3 is back
            assert client.get("/readyz").status_code == 200
        finally:
            restarted.stop()
