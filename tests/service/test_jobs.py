"""worker.jobs.run_job with a real Redis and the moto S3 server, and pipelines handed in (no model, no worker)."""
import dataclasses
import hashlib
import io
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid

import boto3
import pytest
import torch
from botocore.config import Config
from PIL import Image

from api_client import schema, state
from tests.service.conftest import BUCKET, OTHER_BUCKET, sample_image, sample_mask
from tests import devstack
from worker import jobs
from worker.inference.denoise import InpaintCancelled
from worker.events import JobStore
from worker.inference.model.loader import ModelLoadError
from worker.inference.pipeline import InpaintArgumentError
from worker.settings import Settings
from worker.storage import Storage

WORKER = "unit@test"


class FakePipeline:
    """Calls back like the real pipeline and returns solid images; records its calls."""

    def __init__(self, error=None, step_seconds=0.0, errors_left=None):
        self.calls, self.error, self.step_seconds = [], error, step_seconds
        self.errors_left = errors_left  # raise `error` this many times, then succeed (None: always)
        self.releases = 0

    def __call__(self, prompt, image, mask, callback=None, **options):
        self.calls.append({"prompt": prompt, "image": image, "mask": mask, **options})
        total = options["num_inference_steps"]
        for step in range(1, total + 1):
            time.sleep(self.step_seconds)
            if callback(step, total) is False:
                raise InpaintCancelled("stopped by the callback")
        if self.error is not None and self.errors_left != 0:
            self.errors_left = None if self.errors_left is None else self.errors_left - 1
            raise self.error
        width, height = options["width"] or image.width, options["height"] or image.height
        return [Image.new("RGB", (width, height), (options["seed"] + i) % 256)
                for i in range(options["num_images_per_prompt"])]

    def release_memory(self):
        self.releases += 1


@pytest.fixture(scope="module")
def settings(redis_server, s3_server):
    env = devstack.worker_env(redis_server.url, s3_server.endpoint_url, BUCKET, "unused-model",
                              INPAINT_MAX_PIXELS=str(128 * 128), INPAINT_MAX_STEPS="20",
                              INPAINT_MAX_INPUT_BYTES=str(64 * 1024), INPAINT_PROGRESS_INTERVAL_S="0")
    return Settings.from_env(env)


@pytest.fixture(scope="module")
def store(settings):
    store = JobStore.from_settings(settings)
    yield store
    store.redis.close()


@pytest.fixture(scope="module")
def storage(settings):
    return Storage.from_settings(settings)


def runtime_with(settings, store, storage, pipeline) -> jobs.Runtime:
    return jobs.Runtime(settings=settings, store=store, storage=storage, pipeline=lambda: pipeline)


def put_png(storage, key: str, image: Image.Image, bucket: str = BUCKET) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    storage.client.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
    return f"s3://{bucket}/{key}"


def make_job(storage, **fields) -> dict:
    job_id = uuid.uuid4().hex
    image = fields.pop("image", None) or put_png(storage, f"in/{job_id}/image.png", sample_image())
    mask = fields.pop("mask", None) or put_png(storage, f"in/{job_id}/mask.png", sample_mask())
    return {"job_id": job_id, "image": image, "mask": mask, "prompt": "a red square", "num_inference_steps": 3,
            "seed": 7, "output": {"bucket": BUCKET, "format": "png"}, **fields}


def test_success_uploads_images_and_reports_the_result(settings, store, storage):
    job = make_job(storage, num_images=2, output={"bucket": BUCKET, "format": "webp"})
    pipeline = FakePipeline()
    outcome = jobs.run_job(job, runtime_with(settings, store, storage, pipeline), WORKER, may_retry=True)
    assert (outcome.status, outcome.attempt, outcome.steps, outcome.images) == (jobs.SUCCEEDED, 1, 3, 2)
    assert 0 <= outcome.queue_wait_s < 5 and 0 < outcome.denoise_s <= outcome.run_s
    status = store.status(job["job_id"])
    assert status.state == schema.SUCCEEDED and status.worker == WORKER and status.step == 3
    images = status.result["images"]
    assert [image["seed"] for image in images] == [7, 8]
    for index, image in enumerate(images):
        key = f"jobs/{job['job_id']}/{index}.webp"
        assert image["uri"] == f"s3://{BUCKET}/{key}" and (image["width"], image["height"]) == (64, 64)
        stored = storage.client.get_object(Bucket=BUCKET, Key=key)
        body = stored["Body"].read()
        assert stored["ContentType"] == "image/webp"
        assert stored["Metadata"] == {"job-id": job["job_id"], "seed": str(7 + index), "sha256": image["sha256"]}
        assert hashlib.sha256(body).hexdigest() == image["sha256"]
        with urllib.request.urlopen(image["url"], timeout=10) as response:   # the presigned URL works
            assert response.read() == body
    assert set(status.result["timings"]) == {"fetch_s", "model_s", "inference_s", "upload_s", "total_s"}
    call = pipeline.calls[0]
    assert call["num_images_per_prompt"] == 2 and call["keep_unmasked"] is True
    assert call["image"].mode == "RGB" and call["mask"].mode == "L"


def test_a_job_without_seed_gets_the_same_seed_on_every_attempt(storage):
    job = schema.Job.from_dict(make_job(storage, seed=None, num_images=3))
    assert jobs.job_seed(job) == jobs.job_seed(job)
    assert 0 <= jobs.job_seed(job) <= schema.MAX_SEED - 3   # what the pipeline accepts for 3 images
    other = schema.Job.from_dict(make_job(storage, seed=None))
    assert jobs.job_seed(other) != jobs.job_seed(job)


def test_finished_job_is_not_run_again(settings, store, storage):
    job = make_job(storage)
    pipeline = FakePipeline()
    runtime = runtime_with(settings, store, storage, pipeline)
    assert jobs.run_job(job, runtime, WORKER, may_retry=True).status == jobs.SUCCEEDED
    again = jobs.run_job(job, runtime, "another@test", may_retry=True)
    assert again.status == jobs.SKIPPED and len(pipeline.calls) == 1
    assert store.status(job["job_id"]).attempt == 1


def test_existing_output_wins_over_a_later_attempt(settings, store, storage):
    job = make_job(storage)
    key = f"jobs/{job['job_id']}/0.png"
    first = storage.write_once(BUCKET, key, b"first attempt", "image/png", {"job-id": job["job_id"]})
    assert first.written
    jobs.run_job(job, runtime_with(settings, store, storage, FakePipeline()), WORKER, may_retry=True)
    [image] = store.status(job["job_id"]).result["images"]
    assert storage.client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"first attempt"
    assert image["sha256"] == hashlib.sha256(b"first attempt").hexdigest()


def failed(store, job: dict) -> tuple[str, str]:
    status = store.status(job["job_id"])
    assert status.state == schema.FAILED, status
    return status.error["code"], status.error["message"]


@pytest.mark.parametrize("change, code, words", [
    ({"num_inference_steps": 21}, schema.LIMIT_EXCEEDED, "num_inference_steps"),
    ({"width": 256, "height": 256}, schema.LIMIT_EXCEEDED, "size"),
    ({"colour": "red"}, schema.INVALID_INPUT, "colour"),
    ({"image": "http://169.254.169.254/latest/meta-data"}, schema.INVALID_INPUT, "s3://"),
    ({"mask": f"s3://{OTHER_BUCKET}/mask.png"}, schema.INVALID_INPUT, OTHER_BUCKET),
    ({"output": {"bucket": OTHER_BUCKET}}, schema.INVALID_INPUT, "output.bucket"),
    ({"image": f"s3://{BUCKET}/no/such/key.png"}, schema.INPUT_NOT_FOUND, "no/such/key.png"),
    ({"guidance_scale": float("nan")}, schema.INVALID_INPUT, "guidance_scale"),
])
def test_bad_jobs_fail_before_the_pipeline_with_a_clear_code(settings, store, storage, change, code, words):
    job = make_job(storage, **change)
    pipeline = FakePipeline()
    outcome = jobs.run_job(job, runtime_with(settings, store, storage, pipeline), WORKER, may_retry=True)
    assert outcome.status == jobs.FAILED and outcome.error.code == code
    error_code, message = failed(store, job)
    assert error_code == code and words in message
    assert pipeline.calls == []


@pytest.mark.parametrize("name, body, code, words", [
    ("image", b"GIF89a not really", schema.INVALID_INPUT, "image: not a readable"),
    ("mask", b"\x00" * 100, schema.INVALID_INPUT, "mask: not a readable"),
    ("image", b"x" * (64 * 1024 + 1), schema.LIMIT_EXCEEDED, "INPAINT_MAX_INPUT_BYTES"),
])
def test_bad_input_files_fail(settings, store, storage, name, body, code, words):
    key = f"in/{uuid.uuid4().hex}/{name}"
    storage.client.put_object(Bucket=BUCKET, Key=key, Body=body)
    job = make_job(storage, **{name: f"s3://{BUCKET}/{key}"})
    jobs.run_job(job, runtime_with(settings, store, storage, FakePipeline()), WORKER, may_retry=True)
    error_code, message = failed(store, job)
    assert error_code == code and words in message


def test_gif_is_refused_even_when_it_is_a_real_image(settings, store, storage):
    buffer = io.BytesIO()
    sample_image().save(buffer, format="GIF")
    storage.client.put_object(Bucket=BUCKET, Key="in/real.gif", Body=buffer.getvalue())
    job = make_job(storage, image=f"s3://{BUCKET}/in/real.gif")
    jobs.run_job(job, runtime_with(settings, store, storage, FakePipeline()), WORKER, may_retry=True)
    assert failed(store, job)[0] == schema.INVALID_INPUT


def test_mask_of_another_size_fails(settings, store, storage):
    mask = put_png(storage, f"in/{uuid.uuid4().hex}/mask.png", sample_mask((32, 64)))
    job = make_job(storage, mask=mask)
    jobs.run_job(job, runtime_with(settings, store, storage, FakePipeline()), WORKER, may_retry=True)
    code, message = failed(store, job)
    assert code == schema.INVALID_INPUT and "32x64" in message and "64x64" in message


def test_image_over_the_pixel_limit_fails_before_decoding(settings, store, storage):
    image = put_png(storage, f"in/{uuid.uuid4().hex}/big.png", Image.new("RGB", (256, 256)))
    job = make_job(storage, image=image)
    jobs.run_job(job, runtime_with(settings, store, storage, FakePipeline()), WORKER, may_retry=True)
    assert failed(store, job)[0] == schema.LIMIT_EXCEEDED


def test_decompression_bomb_is_an_error_not_a_warning():
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, format="PNG")   # 144 Mpx in a few kB: over Pillow's bomb limit
    with pytest.raises(schema.JobError) as caught:
        jobs.decode_image("image", buffer.getvalue(), max_pixels=10**9)
    assert caught.value.code == schema.LIMIT_EXCEEDED


def test_pipeline_argument_error_is_invalid_input_and_other_errors_internal(settings, store, storage):
    job = make_job(storage)
    bad_size = FakePipeline(error=InpaintArgumentError("height: 60 is not a multiple of 16"))
    jobs.run_job(job, runtime_with(settings, store, storage, bad_size), WORKER, may_retry=True)
    assert failed(store, job) == (schema.INVALID_INPUT, "height: 60 is not a multiple of 16")
    for error in (RuntimeError("CUDA error: secret internals"), ValueError("secret: a bug inside torch")):
        job = make_job(storage)
        jobs.run_job(job, runtime_with(settings, store, storage, FakePipeline(error=error)), WORKER, may_retry=True)
        code, message = failed(store, job)
        assert code == schema.INTERNAL and "secret" not in message



def test_out_of_gpu_memory_frees_the_caches_and_runs_the_job_once_more(settings, store, storage):
    job = make_job(storage)
    pipeline = FakePipeline(error=torch.OutOfMemoryError("CUDA out of memory"), errors_left=1)
    outcome = jobs.run_job(job, runtime_with(settings, store, storage, pipeline), WORKER, may_retry=True)
    assert outcome.status == jobs.SUCCEEDED and len(pipeline.calls) == 2 and pipeline.releases == 1


def test_out_of_gpu_memory_twice_fails_as_too_large_for_the_gpu(settings, store, storage):
    job = make_job(storage, num_images=2)
    pipeline = FakePipeline(error=torch.OutOfMemoryError("CUDA out of memory"))
    outcome = jobs.run_job(job, runtime_with(settings, store, storage, pipeline), WORKER, may_retry=True)
    assert outcome.status == jobs.FAILED and len(pipeline.calls) == 2
    assert pipeline.releases == 2  # the second time for the jobs that follow
    code, message = failed(store, job)
    assert code == schema.LIMIT_EXCEEDED and "out of GPU memory at 64x64, 2 image(s)" in message

def test_cancel_flag_stops_the_run_as_canceled(settings, store, storage):
    job = make_job(storage, num_inference_steps=10)
    store.redis.set(state.cancel_key(job["job_id"]), "1", ex=60)
    jobs.run_job(job, runtime_with(settings, store, storage, FakePipeline()), WORKER, may_retry=True)
    status = store.status(job["job_id"])
    assert status.state == schema.CANCELED and status.error["code"] == schema.CANCELED_ERROR
    assert not storage.client.list_objects_v2(Bucket=BUCKET, Prefix=f"jobs/{job['job_id']}/").get("Contents")


def test_soft_time_limit_between_steps_fails_with_timeout(settings, store, storage):
    job = make_job(storage, num_inference_steps=10)
    quick = dataclasses.replace(settings, soft_time_limit_s=1, time_limit_s=2)
    jobs.run_job(job, runtime_with(quick, store, storage, FakePipeline(step_seconds=0.4)), WORKER, may_retry=True)
    assert failed(store, job)[0] == schema.TIMEOUT
    assert store.status(job["job_id"]).step < 10


def test_model_load_failure_is_model_unavailable_and_retried(settings, store, storage):
    def broken_load():
        raise ModelLoadError("model: /models/sd has no unet/config.json")

    holder = jobs.PipelineHolder(broken_load)
    runtime = jobs.Runtime(settings=settings, store=store, storage=storage, pipeline=holder.get)
    job = make_job(storage)
    first = jobs.run_job(job, runtime, WORKER, may_retry=True)
    assert first.status == jobs.RETRY and first.error.code == schema.MODEL_UNAVAILABLE
    assert store.status(job["job_id"]).state == schema.RUNNING
    last = jobs.run_job(job, runtime, "other@test", may_retry=False)
    assert (last.status, last.attempt) == (jobs.FAILED, 2)
    assert failed(store, job)[0] == schema.MODEL_UNAVAILABLE


def test_any_model_load_error_is_model_unavailable_and_retried_by_the_next_get():
    loads = []

    def load():
        loads.append(1)
        if len(loads) == 1:
            raise ValueError("unet/config.json: sample_size is not an integer")
        return "pipeline"

    holder = jobs.PipelineHolder(load)
    with pytest.raises(schema.JobError) as caught:
        holder.get()
    assert caught.value.code == schema.MODEL_UNAVAILABLE and "sample_size is not an integer" in caught.value.message
    assert holder.get() == "pipeline"


class TakeOverAt(FakePipeline):
    """Another attempt claims the job (as after a missed lease) when step `at` is reached."""

    def __init__(self, store, job_id, at, step_seconds=0.0):
        super().__init__(step_seconds=step_seconds)
        self.store, self.job_id, self.at, self.last_step = store, job_id, at, 0

    def __call__(self, prompt, image, mask, callback=None, **options):
        def take_over(step, total):
            self.last_step = step
            if step == self.at:
                self.store.redis.hincrby(state.job_key(self.job_id), "attempt", 1)
            return callback(step, total)
        return super().__call__(prompt, image, mask, callback=take_over, **options)


def end_the_taken_over_job(store, job_id: str) -> None:
    """The attempt that took the job over never runs here: end the job, or the watchdog of a later test's workers
    (same Redis) would find its lease expired and run it, keeping them from answering while they start."""
    assert store.finish(job_id, schema.CANCELED, error={"code": schema.CANCELED_ERROR, "message": "test over"})


def test_an_attempt_whose_lease_was_taken_over_stops_and_records_nothing(settings, store, storage):
    job = make_job(storage, num_inference_steps=20)
    beating = dataclasses.replace(settings, lease_s=1.0, heartbeat_s=0.05)
    pipeline = TakeOverAt(store, job["job_id"], at=2, step_seconds=0.05)
    outcome = jobs.run_job(job, runtime_with(beating, store, storage, pipeline), WORKER, may_retry=True)
    assert (outcome.status, outcome.steps, outcome.images) == (jobs.SKIPPED, 0, 0)
    assert pipeline.last_step < 20   # the denoise loop was stopped, not run to its end
    status = store.status(job["job_id"])
    assert (status.state, status.attempt, status.error) == (schema.RUNNING, 2, None)
    end_the_taken_over_job(store, job["job_id"])


def test_a_refused_final_write_is_not_counted_as_success(settings, store, storage):
    job = make_job(storage)
    pipeline = TakeOverAt(store, job["job_id"], at=3)   # the last step: the heartbeat has no time to notice
    outcome = jobs.run_job(job, runtime_with(settings, store, storage, pipeline), WORKER, may_retry=True)
    assert (outcome.status, outcome.images) == (jobs.SKIPPED, 0)
    status = store.status(job["job_id"])
    assert (status.state, status.attempt, status.result) == (schema.RUNNING, 2, None)
    end_the_taken_over_job(store, job["job_id"])


def test_pipeline_is_loaded_once():
    loads = []
    holder = jobs.PipelineHolder(lambda: loads.append(1) or "pipeline")
    assert holder.get() == holder.get() == "pipeline" and len(loads) == 1


def test_storage_outage_is_retried_then_fails(settings, store, storage):
    job = make_job(storage)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{devstack.free_port()}",
                          config=Config(retries={"mode": "standard", "max_attempts": 1}))
    down = Storage(client, {BUCKET}, settings.max_input_bytes, settings.presign_expiry_s)
    runtime = runtime_with(settings, store, down, FakePipeline())
    assert jobs.run_job(job, runtime, WORKER, may_retry=True).status == jobs.RETRY
    assert jobs.run_job(job, runtime, WORKER, may_retry=False).status == jobs.FAILED
    assert failed(store, job)[0] == schema.STORAGE_UNAVAILABLE


def test_a_missing_bucket_is_named_with_its_endpoint_and_how_to_create_it(settings, s3_server):
    missing = Storage.from_settings(dataclasses.replace(settings, allowed_buckets="no-such-bucket"))
    where = (f"'no-such-bucket' does not exist at {s3_server.endpoint_url}; create it "
             "(e.g. `aws s3 mb s3://no-such-bucket")
    with pytest.raises(schema.JobError) as reading:
        missing.read("image", "no-such-bucket", "in/image.png")
    with pytest.raises(schema.JobError) as writing:
        missing.write_once("no-such-bucket", "jobs/x/0.png", b"png", "image/png", {})
    assert reading.value.code == schema.INPUT_NOT_FOUND and where in reading.value.message
    assert writing.value.code == schema.STORAGE_UNAVAILABLE and where in writing.value.message


def test_job_without_a_usable_id_is_refused_and_nothing_written(settings, store, storage):
    runtime = runtime_with(settings, store, storage, FakePipeline())
    for raw in ({"job_id": "../../etc"}, ["not", "a", "dict"], {"prompt": "no id"}):
        outcome = jobs.run_job(raw, runtime, WORKER, may_retry=True)
        assert outcome.status == jobs.REJECTED and outcome.error.code == schema.INVALID_INPUT
    assert not store.redis.exists(state.job_key("../../etc"))


def test_retry_delay_doubles_up_to_the_cap(settings):
    capped = dataclasses.replace(settings, retry_backoff_s=1.0, retry_backoff_max_s=5.0)
    assert [jobs.retry_delay_s(capped, n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]



def test_hard_time_limit_calls_back_only_when_the_body_outlives_it():
    fired = []
    with jobs.hard_time_limit(0.1, lambda: fired.append("late")):
        time.sleep(0.4)
    with jobs.hard_time_limit(0.3, lambda: fired.append("early")):
        pass
    time.sleep(0.5)
    assert fired == ["late"]


def test_a_job_stuck_past_the_hard_limit_is_failed_and_its_process_ends(redis_server, s3_server, store, storage):
    # The solo pool enforces no time limit: the task's own timer records the timeout and ends the process.
    job = make_job(storage)
    env = {**os.environ, **devstack.worker_env(redis_server.url, s3_server.endpoint_url, BUCKET, "unused-model",
                                               INPAINT_TIME_LIMIT_S="2", INPAINT_SOFT_TIME_LIMIT_S="1")}
    stuck = textwrap.dedent(f"""
        import time
        from worker import jobs, tasks
        with jobs.hard_time_limit(1, lambda: tasks._end_at_hard_limit({{"job_id": "{job['job_id']}"}})):
            time.sleep(60)  # a wedged GPU call
    """)
    store.claim(job["job_id"], WORKER, 30, None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", stuck], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 124, done.stderr[-2000:]
    assert time.monotonic() - started < 30
    assert failed(store, job)[0] == schema.TIMEOUT
