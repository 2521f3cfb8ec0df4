"""The worker's side of job state and events in Redis (DESIGN §4): the hash `inpaint:job:<id>`, the streams
`inpaint:events:<id>` and `inpaint:events` (capped with MAXLEN ~).

Every write is one Lua script of api_client.state (CLAIM, PROGRESS, FINISH, RELEASE), so the state check, the hash
update and both stream entries happen atomically. The state only moves forward:
queued -> running -> succeeded | failed | canceled. A run owns the job through its `attempt` number and a lease
(`lease_until`): writes from an attempt that no longer owns the job are refused, and a job `running` under a live
lease is never claimed a second time. A later heartbeat only has to move `lease_until` forward; a watchdog only has
to look for running jobs whose lease has passed.
"""
import json
import time
from dataclasses import dataclass
from typing import Callable

import redis

from api_client import schema
from api_client.state import (CLAIM, DENOISING, EVENTS_STREAM_MAXLEN, FINISH, PROGRESS, RELEASE, STATE_TTL_SECONDS,
                              Scripts, cancel_key, job_key)

__all__ = ["JobStore", "Claim", "ProgressReporter", "CLAIMED", "ALREADY_FINAL", "BUSY"]

CLAIMED, ALREADY_FINAL, BUSY = "claimed", "final", "busy"


@dataclass(frozen=True)
class Claim:
    outcome: str     # CLAIMED (this attempt runs the job), ALREADY_FINAL or BUSY (another live attempt runs it)
    state: str
    attempt: int
    created_at: float | None = None   # when the job was submitted (or first seen, without a submit)


class JobStore:
    """The state hash and event streams of jobs, in one Redis."""

    def __init__(self, client: redis.Redis, ttl_s: int = STATE_TTL_SECONDS,
                 events_maxlen: int = EVENTS_STREAM_MAXLEN):
        self.redis, self.ttl_s, self.events_maxlen = client, ttl_s, events_maxlen
        self._scripts = Scripts(client, ttl_s, events_maxlen)

    @classmethod
    def from_settings(cls, settings) -> "JobStore":
        client = redis.Redis.from_url(settings.state_redis_url, decode_responses=True, socket_timeout=10,
                                      socket_connect_timeout=10, health_check_interval=30)
        return cls(client, ttl_s=settings.state_ttl_s, events_maxlen=settings.events_maxlen)

    def claim(self, job_id: str, worker: str, lease_s: float, job: dict | None, max_attempts: int = 0,
              now: float | None = None) -> Claim:
        """Move the job to running under a new attempt, unless it is final or another attempt's lease is live.
        `job` (the validated job) is stored in the hash's `job` field, so a watchdog can enqueue it again. A job
        that already started `max_attempts` times (0: no limit) fails instead, with code internal."""
        now = time.time() if now is None else now
        job_json = "" if job is None else json.dumps(job, sort_keys=True)
        gave_up = {"code": schema.INTERNAL, "message": f"the job already started {max_attempts} times without "
                                                       "ending (its worker died or was killed); not run again"}
        outcome, state, attempt, created_at = self._scripts.run_job(CLAIM, job_id, worker, repr(now + lease_s),
                                                                    job_json, max_attempts, json.dumps(gave_up),
                                                                    now=now)
        return Claim(outcome, state, int(attempt), float(created_at) if created_at else None)

    def progress(self, job_id: str, attempt: int, step: int, total: int, phase: str = DENOISING) -> bool:
        """A denoise step, or the start of a phase (state.PHASES), of the attempt that owns the running job."""
        return bool(self._scripts.run_job(PROGRESS, job_id, attempt, step, total, phase))

    def finish(self, job_id: str, state: str, attempt: int | None = None, error: dict | None = None,
               result: dict | None = None) -> bool:
        """Write the final state once; False when the job is already final or `attempt` no longer owns it."""
        if state not in schema.FINAL_STATES:
            raise ValueError(f"state: {state!r} is not one of {', '.join(sorted(schema.FINAL_STATES))}")
        data = {key: value for key, value in (("error", error), ("result", result)) if value}
        return bool(self._scripts.run_job(FINISH, job_id, state, "" if attempt is None else attempt,
                                          json.dumps(error) if error else "", json.dumps(result) if result else "",
                                          json.dumps(data)))

    def release(self, job_id: str, attempt: int, error: dict) -> bool:
        """A transient failure: keep the job running, drop this attempt's lease, record a `retry` event."""
        data = json.dumps({"attempt": attempt, "error": error})
        return bool(self._scripts.run_job(RELEASE, job_id, attempt, data))

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(cancel_key(job_id)))

    def status(self, job_id: str) -> schema.JobStatus:
        return schema.JobStatus.from_hash(job_id, self.redis.hgetall(job_key(job_id)))


class ProgressReporter:
    """The pipeline's callback(step, total) and on_phase(name). Writes denoise progress at most every `interval_s`
    (always the last step), each phase as it begins, and returns False, which stops the denoise loop, once the job's
    cancel flag is set or its deadline (a time.monotonic() value; the soft time limit, which a solo pool cannot
    enforce by signal) has passed, or once `lease_lost()` says another attempt took the job over (the GPU time would
    be wasted: its writes are refused)."""

    def __init__(self, store: JobStore, job_id: str, attempt: int, interval_s: float, deadline: float | None = None,
                 clock=time.monotonic, lease_lost: Callable[[], bool] = lambda: False):
        self.store, self.job_id, self.attempt = store, job_id, attempt
        self.interval_s, self.deadline, self.clock = interval_s, deadline, clock
        self.lease_lost = lease_lost
        self._last_sent = None
        self.step = self.total = 0   # the last step reported, of how many

    def __call__(self, step: int, total: int) -> bool:
        now, self.step, self.total = self.clock(), step, total
        if step >= total or self._last_sent is None or now - self._last_sent >= self.interval_s:
            self._last_sent = now
            self.store.progress(self.job_id, self.attempt, step, total)
        if self.lease_lost() or (self.deadline is not None and now > self.deadline):
            return False
        return not self.store.cancel_requested(self.job_id)

    def phase(self, name: str) -> None:
        """The job entered phase `name` (state.PHASES): written at once, with the steps reported so far."""
        self.store.progress(self.job_id, self.attempt, self.step, self.total, name)
