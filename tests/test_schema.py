"""api_client.schema: the job's validation, limits, errors, status parsing, Redis names and event fields."""
import json
import math
import uuid

import pytest

from api_client import schema

JOB_ID = uuid.uuid4().hex


def job_dict(**fields) -> dict:
    return {"job_id": JOB_ID, "image": "s3://inputs/a/image.png", "mask": "s3://inputs/a/mask.png",
            "prompt": "a red house", "output": {"bucket": "outputs"}, **fields}


def invalid(fields: dict) -> schema.JobError:
    with pytest.raises(schema.JobError) as caught:
        schema.Job.from_dict(fields)
    assert caught.value.code == schema.INVALID_INPUT
    return caught.value


def test_minimal_job_gets_the_documented_defaults():
    job = schema.Job.from_dict(job_dict())
    assert job.to_dict() == {
        "job_id": JOB_ID, "image": "s3://inputs/a/image.png", "mask": "s3://inputs/a/mask.png",
        "prompt": "a red house", "negative_prompt": None, "num_inference_steps": 50, "guidance_scale": 7.5,
        "strength": 1.0, "scheduler": None, "seed": None, "num_images": 1, "width": None, "height": None,
        "mask_blur": 0, "padding_mask_crop": None, "keep_unmasked": True,
        "output": {"bucket": "outputs", "prefix": f"jobs/{JOB_ID}/", "format": "png"}, "priority": 5,
        "webhook": None}
    assert job.image_location == ("inputs", "a/image.png")
    assert job.output.key(3) == f"jobs/{JOB_ID}/3.png"


def test_negative_prompt_null_and_empty_stay_distinct_through_json():
    # SDXL models treat them differently (zeroed negative embeddings vs the encoded empty prompt): never merge them.
    for value in (None, ""):
        job = schema.Job.from_dict(job_dict(negative_prompt=value))
        again = schema.Job.from_dict(json.loads(json.dumps(job.to_dict())))
        assert again.negative_prompt == value and type(again.negative_prompt) is type(value)
    schema.Limits(max_prompt_chars=11).check_job(schema.Job.from_dict(job_dict(negative_prompt=None)))  # no len(None)


def test_full_job_round_trips_through_json():
    job = schema.Job.from_dict(job_dict(
        negative_prompt="blurry", num_inference_steps=30, guidance_scale=0, strength=0.5, scheduler="euler_a",
        seed=2**63 - 3, num_images=2, width=512, height=768, mask_blur=4, padding_mask_crop=32,
        keep_unmasked=False, priority=0, output={"bucket": "outputs", "prefix": "x/", "format": "webp"}))
    assert schema.Job.from_dict(json.loads(json.dumps(job.to_dict()))) == job


@pytest.mark.parametrize("fields, words", [
    ({"colour": "red"}, "unknown field(s) colour"),
    ({"num_inference_steps": 0}, "num_inference_steps: 0 is outside [1"),
    ({"num_inference_steps": "20"}, "num_inference_steps: expected int"),
    ({"num_inference_steps": True}, "num_inference_steps: expected int"),
    ({"num_inference_steps": 20.0}, "num_inference_steps: expected int"),
    ({"guidance_scale": math.nan}, "guidance_scale"),
    ({"guidance_scale": math.inf}, "guidance_scale"),
    ({"guidance_scale": -0.5}, "guidance_scale"),
    ({"guidance_scale": "7"}, "guidance_scale: expected int or float"),
    ({"strength": 0}, "strength: 0 is outside (0, 1]"),
    ({"strength": 1.01}, "strength"),
    ({"strength": math.nan}, "strength"),
    ({"num_images": 0}, "num_images"),
    ({"width": 500}, "width: 500 is not a multiple of 8"),
    ({"height": 0}, "height: 0 is outside [8"),
    ({"scheduler": "karras"}, "scheduler: 'karras' is not null or one of pndm"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 2**63 - 1}, "seed: 9223372036854775807 is outside [0, 9223372036854775806]"),
    ({"seed": 2**63 - 2, "num_images": 2}, "seed"),
    ({"mask_blur": -1}, "mask_blur"),
    ({"padding_mask_crop": -8}, "padding_mask_crop"),
    ({"keep_unmasked": 1}, "keep_unmasked: expected bool"),
    ({"prompt": None}, "prompt: expected str"),
    ({"negative_prompt": 3}, "negative_prompt: expected str or null"),
    ({"priority": 10}, "priority: 10 is outside [0, 9]"),
    ({"webhook": "https://example.com/hook"}, "webhook"),
    ({"image": "http://169.254.169.254/latest/meta-data"}, "image: 'http://169.254.169.254/latest/meta-data' is "
                                                           "not an s3://bucket/key URI"),
    ({"image": "https://bucket.s3.amazonaws.com/key"}, "image"),
    ({"image": "file:///etc/passwd"}, "image"),
    ({"mask": "s3://inputs"}, "mask: 's3://inputs' has no object key"),
    ({"mask": "s3://inputs/"}, "mask"),
    ({"mask": "s3://In_Puts/key"}, "mask: 'In_Puts' is not a valid S3 bucket name"),
    ({"mask": 42}, "mask: expected an s3://bucket/key string"),
    ({"job_id": "1234"}, "job_id"),
    ({"job_id": uuid.uuid1().hex}, "job_id"),
    ({"job_id": JOB_ID.upper()}, "job_id"),
    ({"job_id": str(uuid.UUID(JOB_ID))}, "job_id"),
    ({"output": {"bucket": "outputs", "format": "gif"}}, "output.format: 'gif' is not one of png, jpeg, webp"),
    ({"output": {"bucket": "outputs", "acl": "public-read"}}, "output: unknown field(s) acl"),
    ({"output": {"prefix": "x/"}}, "output.bucket: required"),
    ({"output": {"bucket": "outputs", "prefix": "/abs"}}, "output.prefix"),
    ({"output": "s3://outputs/x"}, "output: expected dict"),
])
def test_bad_field_is_invalid_input_naming_the_field(fields, words):
    assert words in invalid(job_dict(**fields)).message


@pytest.mark.parametrize("missing", schema.Job.REQUIRED)
def test_required_fields(missing):
    fields = job_dict()
    del fields[missing]
    assert invalid(fields).message == f"{missing}: required"


def test_job_must_be_an_object():
    assert "job: expected dict" in invalid(["not", "a", "job"]).message


def test_limits():
    limits = schema.Limits(max_pixels=512 * 512, max_steps=50, max_images=4, max_prompt_chars=100)
    limits.check_job(schema.Job.from_dict(job_dict(num_inference_steps=50, num_images=4, width=512, height=512)))
    over = [({"num_inference_steps": 51}, "num_inference_steps: 51 is over the limit of 50"),
            ({"num_images": 5}, "num_images: 5 is over the limit of 4"),
            ({"prompt": "x" * 101}, "prompt: 101 characters is over the limit of 100 characters"),
            ({"negative_prompt": "x" * 101}, "negative_prompt: 101 characters"),
            ({"width": 512, "height": 520}, "size: 512x520")]
    for fields, words in over:
        with pytest.raises(schema.JobError) as caught:
            limits.check_job(schema.Job.from_dict(job_dict(**fields)))
        assert caught.value.code == schema.LIMIT_EXCEEDED and words in caught.value.message
    with pytest.raises(schema.JobError, match="1024x1024 = 1048576 pixels is over the limit of 262144"):
        limits.check_size(1024, 1024)


def test_default_limits_are_safe():
    limits = schema.Limits()
    assert limits.max_pixels <= 2048 * 2048 and limits.max_steps <= 500 and limits.max_images <= 16


def test_job_error():
    error = schema.JobError(schema.STORAGE_UNAVAILABLE, "s3 is down")
    assert error.transient and isinstance(error, ValueError)
    assert error.to_dict() == {"code": "storage_unavailable", "message": "s3 is down"}
    assert not schema.JobError(schema.INVALID_INPUT, "x").transient
    with pytest.raises(ValueError, match="code: 'oops' is not one of invalid_input"):
        schema.JobError("oops", "x")
    assert set(schema.ERROR_CODES) == {"invalid_input", "input_not_found", "limit_exceeded", "storage_unavailable",
                                       "model_unavailable", "canceled", "timeout", "internal"}


def test_task_name():
    assert schema.TASK_NAME == "inpaint.run"


def test_status_from_a_state_hash_with_bytes_or_text():
    result = {"images": [{"uri": "s3://b/k", "seed": 2**63 - 1}], "timings": {"total_s": 1.5}}
    fields = {b"state": b"succeeded", b"step": b"20", b"total_steps": b"20", b"attempt": b"2", b"worker": b"w@h",
              b"created_at": b"10.5", b"started_at": b"11.0", b"finished_at": b"12.25",
              b"result": json.dumps(result).encode()}
    status = schema.JobStatus.from_hash(JOB_ID, fields)
    assert status == schema.JobStatus(job_id=JOB_ID, state="succeeded", step=20, total_steps=20, attempt=2,
                                      worker="w@h", created_at=10.5, started_at=11.0, finished_at=12.25,
                                      error=None, result=result)
    assert status.final
    failed = schema.JobStatus.from_hash(JOB_ID, {"state": "failed", "error": '{"code": "timeout", "message": "m"}'})
    assert failed.error == {"code": "timeout", "message": "m"} and failed.started_at is None


def test_missing_hash_is_expired():
    status = schema.JobStatus.from_hash(JOB_ID, {})
    assert status.state == schema.EXPIRED and not status.final


def test_states():
    assert schema.FINAL_STATES == {"succeeded", "failed", "canceled"}
    assert schema.STATES == ("queued", "running", "succeeded", "failed", "canceled")


@pytest.mark.parametrize("url, shown", [
    ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
    ("redis://user:secret@host/0", "redis://user:***@host/0"),
    ("redis://host:6379/0", "redis://host:6379/0"),
])
def test_redact_url_masks_only_the_password(url, shown):
    assert schema.redact_url(url) == shown


def test_worker_and_client_share_one_format_list_redactor_and_s3_config():
    from api_client.s3 import s3_client
    from worker import settings
    assert settings.redact_url is schema.redact_url
    config = s3_client("http://127.0.0.1:9").meta.config
    assert config.retries["mode"] == "standard"
    assert config.request_checksum_calculation == "when_required"
