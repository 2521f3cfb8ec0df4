"""Clients that are not Python: curl and the Node.js example (examples/inpaint_api.mjs, built-in fetch)."""
import json
import os
import subprocess
from pathlib import Path

from tests.api.conftest import JOB_TIMEOUT_S, job_body
from tests.service.conftest import sample_image, sample_mask

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "inpaint_api.mjs"


def test_curl_submits_and_reads_a_job(stack, key_name, tmp_path):
    key = stack.new_key(key_name)
    (tmp_path / "job.json").write_text(json.dumps(job_body()))
    submit = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{stack.url}/v1/jobs", "-H", f"Authorization: Bearer {key}",
         "-H", "Content-Type: application/json", "-H", "Prefer: wait=60", "--data-binary", f"@{tmp_path / 'job.json'}",
         "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=True)
    body, status = submit.stdout.rsplit("\n", 1)
    job = json.loads(body)
    assert status == "201" and job["state"] == "succeeded", body
    events = subprocess.run(["curl", "-sS", "-N", f"{stack.url}/v1/jobs/{job['id']}/events", "-H",
                             f"Authorization: Bearer {key}"], capture_output=True, text=True, timeout=60, check=True)
    assert '"state": "succeeded"' in events.stdout.strip().splitlines()[-1]
    refused = subprocess.run(["curl", "-sS", f"{stack.url}/v1/jobs/{job['id']}"], capture_output=True, text=True,
                             timeout=30, check=True)
    assert json.loads(refused.stdout)["error"]["code"] == "unauthorized"


def test_node_example_runs_a_job(stack, key_name, tmp_path):
    sample_image().save(tmp_path / "image.png")
    sample_mask().save(tmp_path / "mask.png")
    env = {**os.environ, "INPAINT_API_URL": stack.url, "INPAINT_API_KEY": stack.new_key(key_name)}
    run = subprocess.run(["node", str(EXAMPLE), str(tmp_path / "image.png"), str(tmp_path / "mask.png"),
                          "a red square", "2"], capture_output=True, text=True, env=env, timeout=JOB_TIMEOUT_S)
    assert run.returncode == 0, run.stderr
    job = json.loads(run.stdout)
    assert job["state"] == "succeeded" and len(job["result"]["images"]) == 1
    assert "state: succeeded 2/2" in run.stderr
