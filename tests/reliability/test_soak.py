"""Soak (`pytest -m soak -s tests/reliability/test_soak.py`): 200 jobs on 3 workers while workers are SIGKILLed
and S3 is cut at random; then the jobs lost (not final) and the outputs duplicated must both be 0."""
import hashlib
import json
import random
import signal
import time

import pytest

from api_client import schema
from tests.reliability.conftest import BUCKET
from tests.reliability.faults import kill

JOBS = 200
DEADLINE_S = 20 * 60
S3_CUT_S = 2.0


def chaos_step(fleet, rng: random.Random, tally: dict) -> None:
    """One fault, then a pause: a worker killed (and replaced), or S3 cut for a moment."""
    if rng.random() < 0.5:
        kill(rng.choice(fleet.live_workers()), signal.SIGKILL)
        tally["kills"] += 1
        fleet.ensure_workers()   # a replacement starts while the others keep working
    else:
        fleet.proxy.cut_for(S3_CUT_S)
        tally["s3_cuts"] += 1
    time.sleep(rng.uniform(3, 10))


def duplicated_outputs(fleet, status: schema.JobStatus, num_images: int) -> int:
    """Objects beyond the job's images, plus reported images whose stored bytes are not the reported ones."""
    keys = fleet.output_keys(status.job_id)
    extra = max(0, len(keys) - num_images)
    if status.state != schema.SUCCEEDED:
        return extra
    replaced = 0
    for image in status.result["images"]:
        _, key = schema.parse_s3_uri("result", image["uri"])
        body = fleet.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        replaced += hashlib.sha256(body).hexdigest() != image["sha256"]
    return extra + replaced


@pytest.mark.soak
def test_soak_no_job_lost_no_output_duplicated(fleet):
    rng = random.Random(20261129)
    fleet.proxy.restore()
    fleet.ensure_workers()
    started = time.monotonic()
    jobs = {}
    for index in range(JOBS):
        num_images = rng.choice((1, 2))
        jobs[fleet.submit(steps=rng.choice((2, 3)), num_images=num_images, seed=index)] = num_images
    tally = {"kills": 0, "s3_cuts": 0}
    while time.monotonic() - started < DEADLINE_S:
        if all(fleet.status(job_id).final for job_id in jobs):
            break
        chaos_step(fleet, rng, tally)
    fleet.proxy.restore()
    statuses = {job_id: fleet.wait_final(job_id, timeout=300) for job_id in jobs}

    lost = [job_id for job_id, status in statuses.items() if not status.final]
    failed = {job_id: status.error["code"] for job_id, status in statuses.items() if status.state == schema.FAILED}
    duplicated = sum(duplicated_outputs(fleet, status, jobs[job_id]) for job_id, status in statuses.items())
    attempts = [status.attempt for status in statuses.values()]
    figures = {"jobs": JOBS, "lost": len(lost), "duplicated_outputs": duplicated, "failed": len(failed),
               "failed_codes": sorted(set(failed.values())), "kills": tally["kills"], "s3_cuts": tally["s3_cuts"],
               "jobs_run_more_than_once": sum(a > 1 for a in attempts), "max_attempt": max(attempts),
               "seconds": round(time.monotonic() - started, 1)}
    print("SOAK", json.dumps(figures))
    assert lost == [] and duplicated == 0, figures
    assert all(code for code in failed.values())   # a job that failed says why
