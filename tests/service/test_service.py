"""The whole service: real redis-server, moto S3 over HTTP, two `inpaint-worker` processes on the tiny model."""
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

from kombu import Connection
from PIL import Image

from api_client import schema, state
from tests.service.conftest import BUCKET, OTHER_BUCKET, sample_image, sample_mask

JOB_TIMEOUT_S = 120


def wait_final(service, job_id: str, timeout: float = JOB_TIMEOUT_S) -> schema.JobStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = service.client.status(job_id)
        if status.final:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not final after {timeout}s: {service.client.status(job_id)}; logs:\n"
                         + "\n".join(worker.log_text()[-3000:] for worker in service.workers))


def test_submitted_job_runs_and_reports_everything(service):
    job_id = service.client.submit(sample_image(), sample_mask(), "a red square", num_inference_steps=2,
                                   scheduler="ddim", seed=11, num_images=2)
    status = service.client.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert status.state == schema.SUCCEEDED, status
    assert status.attempt == 1 and status.worker in {w.hostname for w in service.workers}
    assert status.step == status.total_steps == 2
    assert status.created_at <= status.started_at <= status.finished_at
    for index, image in enumerate(status.result["images"]):
        key = f"jobs/{job_id}/{index}.png"
        assert image["uri"] == f"s3://{BUCKET}/{key}" and image["seed"] == 11 + index
        body = service.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == image["sha256"]
        assert Image.open(io.BytesIO(body)).size == (image["width"], image["height"]) == (64, 64)

    events = service.events(job_id)
    # The phases of the run, each as it begins, around the denoise steps.
    assert [(e["type"], e["state"], e["phase"], e["step"]) for e in events] == [
        ("state", "queued", "", 0), ("state", "running", "fetching", 0), ("progress", "running", "encoding", 0),
        ("progress", "running", "denoising", 0), ("progress", "running", "denoising", 1),
        ("progress", "running", "denoising", 2), ("progress", "running", "decoding", 2),
        ("progress", "running", "uploading", 2), ("state", "succeeded", "", 2)]
    assert all(e["total_steps"] == 2 for e in events[4:])
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    assert events[-1]["data"]["result"] == status.result
    assert service.shared_events(job_id) == events


def test_two_workers_share_the_queue(service):
    # Prefetch 1 with late acks: a busy worker holds no second job, so the idle one takes it. The second job is sent
    # once the first is seen running, so which worker is busy is known, not a race.
    first = service.client.submit(sample_image(), sample_mask(), "long", num_inference_steps=60, scheduler="ddim",
                                  seed=0)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while service.client.status(first).step < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    second = wait_final(service, service.client.submit(sample_image(), sample_mask(), "short", num_inference_steps=2,
                                                       scheduler="ddim", seed=1))
    busy_worker = service.client.status(first).worker
    service.client.cancel(first)
    assert wait_final(service, first).state == schema.CANCELED
    assert second.state == schema.SUCCEEDED
    assert {busy_worker, second.worker} == {w.hostname for w in service.workers}
    for url in service.metrics_urls:   # each worker process serves its own metrics, and is ready
        with urllib.request.urlopen(f"{url}/ready", timeout=10) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            exposition = response.read().decode()
        ended = re.findall(r'^inpaint_jobs_total\{state="\w+"\} (\S+)$', exposition, re.MULTILINE)
        assert sum(float(count) for count in ended) >= 1, exposition


def test_cancel_stops_a_running_job(service):
    job_id = service.client.submit(sample_image(), sample_mask(), "a long job", num_inference_steps=60,
                                   scheduler="ddim", seed=3)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while service.client.status(job_id).step < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    service.client.cancel(job_id)
    status = wait_final(service, job_id)
    assert status.state == schema.CANCELED and status.error["code"] == schema.CANCELED_ERROR
    assert 1 <= status.step < 60
    assert service.events(job_id)[-1]["state"] == schema.CANCELED
    assert not service.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"jobs/{job_id}/").get("Contents")


def test_ctrl_c_on_submit_wait_cancels_the_running_job(service, tmp_path):
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    sample_image().save(image)
    sample_mask().save(mask)
    env = {**os.environ, "INPAINT_BROKER_URL": service.redis_url, "INPAINT_S3_ENDPOINT_URL": service.s3_endpoint_url,
           "INPAINT_BUCKET": BUCKET}
    process = subprocess.Popen([sys.executable, "-m", "api_client.cli", "submit", "--image", str(image), "--mask",
                                str(mask), "--prompt", "a long job", "--steps", "60", "--scheduler", "ddim", "--wait"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job_id = process.stdout.readline().split(":")[0]   # "<id>: submitted", printed once it is accepted
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while service.client.status(job_id).step < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert f"interrupted: {job_id}: cancel requested; the job stops at its next step" in out
    status = wait_final(service, job_id)
    assert status.state == schema.CANCELED and 1 <= status.step < 60


def not_an_image(service, job_id):
    return {"image": service.put_bytes(f"in/{job_id}/junk.png", b"definitely not a PNG")}


def mask_of_other_size(service, job_id):
    return {"mask": service.put_image(f"in/{job_id}/small.png", sample_mask((32, 32)))}


def other_bucket(service, job_id):
    return {"image": service.put_image(f"in/{job_id}/image.png", sample_image(), bucket=OTHER_BUCKET)}


BAD_JOBS = {
    "not an image": (not_an_image, schema.INVALID_INPUT),
    "mask size mismatch": (mask_of_other_size, schema.INVALID_INPUT),
    "over the step limit": (lambda s, j: {"num_inference_steps": 500}, schema.LIMIT_EXCEEDED),
    "unknown field": (lambda s, j: {"sampler": "ddim"}, schema.INVALID_INPUT),
    "bucket not allowed": (other_bucket, schema.INVALID_INPUT),
    "http uri": (lambda s, j: {"image": "http://127.0.0.1/image.png"}, schema.INVALID_INPUT),
    "missing key": (lambda s, j: {"mask": f"s3://{BUCKET}/in/{j}/missing.png"}, schema.INPUT_NOT_FOUND),
}


def test_bad_jobs_fail_with_their_code_and_the_workers_keep_working(service):
    sent = {}
    for name, (change, code) in BAD_JOBS.items():
        job_id = uuid.uuid4().hex
        sent[name] = (service.send_raw(service.raw_job(job_id=job_id, **change(service, job_id))), code)
    good = service.send_raw(service.raw_job())
    for name, (job_id, code) in sent.items():
        status = wait_final(service, job_id)
        assert (status.state, status.error["code"]) == (schema.FAILED, code), name
        assert status.error["message"], name
    assert wait_final(service, good).state == schema.SUCCEEDED
    assert all(worker.poll() is None for worker in service.workers)


def test_same_job_id_runs_once(service):
    job = service.raw_job()
    service.send_raw(job)
    service.send_raw(job)
    status = wait_final(service, job["job_id"])
    assert status.state == schema.SUCCEEDED and status.attempt == 1
    # The client does not enqueue a job_id that already has a state.
    again = service.client.submit(job["image"], job["mask"], "a red square", job_id=job["job_id"])
    assert again == job["job_id"]
    deadline = time.monotonic() + 30
    while service.redis.llen("inpaint") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)   # the second delivery, if any worker still holds it, is skipped by now
    running = [e for e in service.events(job["job_id"]) if e["state"] == schema.RUNNING and e["type"] == "state"]
    assert len(running) == 1 and service.client.status(job["job_id"]).attempt == 1


def test_pickle_message_is_never_deserialised(service):
    job = service.raw_job()
    with Connection(service.redis_url) as connection:
        # If this body were decoded the job would run and get a state hash.
        connection.Producer().publish(
            [[job], {}, {}], routing_key="inpaint", serializer="pickle",
            headers={"task": schema.TASK_NAME, "id": job["job_id"], "lang": "py", "retries": 0})
    follower = service.send_raw(service.raw_job())
    assert wait_final(service, follower).state == schema.SUCCEEDED
    deadline = time.monotonic() + 30
    logs = ""
    while "Refusing to deserialize" not in logs and time.monotonic() < deadline:
        time.sleep(0.1)
        logs = "".join(worker.log_text() for worker in service.workers)
    assert "Refusing to deserialize untrusted content of type pickle" in logs
    assert not service.redis.exists(state.job_key(job["job_id"]))
    assert all(worker.poll() is None for worker in service.workers)


def test_job_without_usable_id_is_dropped_with_a_log(service):
    job = {**service.raw_job(), "job_id": "not-a-uuid"}
    service.send_raw(job)
    deadline = time.monotonic() + 30
    logs = ""
    while "job refused" not in logs and time.monotonic() < deadline:
        time.sleep(0.1)
        logs = "".join(worker.log_text() for worker in service.workers)
    assert "job refused" in logs
    assert not service.redis.exists(state.job_key("not-a-uuid"))


def test_cancel_of_a_queued_job(service):
    # Both workers busy with long jobs, so the third waits in the queue when it is canceled.
    busy = [service.client.submit(sample_image(), sample_mask(), "busy", num_inference_steps=60, scheduler="ddim",
                                  seed=i) for i in range(2)]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while any(service.client.status(job_id).step < 1 for job_id in busy) and time.monotonic() < deadline:
        time.sleep(0.05)
    queued = service.client.submit(sample_image(), sample_mask(), "never runs", num_inference_steps=2,
                                   scheduler="ddim", seed=5)
    service.client.cancel(queued)
    for job_id in busy:
        service.client.cancel(job_id)
    status = wait_final(service, queued)
    assert status.state == schema.CANCELED and status.error["code"] == schema.CANCELED_ERROR
    assert status.step == 0
    assert not service.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"jobs/{queued}/").get("Contents")
    assert all(wait_final(service, job_id).state == schema.CANCELED for job_id in busy)
    # Each cancel revokes the task on every worker, which once logged "No result backend is configured" (Celery
    # asked the disabled result backend for the state of each task it was not running).
    for worker in service.workers:
        assert "result backend" not in worker.log_text()


def test_worker_logs_are_one_json_object_per_line_celerys_included(service):
    for worker in service.workers:
        lines = worker.log_text().splitlines()
        assert not [line for line in lines if not line.startswith("{")], lines
        entries = [json.loads(line) for line in lines]
        loggers = {entry["logger"].split(".")[0] for entry in entries}
        assert {"celery", "inpaint"} <= loggers, loggers
