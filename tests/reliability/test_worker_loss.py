"""Promises 1 and 4: a worker killed mid-job (SIGKILL) loses nothing, another worker finishes the job within the
lease plus its run time; a worker told to stop (SIGTERM) takes no new job, finishes its running one and exits."""
import signal
import time

from api_client import schema
from tests.reliability.conftest import LEASE_S, WATCHDOG_S
from tests.reliability.faults import kill, wait_exit

LONG_STEPS = 12
STATE_ORDER = {schema.QUEUED: 0, schema.RUNNING: 1, schema.SUCCEEDED: 2, schema.FAILED: 2, schema.CANCELED: 2}


def assert_states_only_move_forward(events):
    ranks = [STATE_ORDER[event["state"]] for event in events]
    assert ranks == sorted(ranks), [event["state"] for event in events]
    assert sum(event["state"] in schema.FINAL_STATES for event in events) == 1


def test_killed_worker_job_is_finished_by_another_worker(healthy_fleet):
    fleet = healthy_fleet
    job_id = fleet.submit(steps=LONG_STEPS, num_images=2)
    running = fleet.wait_running(job_id, min_step=2)
    victim = fleet.worker_named(running.worker)
    kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    status = fleet.wait_final(job_id)
    recovered_s = time.monotonic() - killed_at
    assert status.state == schema.SUCCEEDED, status
    assert status.attempt == 2 and status.worker != victim.hostname
    run_s = status.finished_at - status.started_at
    # Detection takes at most the lease plus one watchdog period; then one full run.
    assert recovered_s < LEASE_S + WATCHDOG_S + run_s + 10, (recovered_s, run_s)
    assert fleet.output_keys(job_id) == [f"jobs/{job_id}/0.png", f"jobs/{job_id}/1.png"]
    events = fleet.events(job_id)
    assert_states_only_move_forward(events)
    # Only the dead attempt's lease expired (a busy fleet may need a second send before a worker takes it).
    expiries = [e for e in events if e["type"] == "retry" and e["data"].get("reason") == "lease_expired"]
    assert expiries and all(e["data"] == {"attempt": 1, "reason": "lease_expired", "worker": victim.hostname}
                            for e in expiries)


def test_sigterm_finishes_the_running_job_and_takes_no_new_one(healthy_fleet):
    fleet = healthy_fleet
    job_id = fleet.submit(steps=LONG_STEPS)
    running = fleet.wait_running(job_id, min_step=2)
    leaving = fleet.worker_named(running.worker)
    leaving.send_signal(signal.SIGTERM)
    time.sleep(0.5)   # the warm shutdown has begun: the worker consumes nothing more
    later = fleet.submit(steps=2)

    assert wait_exit(leaving, timeout=60) == 0, leaving.log_text()[-3000:]
    status = fleet.status(job_id)
    assert status.state == schema.SUCCEEDED and status.attempt == 1 and status.worker == leaving.hostname
    later_status = fleet.wait_final(later)
    assert later_status.state == schema.SUCCEEDED and later_status.worker != leaving.hostname
    assert_states_only_move_forward(fleet.events(job_id))
