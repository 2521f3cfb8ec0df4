"""The Python client and the `inpaint` CLI in HTTP mode (INPAINT_API_URL + INPAINT_API_KEY), against the real API."""
import json
import os
import subprocess
import sys
import uuid
from dataclasses import fields

import pytest

from api_client import schema
from api_client.client import InpaintClient
from api_client.http import ApiRequestError, HttpInpaintClient
from tests.api.conftest import IDLE_QUEUE, JOB_TIMEOUT_S
from tests.service.conftest import sample_image, sample_mask


@pytest.fixture
def http_env(stack, key_name) -> dict:
    return {"INPAINT_API_URL": stack.url, "INPAINT_API_KEY": stack.new_key(key_name, queues=("inpaint", IDLE_QUEUE))}


def test_from_env_picks_the_api_when_url_and_key_are_set(http_env):
    with InpaintClient.from_env(http_env) as client:
        assert isinstance(client, HttpInpaintClient)
    with InpaintClient.from_env({"INPAINT_API_URL": http_env["INPAINT_API_URL"], "INPAINT_BUCKET": "b-c"}) as client:
        assert isinstance(client, InpaintClient)


def test_same_methods_over_http(http_env, tmp_path):
    with InpaintClient.from_env(http_env) as client:
        job_id = client.submit(sample_image(), sample_mask(), "a red square", num_inference_steps=2, seed=4,
                               num_images=2, output_format="webp")
        events = list(client.events(job_id, timeout=JOB_TIMEOUT_S))
        status = client.wait(job_id, timeout=JOB_TIMEOUT_S)
        assert [e["state"] for e in events][:2] == [schema.QUEUED, schema.RUNNING]
        assert status.state == schema.SUCCEEDED and status.total_steps == 2 and status.attempt == 1
        assert status.created_at <= status.started_at <= status.finished_at
        assert [image.size for image in client.fetch(job_id)] == [(64, 64), (64, 64)]
        files = client.download(job_id, tmp_path)
        assert [f.name for f in files] == [f"{job_id}-0.webp", f"{job_id}-1.webp"]
        assert client.status(uuid.uuid4().hex).state == schema.EXPIRED

        idempotent = uuid.uuid4().hex   # job_id= travels as the Idempotency-Key
        first = client.submit(sample_image(), sample_mask(), "once", job_id=idempotent, queue=IDLE_QUEUE)
        assert client.submit(sample_image(), sample_mask(), "once", job_id=idempotent, queue=IDLE_QUEUE) == first
        client.cancel(first)
        assert client.status(first).state == schema.CANCELED
        with pytest.raises(schema.JobError, match="strength"):
            client.submit(sample_image(), sample_mask(), "bad", strength=3)
        with pytest.raises(TimeoutError):
            queued = client.submit(sample_image(), sample_mask(), "never runs", queue=IDLE_QUEUE)
            client.wait(queued, timeout=0.5)
        client.cancel(queued)
    with HttpInpaintClient(http_env["INPAINT_API_URL"], "ik_wrong") as forged:
        with pytest.raises(ApiRequestError) as error:
            forged.submit(sample_image(), sample_mask(), "x")
        assert (error.value.status, error.value.code) == (401, "unauthorized")


def test_cli_output_is_the_same_in_http_mode(stack, http_env, tmp_path):
    sample_image().save(tmp_path / "image.png")
    sample_mask().save(tmp_path / "mask.png")
    env = {**os.environ, **stack.env, **http_env}

    def inpaint(*args):
        return subprocess.run([sys.executable, "-m", "api_client.cli", *args], capture_output=True, text=True,
                              env=env, timeout=JOB_TIMEOUT_S)

    done = inpaint("submit", "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"),
                   "--prompt", "p", "--steps", "2", "--wait", "--out", str(tmp_path / "out"), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert set(result) == {f.name for f in fields(schema.JobStatus)} | {"files"}
    assert result["state"] == schema.SUCCEEDED and len(result["files"]) == 1
    text = inpaint("status", result["job_id"])
    first, *where = text.stdout.splitlines()
    assert first == f"{result['job_id']}: succeeded (step 2/2)"
    assert where[0] == f"image 0: {result['result']['images'][0]['uri']}" and where[1].startswith("  url: http")
    missing = inpaint("status", uuid.uuid4().hex, "--json")
    assert missing.returncode == 1 and json.loads(missing.stdout)["error"]["code"] == "job_not_found"
    env["INPAINT_API_KEY"] = "ik_revoked"
    refused = inpaint("status", result["job_id"], "--json")
    assert refused.returncode == 1 and json.loads(refused.stdout)["error"]["code"] == "unauthorized"
