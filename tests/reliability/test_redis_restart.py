"""Promise 2: Redis restarts (AOF on) with jobs queued and running; every job completes, and the workers and the
client reconnect by themselves."""
import time

from api_client import schema
from tests.reliability.conftest import FLEET_SIZE

JOBS = 4


def test_every_job_completes_across_a_redis_restart(healthy_fleet):
    fleet = healthy_fleet
    job_ids = [fleet.submit(steps=6) for _ in range(JOBS)]
    fleet.wait_running(job_ids[0], min_step=1)   # some run, the rest wait in the queue

    fleet.redis_server.stop()
    time.sleep(2)
    fleet.redis_server.start()

    statuses = [fleet.wait_final(job_id, timeout=120) for job_id in job_ids]
    assert [status.state for status in statuses] == [schema.SUCCEEDED] * JOBS, statuses
    for job_id in job_ids:
        assert len(fleet.output_keys(job_id)) == 1
    # The same client object submits again, and the workers take new jobs.
    after = fleet.submit()
    assert fleet.client.wait(after, timeout=60).state == schema.SUCCEEDED
    assert len(fleet.live_workers()) == FLEET_SIZE   # no worker died of the outage
