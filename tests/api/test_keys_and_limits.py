"""Keys, tenant isolation, idempotency, rate and active-job limits, and the error contract of DESIGN §8."""
import json
import os
import subprocess
import sys

import httpx
import pytest

from api_client import keys, schema
from tests.api.conftest import EXTERNAL_BUCKET, IDLE_QUEUE, MAX_BODY_BYTES, job_body


def inpaint(stack, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api_client.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **stack.env}, timeout=60)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    return error


def test_keys_cli_prints_the_key_once_and_stores_only_its_hash(stack, key_name):
    created = inpaint(stack, "keys", "create", "--name", key_name, "--queues", f"inpaint,{IDLE_QUEUE}",
                      "--rate", "5", "--max-active", "2")
    assert created.returncode == 0, created.stderr
    lines = created.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == ["key", "webhook_secret"]
    key, secret = (line.split(": ", 1)[1] for line in lines)
    assert key.startswith("ik_") and secret.startswith("whsec_")
    dump = json.dumps({k: stack.redis.dump(k).hex() for k in stack.redis.keys("inpaint:apikey*")})
    assert key not in dump and key.encode().hex() not in dump and keys.key_digest(key) in str(
        [stack.redis.hgetall(k) for k in stack.redis.keys("inpaint:apikey:*") if stack.redis.type(k) == "hash"])

    listed = json.loads(inpaint(stack, "keys", "list", "--json").stdout)
    [mine] = [entry for entry in listed if entry["name"] == key_name]
    assert (mine["queues"], mine["rate"], mine["max_active"]) == (["inpaint", IDLE_QUEUE], 5, 2)
    assert key not in inpaint(stack, "keys", "list").stdout
    with stack.http(key) as client:
        assert client.get("/v1/webhook-secret").json() == {"webhook_secret": secret}

    again = inpaint(stack, "keys", "create", "--name", key_name, "--json")
    assert again.returncode == 2 and "exists already" in again.stdout
    as_json = json.loads(inpaint(stack, "keys", "create", "--name", key_name + "-j", "--json").stdout)
    assert set(as_json) == {"name", "key", "webhook_secret"}

    assert inpaint(stack, "keys", "revoke", key_name).returncode == 0
    with stack.http(key) as client:
        assert_error(client.get("/v1/webhook-secret"), 401, "unauthorized")
    assert inpaint(stack, "keys", "revoke", key_name).returncode == 2


def test_a_key_sees_only_its_own_jobs(stack, key_name):
    owner, other = stack.new_key(key_name + "-a", queues=(IDLE_QUEUE,)), stack.new_key(key_name + "-b")
    with stack.http(owner) as mine, stack.http(other) as theirs:
        job_id = mine.post("/v1/jobs", json=job_body()).json()["id"]
        unknown = "0" * 12 + "4" + "0" * 19
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", f"/v1/jobs/{unknown}", "/v1/jobs/nope"):
            other_error = assert_error(theirs.get(path), 404, "not_found")
        assert other_error["message"] == "job nope: no such job"
        assert_error(theirs.post(f"/v1/jobs/{job_id}/cancel"), 404, "not_found")
        assert theirs.get("/v1/jobs").json()["jobs"] == []
        assert mine.get(f"/v1/jobs/{job_id}").json()["state"] == schema.QUEUED   # the other's cancel did nothing
        # Inputs in the service's bucket: only this key's uploads, not another's files or outputs.
        upload = mine.post("/v1/uploads", json={"content_type": "image/png"}).json()["uri"]
        error = assert_error(theirs.post("/v1/jobs", json=job_body(image=upload)), 422, "invalid_input")
        assert "only this key's uploads" in error["message"]
        mine.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()


def test_idempotency_key_returns_the_same_job_and_refuses_another_body(stack, key_name):
    with stack.http(stack.new_key(key_name, queues=(IDLE_QUEUE,))) as client:
        headers = {"Idempotency-Key": "order-17"}
        first = client.post("/v1/jobs", json=job_body(seed=3), headers=headers)
        again = client.post("/v1/jobs", json=job_body(seed=3), headers=headers)
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json()["id"] == first.json()["id"]
        assert_error(client.post("/v1/jobs", json=job_body(seed=4), headers=headers), 409, "conflict")
        assert client.post("/v1/jobs", json=job_body(seed=3)).json()["id"] != first.json()["id"]
        queued = stack.redis.llen(IDLE_QUEUE) + stack.redis.llen(f"{IDLE_QUEUE}\x06\x163")
        assert len(client.get("/v1/jobs").json()["jobs"]) == 2
        for job in client.get("/v1/jobs").json()["jobs"]:
            client.post(job["urls"]["cancel"]).raise_for_status()
        assert queued >= 2


def test_rate_limit_and_active_cap_answer_429_with_retry_after(stack, key_name):
    with stack.http(stack.new_key(key_name + "-r", queues=(IDLE_QUEUE,), rate=2)) as client:
        for _ in range(2):
            assert client.post("/v1/jobs", json=job_body()).status_code == 201
        limited = client.post("/v1/jobs", json=job_body())
        assert "2 jobs a minute" in assert_error(limited, 429, "rate_limited")["message"]
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
    with stack.http(stack.new_key(key_name + "-a", queues=(IDLE_QUEUE,), max_active=1)) as client:
        job = client.post("/v1/jobs", json=job_body()).json()
        busy = client.post("/v1/jobs", json=job_body())
        assert "1 jobs queued or running" in assert_error(busy, 429, "rate_limited")["message"]
        assert busy.headers["Retry-After"]
        client.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
        assert client.post("/v1/jobs", json=job_body()).status_code == 201   # a canceled job frees its slot


@pytest.mark.parametrize("body, status, code, words", [
    (b"{not json", 400, "invalid_input", "not valid JSON"),
    (b"[1, 2]", 422, "invalid_input", "expected a JSON object"),
    (json.dumps(job_body(colour="red")).encode(), 422, "invalid_input", "unknown field(s) colour"),
    (json.dumps(job_body(num_inference_steps=61)).encode(), 422, "limit_exceeded", "over the limit of 60"),
    (json.dumps(job_body(strength=2)).encode(), 422, "invalid_input", "strength"),
    (json.dumps(job_body(job_id="0" * 32)).encode(), 422, "invalid_input", "job_id: not accepted"),
    (json.dumps(job_body(image="data:image/png;base64,AAAA")).encode(), 422, "invalid_input",
     "not a readable PNG, JPEG, WEBP image"),
    (json.dumps(job_body(image="data:image/png;base64,@@")).encode(), 422, "invalid_input", "base64"),
    (json.dumps(job_body(image="http://example.com/a.png")).encode(), 422, "invalid_input", "s3://"),
    (json.dumps(job_body(image="s3://elsewhere/a.png")).encode(), 422, "invalid_input", "not one inputs"),
    (json.dumps(job_body(queue="gpu-xl")).encode(), 422, "invalid_input", "not one of this key's queues"),
    (json.dumps(job_body(webhook_events_filter=["done"])).encode(), 422, "invalid_input", "webhook_events"),
])
def test_bad_bodies_are_json_errors_naming_the_problem(stack, key_name, body, status, code, words):
    with stack.http(stack.new_key(key_name)) as client:
        error = assert_error(client.post("/v1/jobs", content=body,
                                         headers={"Content-Type": "application/json"}), status, code)
        assert words in error["message"]


def test_external_bucket_inputs_are_accepted(stack, key_name):
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint_url, **_aws(stack.env))
    for name, uri in (("image", job_body()["image"]), ("mask", job_body()["mask"])):
        s3.put_object(Bucket=EXTERNAL_BUCKET, Key=f"{key_name}/{name}.png",
                      Body=__import__("base64").b64decode(uri.split(",", 1)[1]))
    with stack.http(stack.new_key(key_name, queues=(IDLE_QUEUE,))) as client:
        body = job_body(image=f"s3://{EXTERNAL_BUCKET}/{key_name}/image.png",
                        mask=f"s3://{EXTERNAL_BUCKET}/{key_name}/mask.png")
        job = client.post("/v1/jobs", json=body)
        assert job.status_code == 201, job.text
        client.post(job.json()["urls"]["cancel"]).raise_for_status()


def _aws(env: dict) -> dict:
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_DEFAULT_REGION"]}


def test_auth_errors_and_unknown_routes_are_json(stack):
    with stack.http(None) as anonymous:
        missing = anonymous.get("/v1/jobs")
        assert_error(missing, 401, "unauthorized")
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert_error(anonymous.get("/v1/jobs", headers={"Authorization": "Bearer ik_forged"}), 401, "unauthorized")
        assert_error(anonymous.get("/v2/nothing"), 404, "not_found")
        assert_error(anonymous.delete("/healthz"), 405, "method_not_allowed")


def test_bodies_over_the_limit_are_413_by_length_and_by_stream(stack, key_name):
    with stack.http(stack.new_key(key_name)) as client:
        big = b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
        assert_error(client.post("/v1/jobs", content=big), 413, "payload_too_large")

        def chunks():   # no Content-Length: the body arrives chunked and is counted as it comes
            for start in range(0, len(big), 64 * 1024):
                yield big[start:start + 64 * 1024]

        streamed = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert "INPAINT_API_MAX_BODY_BYTES" in assert_error(streamed, 413, "payload_too_large")["message"]
        # The connection's server still answers afterwards.
        assert client.get("/v1/jobs").status_code == 200
