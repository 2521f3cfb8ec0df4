"""Promise 3: while S3 is unreachable, downloads and uploads retry with backoff; the job succeeds once it is back,
or fails with storage_unavailable after a bounded time; a partly uploaded job never reports a result."""
import hashlib
import time

from PIL import Image

from api_client import schema
from tests.reliability.conftest import BUCKET
from tests import devstack
from worker import jobs
from worker.events import JobStore
from worker.settings import Settings
from worker.storage import Storage

# The workers' retries: boto3's 3 tries per call, then INPAINT_MAX_RETRIES=3 task retries 0.5 s, 1 s, 2 s apart.
GIVE_UP_WITHIN_S = 45


def test_job_succeeds_after_a_short_outage(healthy_fleet):
    fleet = healthy_fleet
    fleet.proxy.cut()
    job_id = fleet.submit()
    fleet.wait_for(job_id, lambda status: status.attempt >= 1, timeout=30)
    time.sleep(2)
    fleet.proxy.restore()
    status = fleet.wait_final(job_id)
    assert status.state == schema.SUCCEEDED, status
    retries = [e for e in fleet.events(job_id) if e["type"] == "retry"]
    assert retries and all(e["data"]["error"]["code"] == schema.STORAGE_UNAVAILABLE for e in retries)
    for image in status.result["images"]:
        _, key = schema.parse_s3_uri("result", image["uri"])
        body = fleet.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == image["sha256"]


def test_job_fails_with_storage_unavailable_when_s3_stays_away(healthy_fleet):
    fleet = healthy_fleet
    fleet.proxy.cut()
    started = time.monotonic()
    job_id = fleet.submit()
    status = fleet.wait_final(job_id, timeout=GIVE_UP_WITHIN_S + 30)
    fleet.proxy.restore()
    assert time.monotonic() - started < GIVE_UP_WITHIN_S
    assert status.state == schema.FAILED and status.error["code"] == schema.STORAGE_UNAVAILABLE
    assert status.result is None and fleet.output_keys(job_id) == []
    # The workers serve again as soon as S3 is back.
    assert fleet.wait_final(fleet.submit()).state == schema.SUCCEEDED


class FlakyStorage(Storage):
    """Real S3; the first upload of image 1 fails, as if the connection dropped after image 0 was stored."""

    failed_once = False

    def write_once(self, bucket, key, body, content_type, metadata):
        if key.endswith("/1.png") and not self.failed_once:
            self.failed_once = True
            raise schema.JobError(schema.STORAGE_UNAVAILABLE, f"output: s3://{bucket}/{key}: connection reset")
        return super().write_once(bucket, key, body, content_type, metadata)


def solid_images(prompt, image, mask, callback=None, **options):
    callback(1, 1)
    return [Image.new("RGB", image.size, 40 * i) for i in range(options["num_images_per_prompt"])]


def test_partly_uploaded_outputs_are_never_reported(rel_redis, rel_s3, fleet):
    settings = Settings.from_env(devstack.worker_env(rel_redis.url, rel_s3.endpoint_url, BUCKET, "unused",
                                                     INPAINT_PROGRESS_INTERVAL_S="0"))
    store, storage = JobStore.from_settings(settings), FlakyStorage.from_settings(settings)
    runtime = jobs.Runtime(settings=settings, store=store, storage=storage, pipeline=lambda: solid_images)
    job = fleet.raw_job(num_images=2)

    first = jobs.run_job(job, runtime, worker="unit@rel", may_retry=True)
    assert first.status == jobs.RETRY
    status = store.status(job["job_id"])
    assert status.state == schema.RUNNING and status.result is None   # image 0 is stored, but nothing reported
    assert fleet.output_keys(job["job_id"]) == [f"jobs/{job['job_id']}/0.png"]

    second = jobs.run_job(job, runtime, worker="unit@rel", may_retry=True)
    assert second.status == jobs.SUCCEEDED
    status = store.status(job["job_id"])
    assert status.attempt == 2 and len(status.result["images"]) == 2
    store.redis.close()
