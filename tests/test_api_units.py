"""Pieces of the HTTP API without servers: settings, the job object, Prefer and Idempotency-Key parsing, the
request body's JSON Schema (from the job schema's fields)."""
import json
from dataclasses import fields

import pytest

from api import routes
from api.render import render_job
from api.settings import ApiSettings
from api_client import schema


def test_api_settings_read_the_environment_and_name_bad_variables():
    settings = ApiSettings.from_env({"INPAINT_BUCKET": "images", "INPAINT_API_PORT": "9000",
                                     "INPAINT_ALLOWED_BUCKETS": "images, uploads", "INPAINT_LOG_LEVEL": "debug",
                                     "INPAINT_BROKER_URL": "redis://:secret@redis:6379/0"})
    assert (settings.port, settings.log_level, settings.bucket_allowlist) == (9000, "DEBUG", {"images", "uploads"})
    assert "secret" not in repr(settings) and settings.state_redis_url == "redis://:secret@redis:6379/0"
    with pytest.raises(ValueError, match="INPAINT_BUCKET: required"):
        ApiSettings.from_env({})
    with pytest.raises(ValueError, match="INPAINT_API_PORT=0: outside"):
        ApiSettings.from_env({"INPAINT_BUCKET": "images", "INPAINT_API_PORT": "0"})
    with pytest.raises(ValueError, match="INPAINT_API_MAX_WAIT_S='soon': expected an integer"):
        ApiSettings.from_env({"INPAINT_BUCKET": "images", "INPAINT_API_MAX_WAIT_S": "soon"})


def test_job_object_from_a_state_hash():
    job_id = "a" * 12 + "4" + "a" * 19
    values = {"state": "succeeded", "step": "3", "total_steps": "3", "attempt": "1", "created_at": "0.5",
              "started_at": "1.0", "finished_at": "2.25", "queue": "gpu-a", "owner": "k",
              "result": json.dumps({"images": [{"uri": "s3://b-b/jobs/x/0.png", "url": "old", "seed": 1}]}),
              "webhook_url": "https://example.com/hook", "webhook_attempts": "2"}
    job = render_job(job_id, values, presign=lambda uri: f"signed:{uri}", queue_position=4)
    assert job["created_at"] == "1970-01-01T00:00:00.500000Z" and job["finished_at"] == "1970-01-01T00:00:02.250000Z"
    assert job["queue_position"] is None   # only while queued
    assert job["result"]["images"][0]["url"] == "signed:s3://b-b/jobs/x/0.png"
    assert job["webhook"] == {"url": "https://example.com/hook", "events": ["completed"], "state": "pending",
                              "attempts": 2}
    assert job["urls"]["events"] == f"/v1/jobs/{job_id}/events" and "owner" not in job
    queued = render_job(job_id, {"state": "queued", "created_at": "1"}, queue_position=0)
    assert queued["queue_position"] == 0 and queued["webhook"] is None and queued["result"] is None


@pytest.mark.parametrize("header, wait", [("wait=5", 5), ("respond-async, wait=100", 60), ("wait = 7", 7),
                                           ("return=minimal", None), ("wait=abc", None), (None, None)])
def test_prefer_wait_is_parsed_and_capped(header, wait):
    assert routes._prefer_wait(header, 60) == wait


def test_idempotency_keys_are_bounded_printable_text():
    assert routes._idempotency("order-17") == "order-17" and routes._idempotency(None) is None
    for bad in ("", "x" * 256, "tab\there"):
        with pytest.raises(Exception, match="Idempotency-Key"):
            routes._idempotency(bad)


def test_request_schema_lists_the_job_fields_but_not_the_services():
    body = routes.job_body_schema()
    job_fields = {f.name for f in fields(schema.Job)} - {"job_id", "output", "webhook"}
    assert set(body["properties"]) == job_fields | {"queue", "webhook", "webhook_events_filter", "output_format"}
    assert body["additionalProperties"] is False and body["required"] == ["image", "mask", "prompt"]
    assert body["properties"]["num_inference_steps"]["type"] == "integer"
    assert body["properties"]["seed"]["type"] == ["integer", "null"]
