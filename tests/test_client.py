"""api_client.client against a real redis-server and a moto S3 server (tests.devstack); no Celery worker runs here,
so the tests read what the client left on the queue and play the worker's part through its state store."""
import asyncio
import base64
import io
import json
import re
import subprocess
import sys
import uuid

import boto3
import pytest
import redis
from PIL import Image

from api_client import schema, state
from api_client.client import AsyncInpaintClient, ClientConfig, EnqueueError, InpaintClient
from tests import devstack
from worker.events import JobStore

BUCKET = "client-tests"
QUEUE = "inpaint-client-tests"


@pytest.fixture(scope="module")
def services():
    with pytest.MonkeyPatch.context() as env:
        redis_server = devstack.start_redis()
        s3_server = devstack.start_s3()
        for name, value in s3_server.env.items():
            env.setenv(name, value)
        devstack.create_bucket(s3_server.endpoint_url, BUCKET)
        yield redis_server, s3_server
        s3_server.stop()
        redis_server.stop()


@pytest.fixture
def store(services):
    """A Redis connection to the test server, emptied after each test."""
    connection = redis.Redis.from_url(services[0].url, decode_responses=True)
    yield connection
    connection.flushdb()
    connection.close()


@pytest.fixture
def client(services, store):
    with InpaintClient(broker_url=services[0].url, s3_endpoint_url=services[1].endpoint_url, bucket=BUCKET,
                       queue=QUEUE) as instance:
        yield instance


@pytest.fixture
def s3(services):
    return boto3.client("s3", endpoint_url=services[1].endpoint_url)


def picture(color=(200, 40, 40), size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    picture().save(buffer, format="GIF")
    return buffer.getvalue()


def stored_keys(s3) -> list[str]:
    return [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def queued_messages(store) -> list[dict]:
    """Every message waiting on the test queue (all priority lists), decoded."""
    keys = [key for key in store.keys(f"{QUEUE}*")]
    return [json.loads(raw) for key in keys for raw in store.lrange(key, 0, -1)]


def task_args(message: dict) -> list:
    assert message["content-type"] == "application/json"
    assert message["properties"]["body_encoding"] == "base64"
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert kwargs == {}
    return args


def finish(store, job_id: str, final_state: str, result: dict | None = None, error: dict | None = None) -> None:
    """Play the worker: write a final state and its event through the worker's state store."""
    assert JobStore(store).finish(job_id, final_state, error=error, result=result)


def test_submit_uploads_inputs_records_queued_and_enqueues_json(client, store, s3):
    image, mask = picture(), picture((255, 255, 255))
    job_id = client.submit(image, png_bytes(mask), "a red door", num_inference_steps=4, seed=7, priority=2)

    [message] = queued_messages(store)
    assert message["headers"]["task"] == schema.TASK_NAME == "inpaint.run"
    assert message["headers"]["id"] == job_id
    [job] = task_args(message)
    assert schema.Job.from_dict(job).to_dict() == job
    assert job["image"] == f"s3://{BUCKET}/inputs/{job_id}/image.png"
    assert job["mask"] == f"s3://{BUCKET}/inputs/{job_id}/mask.png"
    assert (job["num_inference_steps"], job["seed"], job["priority"]) == (4, 7, 2)
    assert job["output"] == {"bucket": BUCKET, "prefix": f"jobs/{job_id}/", "format": "png"}

    stored = s3.get_object(Bucket=BUCKET, Key=f"inputs/{job_id}/image.png")
    assert stored["ContentType"] == "image/png"
    assert Image.open(io.BytesIO(stored["Body"].read())).getpixel((3, 3)) == (200, 40, 40)
    assert s3.get_object(Bucket=BUCKET, Key=f"inputs/{job_id}/mask.png")["Body"].read() == png_bytes(mask)

    status = client.status(job_id)
    assert (status.state, status.step, status.attempt) == (schema.QUEUED, 0, 0)
    assert json.loads(store.hget(state.job_key(job_id), "job")) == job
    assert 0 < store.ttl(state.job_key(job_id)) <= state.STATE_TTL_SECONDS
    [(_, event)] = store.xrange(state.job_events_key(job_id))
    assert state.parse_event(event)["state"] == schema.QUEUED
    assert store.xlen(state.EVENTS_STREAM) == 1


def test_duplicate_submit_does_not_enqueue_again(client, store, tmp_path):
    path = tmp_path / "image.png"
    picture().save(path)
    job_id = uuid.uuid4().hex
    assert client.submit(path, picture((255, 255, 255)), "first", job_id=job_id) == job_id
    finish(store, job_id, schema.SUCCEEDED)

    assert client.submit(str(path), picture(), "second", job_id=job_id) == job_id
    assert len(queued_messages(store)) == 1
    assert client.status(job_id).state == schema.SUCCEEDED


def test_s3_inputs_are_passed_through_without_upload(client, store, s3):
    job_id = client.submit(f"s3://{BUCKET}/elsewhere/a.png", f"s3://{BUCKET}/elsewhere/m.png", "p",
                           output_format="webp")
    [job] = task_args(queued_messages(store)[0])
    assert (job["image"], job["mask"]) == (f"s3://{BUCKET}/elsewhere/a.png", f"s3://{BUCKET}/elsewhere/m.png")
    assert job["output"]["format"] == "webp"
    assert not [key for key in stored_keys(s3) if job_id in key]


@pytest.mark.parametrize("image, options, message", [
    (picture(), {"num_inference_steps": 0}, "num_inference_steps"),
    (picture(), {"colour": "red"}, "unknown field(s) colour"),
    (picture(), {"scheduler": "warp"}, "scheduler"),
    (picture(), {"job_id": "not-a-uuid"}, "job_id"),
    (picture(), {"output_format": "gif"}, "output.format"),
    (b"not an image", {}, "image: not a readable PNG, JPEG, WEBP image"),
    ("/nonexistent/image.png", {}, "image: no such file"),
    (gif_bytes(), {}, "image: not a readable PNG, JPEG, WEBP image"),
    (42, {}, "image: expected a PIL image, bytes, a path or an s3:// URI"),
    ("s3://Bad_Bucket/key.png", {}, "image"),
])
def test_invalid_jobs_fail_before_anything_is_sent(client, store, s3, image, options, message):
    uploaded_before = stored_keys(s3)
    with pytest.raises(ValueError, match=re.escape(message)):
        client.submit(image, picture(), "a prompt", **options)
    assert store.dbsize() == 0
    assert stored_keys(s3) == uploaded_before


def test_submit_without_bucket_names_the_setting(services):
    with InpaintClient(broker_url=services[0].url, s3_endpoint_url=services[1].endpoint_url) as no_bucket:
        with pytest.raises(ValueError, match="INPAINT_BUCKET"):
            no_bucket.submit(picture(), picture(), "p")


def test_a_missing_bucket_is_named_with_its_endpoint_and_how_to_create_it(services, store):
    endpoint = services[1].endpoint_url
    with InpaintClient(broker_url=services[0].url, s3_endpoint_url=endpoint, bucket="no-such-bucket") as client:
        with pytest.raises(schema.JobError) as caught:
            client.submit(picture(), picture(), "p")
    assert caught.value.code == schema.STORAGE_UNAVAILABLE
    assert caught.value.message.startswith(f"bucket 'no-such-bucket' does not exist at {endpoint}; create it (e.g. "
                                           f"`aws s3 mb s3://no-such-bucket --endpoint-url {endpoint}`")
    assert store.dbsize() == 0


def test_failed_enqueue_raises_and_leaves_the_job_resubmittable(services, store, client):
    dead_broker = f"redis://127.0.0.1:{devstack.free_port()}/0"
    with InpaintClient(broker_url=dead_broker, state_url=services[0].url,
                       s3_endpoint_url=services[1].endpoint_url, bucket=BUCKET, queue=QUEUE) as offline:
        job_id = uuid.uuid4().hex
        with pytest.raises(EnqueueError, match="could not send job"):
            offline.submit(picture(), picture(), "p", job_id=job_id)
    assert offline.config.state_url == services[0].url
    assert not store.exists(state.job_key(job_id))
    assert client.submit(picture(), picture(), "p", job_id=job_id) == job_id
    assert len(queued_messages(store)) == 1


def test_unknown_job_is_expired_and_has_no_events(client):
    job_id = uuid.uuid4().hex
    assert client.status(job_id).state == schema.EXPIRED
    assert list(client.events(job_id, timeout=5)) == []
    assert client.wait(job_id, timeout=5).state == schema.EXPIRED


def test_events_and_wait_follow_the_stream_to_the_final_state(client, store):
    job_id = client.submit(picture(), picture(), "p")
    worker_store = JobStore(store)
    attempt = worker_store.claim(job_id, "w1", lease_s=60, job=None).attempt
    for step in (1, 2):
        assert worker_store.progress(job_id, attempt, step, 2)
    finish(store, job_id, schema.SUCCEEDED, result={"images": []})
    stream = state.job_events_key(job_id)
    first_progress = store.xrange(stream)[2][1]
    store.xadd(stream, first_progress)  # appended after the end: not read

    events = list(client.events(job_id, timeout=5))
    assert [(e["type"], e["state"], e["step"]) for e in events] == [
        ("state", "queued", 0), ("state", "running", 0), ("progress", "running", 1), ("progress", "running", 2),
        ("state", "succeeded", 2)]
    assert events[-1]["data"] == {"result": {"images": []}}
    assert client.wait(job_id, timeout=5).state == schema.SUCCEEDED


def test_events_end_when_the_hash_is_final_but_the_stream_lacks_the_end(client, store):
    job_id = client.submit(picture(), picture(), "p")
    store.hset(state.job_key(job_id), "state", schema.FAILED)
    assert [e["state"] for e in client.events(job_id, timeout=5)] == [schema.QUEUED]


def test_wait_times_out(client):
    job_id = client.submit(picture(), picture(), "p")
    with pytest.raises(TimeoutError, match=job_id):
        client.wait(job_id, timeout=0.2)


def test_fetch_and_download_read_the_result_images(client, store, s3, tmp_path):
    job_id = client.submit(picture(), picture(), "p")
    keys = [f"jobs/{job_id}/{i}.png" for i in range(2)]
    for key, color in zip(keys, ((1, 2, 3), (4, 5, 6))):
        s3.put_object(Bucket=BUCKET, Key=key, Body=png_bytes(picture(color, (16, 8))))
    finish(store, job_id, schema.SUCCEEDED, result={"images": [{"uri": f"s3://{BUCKET}/{k}"} for k in keys]})

    images = client.fetch(job_id)
    assert [(im.size, im.getpixel((0, 0))) for im in images] == [((16, 8), (1, 2, 3)), ((16, 8), (4, 5, 6))]
    paths = client.download(job_id, tmp_path / "out")
    assert [p.name for p in paths] == [f"{job_id}-0.png", f"{job_id}-1.png"]
    assert paths[1].read_bytes() == png_bytes(picture((4, 5, 6), (16, 8)))


def test_fetch_of_an_unfinished_job_says_so(client):
    job_id = client.submit(picture(), picture(), "p")
    with pytest.raises(ValueError, match="the job is queued"):
        client.fetch(job_id)


def test_cancel_of_a_queued_job_ends_it_at_once(client, store):
    job_id = client.submit(picture(), picture(), "p")
    assert client.cancel(job_id) == schema.QUEUED
    assert store.exists(state.cancel_key(job_id))
    status = client.wait(job_id, timeout=5)
    assert status.state == schema.CANCELED
    assert status.error["code"] == schema.CANCELED_ERROR


def test_cancel_of_a_running_job_only_sets_the_flag(client, store):
    job_id = client.submit(picture(), picture(), "p")
    store.hset(state.job_key(job_id), "state", schema.RUNNING)
    assert client.cancel(job_id) == schema.RUNNING
    assert store.get(state.cancel_key(job_id)) == "1"
    assert client.status(job_id).state == schema.RUNNING


def test_cancel_of_an_unknown_job_changes_nothing(client, store):
    job_id = uuid.uuid4().hex
    assert client.cancel(job_id) == schema.EXPIRED
    assert store.dbsize() == 0   # no flag, no hash, no event


@pytest.mark.parametrize("final_state", [schema.SUCCEEDED, schema.FAILED, schema.CANCELED])
def test_cancel_of_a_finished_job_leaves_it_as_it_was(client, store, final_state):
    job_id = client.submit(picture(), picture(), "p")
    if final_state == schema.CANCELED:
        client.cancel(job_id)
        store.delete(state.cancel_key(job_id))
    else:
        finish(store, job_id, final_state)
    before = (store.hgetall(state.job_key(job_id)), store.xlen(state.job_events_key(job_id)),
              store.xlen(state.EVENTS_STREAM))
    assert client.cancel(job_id) == final_state
    assert (store.hgetall(state.job_key(job_id)), store.xlen(state.job_events_key(job_id)),
            store.xlen(state.EVENTS_STREAM)) == before
    assert not store.exists(state.cancel_key(job_id))


def test_config_from_env_reads_the_worker_variables():
    config = ClientConfig.from_env({"INPAINT_BROKER_URL": "redis://b:1/0", "INPAINT_STATE_URL": "redis://s:2/1",
                                    "INPAINT_S3_ENDPOINT_URL": "http://s3:9000", "INPAINT_BUCKET": "bk",
                                    "INPAINT_QUEUE": "q", "INPAINT_STATE_TTL_S": "120"})
    assert config == ClientConfig("redis://b:1/0", "redis://s:2/1", "http://s3:9000", "bk", "q", 120,
                                  state.EVENTS_STREAM_MAXLEN)
    assert ClientConfig.from_env({}) == ClientConfig()
    limits = ClientConfig.from_env({"INPAINT_MAX_PIXELS": "4096", "INPAINT_MAX_STEPS": "20", "INPAINT_MAX_IMAGES": "2",
                                    "INPAINT_MAX_PROMPT_CHARS": "10"}).limits   # the workers' limits, checked first
    assert limits == schema.Limits(max_pixels=4096, max_steps=20, max_images=2, max_prompt_chars=10)
    with pytest.raises(ValueError, match="INPAINT_EVENTS_MAXLEN"):
        ClientConfig.from_env({"INPAINT_EVENTS_MAXLEN": "many"})


def test_async_client_submits_follows_and_fetches(services, store, s3):
    async def scenario():
        async with AsyncInpaintClient(broker_url=services[0].url, s3_endpoint_url=services[1].endpoint_url,
                                      bucket=BUCKET, queue=QUEUE) as client:
            job_id = await client.submit(picture(), picture(), "p", num_images=1)
            assert await client.submit(picture(), picture(), "p", job_id=job_id) == job_id
            key = f"jobs/{job_id}/0.png"
            s3.put_object(Bucket=BUCKET, Key=key, Body=png_bytes(picture((9, 9, 9))))
            finish(store, job_id, schema.SUCCEEDED, result={"images": [{"uri": f"s3://{BUCKET}/{key}"}]})
            states = [event["state"] async for event in client.events(job_id, timeout=5)]
            status = await client.wait(job_id, timeout=5)
            images = await client.fetch(job_id)
            other = await client.submit(picture(), picture(), "p")
            assert await client.cancel(other) == schema.QUEUED
            assert await client.cancel(other) == schema.CANCELED
            return job_id, states, status, images, await client.status(other)

    job_id, states, status, images, canceled = asyncio.run(scenario())
    assert states == [schema.QUEUED, schema.SUCCEEDED]
    assert status.state == schema.SUCCEEDED
    assert [im.getpixel((0, 0)) for im in images] == [(9, 9, 9)]
    assert canceled.state == schema.CANCELED
    assert len(queued_messages(store)) == 2


def test_client_imports_where_torch_cannot():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['worker'] = None\n"
            "import api_client, api_client.client, api_client.cli\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'worker', 'kernels')"
            " and sys.modules[m] is not None))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_submit_refuses_an_output_it_would_override(client):
    with pytest.raises(ValueError, match="output_format"):
        client.submit(png_bytes(picture()), png_bytes(picture()), "p", output={"bucket": "elsewhere"})
