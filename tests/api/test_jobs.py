"""POST/GET/list/cancel jobs and their SSE events over HTTP, against a real worker (tests/api/conftest.py)."""
import base64
import hashlib
import json
import time

import httpx

from api_client import schema, state
from tests.api.conftest import IDLE_QUEUE, JOB_TIMEOUT_S, job_body


def read_sse(client: httpx.Client, job_id: str, last_event_id: str | None = None) -> list[tuple[str, dict]]:
    """(id, event) of every event of the stream until the server ends it; keep-alive comments are skipped."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events, entry_id = [], None
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("id: "):
                entry_id = line[4:]
            elif line.startswith("data: "):
                events.append((entry_id, json.loads(line[6:])))
    return events


def test_job_runs_over_http_with_wait_events_and_fresh_urls(stack, key_name):
    with stack.http(stack.new_key(key_name)) as client:
        response = client.post("/v1/jobs", json=job_body(num_images=2, seed=7), headers={"Prefer": "wait=60"})
        assert response.status_code == 201, response.text
        job = response.json()
        assert response.headers["Location"] == f"/v1/jobs/{job['id']}" == job["urls"]["self"]
        assert response.headers["Preference-Applied"] == "wait=60"
        assert job["state"] == schema.SUCCEEDED, job["error"]
        assert job["queue_position"] is None and job["attempt"] == 1 and job["step"] == job["total_steps"] == 2
        assert job["created_at"] <= job["started_at"] <= job["finished_at"]
        images = job["result"]["images"]
        assert [image["seed"] for image in images] == [7, 8]
        for image in images:   # presigned by the API: fetchable without credentials, the bytes of the sha256
            body = httpx.get(image["url"]).raise_for_status().content
            assert hashlib.sha256(body).hexdigest() == image["sha256"]

        assert client.get(f"/v1/jobs/{job['id']}").json()["result"]["images"][0]["sha256"] == images[0]["sha256"]
        events = read_sse(client, job["id"])
        states = [event["state"] for _, event in events]
        assert states[:2] == [schema.QUEUED, schema.RUNNING] and states[-1] == schema.SUCCEEDED
        ids = [entry_id for entry_id, _ in events]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == len(ids)
        # Resuming after the second event replays exactly what followed it.
        assert read_sse(client, job["id"], last_event_id=ids[1]) == events[2:]
        assert read_sse(client, job["id"], last_event_id=ids[-1]) == []


def test_events_stream_live_until_the_end(stack, key_name):
    with stack.http(stack.new_key(key_name)) as client:
        job = client.post("/v1/jobs", json=job_body(num_inference_steps=6)).json()
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            lines = list(response.iter_lines())
        data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        assert data[-1]["state"] == schema.SUCCEEDED
        assert [e["step"] for e in data if e["type"] == state.EVENT_PROGRESS][-1] == 6


def test_a_quiet_stream_sends_keepalives_and_still_ends(stack, key_name):
    # A job on a queue no worker reads stays quiet: the stream keeps it alive (INPAINT_API_KEEPALIVE_S, 0.2 s here)
    # until the job is canceled, then ends after the final state.
    with stack.http(stack.new_key(key_name, queues=(IDLE_QUEUE,))) as client:
        job = client.post("/v1/jobs", json=job_body(queue=IDLE_QUEUE)).json()
        lines = []
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            for line in response.iter_lines():
                lines.append(line)
                if line == ": keep-alive" and lines.count(line) == 1:
                    client.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
        data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        assert [event["state"] for event in data] == [schema.QUEUED, schema.CANCELED]
        assert lines.index(": keep-alive") < max(i for i, line in enumerate(lines) if line.startswith("data: "))


def test_queued_jobs_show_their_position_and_cancel(stack, key_name):
    queue = f"{IDLE_QUEUE}-{key_name}"   # a queue of this test's own: the positions count every message in it
    with stack.http(stack.new_key(key_name, queues=(queue, "inpaint"))) as client:
        first = client.post("/v1/jobs", json=job_body(queue=queue)).json()
        second = client.post("/v1/jobs", json=job_body(queue=queue)).json()
        urgent = client.post("/v1/jobs", json=job_body(queue=queue, priority=0)).json()
        assert (first["state"], first["queue"]) == (schema.QUEUED, queue)
        positions = [client.get(f"/v1/jobs/{job['id']}").json()["queue_position"] for job in (first, second, urgent)]
        assert positions == [1, 2, 0]   # priority 0 is served before the two at the default priority 5

        canceled = client.post(f"/v1/jobs/{first['id']}/cancel")
        assert canceled.status_code == 202
        assert canceled.json()["state"] == schema.CANCELED
        assert canceled.json()["error"]["code"] == schema.CANCELED_ERROR
        assert [e["state"] for _, e in read_sse(client, first["id"])] == [schema.QUEUED, schema.CANCELED]
        for job in (second, urgent):
            client.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()


def test_cancel_stops_a_running_job(stack, key_name):
    with stack.http(stack.new_key(key_name)) as client:
        job = client.post("/v1/jobs", json=job_body(num_inference_steps=60, scheduler="euler")).json()
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while client.get(f"/v1/jobs/{job['id']}").json()["step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        events = read_sse(client, job["id"])
        assert events[-1][1]["state"] == schema.CANCELED
        final = client.get(f"/v1/jobs/{job['id']}").json()
        assert final["state"] == schema.CANCELED and final["step"] < 60


def test_list_pages_newest_first_and_filters_by_state(stack, key_name):
    with stack.http(stack.new_key(key_name, queues=(IDLE_QUEUE,))) as client:
        ids = [client.post("/v1/jobs", json=job_body()).json()["id"] for _ in range(5)]
        client.post(f"/v1/jobs/{ids[0]}/cancel").raise_for_status()
        page = client.get("/v1/jobs", params={"limit": 2}).json()
        assert [job["id"] for job in page["jobs"]] == ids[::-1][:2]
        rest = client.get("/v1/jobs", params={"limit": 10, "cursor": page["next_cursor"]}).json()
        assert [job["id"] for job in rest["jobs"]] == ids[::-1][2:] and rest["next_cursor"] is None
        canceled = client.get("/v1/jobs", params={"state": "canceled"}).json()["jobs"]
        assert [job["id"] for job in canceled] == [ids[0]]
        for job_id in ids[1:]:
            client.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()


def test_uploads_are_presigned_puts_usable_as_inputs(stack, key_name):
    with stack.http(stack.new_key(key_name)) as client:
        uris = []
        for image in (job_body()["image"], job_body()["mask"]):
            upload = client.post("/v1/uploads", json={"content_type": "image/png"})
            assert upload.status_code == 201, upload.text
            upload = upload.json()
            body = base64.b64decode(image.split(",", 1)[1])
            httpx.put(upload["upload_url"], content=body, headers=upload["headers"]).raise_for_status()
            uris.append(upload["uri"])
        job = client.post("/v1/jobs", json=job_body(image=uris[0], mask=uris[1]), headers={"Prefer": "wait=60"})
        assert job.json()["state"] == schema.SUCCEEDED, job.text
        assert client.get("/v1/webhook-secret").json()["webhook_secret"].startswith("whsec_")
