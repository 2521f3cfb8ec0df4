"""End to end, on the API tests' shared stack (conftest.py: redis-server, moto S3, a worker on the tiny model, an
`inpaint-api` process whose lifespan runs the webhook dispatcher): a job submitted over HTTP with a webhook; the
local receiver gets `job.completed` with the job object, every signature verified by the `standardwebhooks` package
with the key's secret from GET /v1/webhook-secret. And a submit whose webhook points at a refused address is 422."""
import time

from tests.api.conftest import JOB_TIMEOUT_S, job_body
from tests.api.receiver import WebhookReceiver

# The stack's INPAINT_WEBHOOK_BACKOFF_S is the default (10 s): the retry of the failed first POST comes within it.
RETRY_WAIT_S = 15


def test_a_job_submitted_over_http_calls_its_webhook_when_it_completes(stack, key_name):
    with stack.http(stack.new_key(key_name)) as http:
        receiver = WebhookReceiver(http.get("/v1/webhook-secret").json()["webhook_secret"], answers=[500])
        try:
            answer = http.post("/v1/jobs", json=job_body(webhook=receiver.url(),
                                                         webhook_events_filter=["start", "completed"]))
            assert answer.status_code == 201, answer.text
            job_id = answer.json()["id"]
            assert answer.json()["webhook"] == {"url": receiver.url(), "events": ["start", "completed"],
                                                "state": "pending", "attempts": 0}
            receiver.wait_for(3, timeout=JOB_TIMEOUT_S + RETRY_WAIT_S)   # start, completed, the retried one
            time.sleep(1.0)   # a duplicate would come now
            deliveries = list(receiver.deliveries)
        finally:
            receiver.close()
        shown = http.get(f"/v1/jobs/{job_id}").json()["webhook"]
    assert all(d.payload is not None for d in deliveries)   # every signature verified
    assert sorted(d.payload["type"] for d in deliveries[1:]) == ["job.completed", "job.start"]
    assert len(deliveries) == 3 and deliveries[0].msg_id in {d.msg_id for d in deliveries[1:]}   # failed, retried
    completed = next(d.payload for d in deliveries if d.payload["type"] == "job.completed")
    job = completed["data"]
    assert job["id"] == job_id and job["state"] == "succeeded" and job["urls"]["self"] == f"/v1/jobs/{job_id}"
    assert len(job["result"]["images"]) == 1 and job["result"]["images"][0]["url"].startswith("http")
    assert shown == {"url": receiver.url(), "events": ["start", "completed"], "state": "delivered", "attempts": 3}


def test_a_webhook_to_a_refused_address_is_a_422(stack, key_name):
    with stack.http(stack.new_key(key_name)) as http:
        answer = http.post("/v1/jobs", json=job_body(webhook="http://169.254.169.254/latest/meta-data"))
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "invalid_input"
    assert error["message"].startswith("webhook: 169.254.169.254 is a link-local address")
