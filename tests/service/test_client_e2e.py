"""The client against real workers (tests/service/conftest.py: redis-server, moto S3, two `inpaint-worker`
processes on the tiny model): submit -> events -> wait -> fetch, cancel mid-run, the asyncio client."""
import asyncio

from api_client import schema, state
from api_client.client import AsyncInpaintClient
from tests.service.conftest import BUCKET, sample_image, sample_mask

JOB_TIMEOUT_S = 120


def test_submit_wait_fetch(service):
    client = service.client
    job_id = client.submit(sample_image(), sample_mask(), "a red square", num_inference_steps=3, scheduler="ddim",
                           seed=5, num_images=2)
    events = list(client.events(job_id, timeout=JOB_TIMEOUT_S))
    status = client.wait(job_id, timeout=JOB_TIMEOUT_S)

    assert status.state == schema.SUCCEEDED, status.error
    assert [e["state"] for e in events][:2] == [schema.QUEUED, schema.RUNNING]
    assert events[-1]["state"] == schema.SUCCEEDED
    progress = [e["step"] for e in events if e["type"] == state.EVENT_PROGRESS]
    assert progress == sorted(progress) and progress[-1] == status.total_steps > 0
    assert [image["seed"] for image in status.result["images"]] == [5, 6]
    assert [image["uri"] for image in status.result["images"]] == [
        f"s3://{BUCKET}/jobs/{job_id}/{i}.png" for i in range(2)]

    images = client.fetch(job_id)
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    # keep_unmasked (the default) pastes the original back outside the mask.
    assert images[0].convert("RGB").getpixel((60, 60)) == sample_image().getpixel((60, 60))

    # Submitting the same job_id again neither re-runs nor re-queues it.
    assert client.submit(sample_image(), sample_mask(), "again", job_id=job_id) == job_id
    assert client.wait(job_id, timeout=5).attempt == status.attempt == 1
    assert len(service.events(job_id)) == len(events)


def test_cancel_stops_a_running_job(service):
    client = service.client
    job_id = client.submit(sample_image(), sample_mask(), "slow", num_inference_steps=60, scheduler="euler",
                           seed=1)
    for event in client.events(job_id, timeout=JOB_TIMEOUT_S):
        if event["type"] == state.EVENT_PROGRESS:
            client.cancel(job_id)
            break
    status = client.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert status.state == schema.CANCELED
    assert status.error["code"] == schema.CANCELED_ERROR
    assert status.step < status.total_steps == 60


def test_async_client_end_to_end(service, tmp_path):
    async def scenario():
        async with AsyncInpaintClient(broker_url=service.redis_url, s3_endpoint_url=service.s3_endpoint_url,
                                      bucket=BUCKET) as client:
            job_id = await client.submit(sample_image(), sample_mask(), "async", num_inference_steps=2, seed=3,
                                         output_format="webp")
            states = [event["state"] async for event in client.events(job_id, timeout=JOB_TIMEOUT_S)]
            status = await client.wait(job_id, timeout=JOB_TIMEOUT_S)
            return states, status, await client.fetch(job_id), await client.download(job_id, tmp_path)

    states, status, images, files = asyncio.run(scenario())
    assert status.state == schema.SUCCEEDED, status.error
    assert states[0] == schema.QUEUED and states[-1] == schema.SUCCEEDED
    assert [(image.format, image.size) for image in images] == [("WEBP", (64, 64))]
    assert [f.name for f in files] == [f"{status.job_id}-0.webp"]
