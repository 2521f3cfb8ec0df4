"""The verification examples of docs/webhooks.md accept what the dispatcher signs and refuse anything else: the
Node.js one (examples/verify_webhook.mjs, node:crypto only) and the Python receiver (examples/webhook_receiver.py,
the standardwebhooks package)."""
import base64
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from api import webhooks
from tests import devstack

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
BODY = webhooks.webhook_body("completed", time.time(), {"id": "0123456789abcdef0123456789abcdef",
                                                        "state": "succeeded"})


def node_verify(secret: str, headers: dict, body: str) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(ROOT / "examples" / "verify_webhook.mjs")], capture_output=True, text=True,
                          input=json.dumps({"secret": secret, "headers": headers, "body": body}), timeout=60)


def test_node_example_accepts_a_signed_delivery():
    result = node_verify(SECRET, webhooks.sign(SECRET, "msg_1", int(time.time()), BODY), BODY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "job.completed"


@pytest.mark.parametrize("change, reason", [
    (lambda headers, body: (headers, body.replace("succeeded", "failed")), "no matching signature"),
    (lambda headers, body: ({**headers, "webhook-id": "msg_2"}, body), "no matching signature"),
    (lambda headers, body: ({**headers, "webhook-timestamp": str(int(time.time()) - 3600)}, body),
     "timestamp out of tolerance"),
    (lambda headers, body: ({k: v for k, v in headers.items() if k != "webhook-signature"}, body), "missing"),
])
def test_node_example_refuses_a_changed_delivery(change, reason):
    headers, body = change(webhooks.sign(SECRET, "msg_1", int(time.time()), BODY), BODY)
    result = node_verify(SECRET, headers, body)
    assert result.returncode == 1 and reason in result.stdout


def test_node_example_refuses_another_secret():
    other = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    result = node_verify(other, webhooks.sign(SECRET, "msg_1", int(time.time()), BODY), BODY)
    assert result.returncode == 1 and "no matching signature" in result.stdout


def test_python_receiver_example_verifies_and_skips_duplicates(tmp_path):
    port = devstack.free_port()
    out = open(tmp_path / "receiver.out", "w+")
    process = subprocess.Popen([sys.executable, str(ROOT / "examples" / "webhook_receiver.py"), "--port", str(port)],
                               stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "INPAINT_WEBHOOK_SECRET": SECRET})
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "receiver.out").read_text()
                time.sleep(0.05)
        headers = webhooks.sign(SECRET, "msg_1", int(time.time()), BODY)
        answers = [httpx.post(url, content=BODY, headers=headers).status_code for _ in range(2)]   # a redelivery
        bad = httpx.post(url, content=BODY.replace("succeeded", "failed"), headers=headers).status_code
    finally:
        process.terminate()
        process.wait(10)
        out.close()
    assert answers == [204, 204] and bad == 400
    lines = [json.loads(line) for line in (tmp_path / "receiver.out").read_text().splitlines()]
    assert lines[0] == {"type": "job.completed", "job": "0123456789abcdef0123456789abcdef", "state": "succeeded"}
    assert len(lines) == 2 and "refused" in lines[1]   # the duplicate printed nothing


def test_the_docs_show_the_tested_node_code():
    docs = (ROOT / "docs" / "webhooks.md").read_text()
    shown = docs.split("```js\n", 1)[1].split("```", 1)[0].strip()
    assert shown and shown in (ROOT / "examples" / "verify_webhook.mjs").read_text()
