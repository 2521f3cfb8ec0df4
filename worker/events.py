"""Job state and events in Redis (DESIGN §4): the hash `inpaint:job:<id>`, the streams `inpaint:events:<id>` and
`inpaint:events` (capped with MAXLEN ~).

Every write is one Lua script, so the state check, the hash update and both stream entries happen atomically.
The state only moves forward: queued -> running -> succeeded | failed | canceled. A run owns the job through its
`attempt` number and a lease (`lease_until`): writes from an attempt that no longer owns the job are refused, and
a job `running` under a live lease is never claimed a second time. A later heartbeat only has to move `lease_until`
forward; a watchdog only has to look for running jobs whose lease has passed.
"""
import json
import time
from dataclasses import dataclass
from typing import Callable

import redis

from api_client import schema

__all__ = ["JobStore", "Claim", "ProgressReporter", "CLAIMED", "ALREADY_FINAL", "BUSY"]

CLAIMED, ALREADY_FINAL, BUSY = "claimed", "final", "busy"

# KEYS: job hash, job stream, shared stream. ARGV[1..4]: job_id, now, ttl seconds, shared stream cap.
_PRELUDE = """
local job_id, now, ttl, cap = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local function emit(kind, state, step, total, data)
  local entry = {'job_id', job_id, 'type', kind, 'state', state, 'step', tostring(step),
                 'total_steps', tostring(total), 'ts', now, 'data', data}
  redis.call('XADD', KEYS[2], '*', unpack(entry))
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', cap, '*', unpack(entry))
end
local function field(name, default)
  local value = redis.call('HGET', KEYS[1], name)
  if value then return value end
  return default
end
local state = redis.call('HGET', KEYS[1], 'state')
local final = state == 'succeeded' or state == 'failed' or state == 'canceled'
"""

# ARGV[5..9]: worker, lease_until, the job's JSON ('' = keep what is there), the most attempts (0 = no limit), the
# error JSON written when that many attempts have started already. Returns {outcome, state, attempt, created_at}.
# A worker runs one job at a time, so a job still leased to the claiming worker belongs to an attempt of its that
# has ended (a retry after a lost state-store connection, a redelivery after its process died): it is taken over.
# The attempt limit stops a job that kills its worker (out of memory, hard time limit) from looping forever.
_CLAIM = _PRELUDE + """
local attempt = tonumber(field('attempt', '0'))
if final then return {'final', state, attempt, field('created_at', '')} end
local leased = tonumber(field('lease_until', '0')) > tonumber(now)
if state == 'running' and leased and field('worker', '') ~= ARGV[5] then
  return {'busy', state, attempt, field('created_at', '')}
end
if ARGV[8] ~= '0' and attempt >= tonumber(ARGV[8]) and state then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_at', now, 'lease_until', '0', 'error', ARGV[9])
  redis.call('EXPIRE', KEYS[1], ttl)
  emit('state', 'failed', field('step', '0'), field('total_steps', '0'), '{"error": ' .. ARGV[9] .. '}')
  return {'final', 'failed', attempt, field('created_at', '')}
end
if not state then redis.call('HSET', KEYS[1], 'job_id', job_id, 'created_at', now) end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'job', ARGV[7]) end
attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[5], 'started_at', now, 'lease_until', ARGV[6],
           'step', '0', 'total_steps', '0')
redis.call('EXPIRE', KEYS[1], ttl)
emit('state', 'running', 0, 0, '{"attempt": ' .. attempt .. ', "worker": ' .. cjson.encode(ARGV[5]) .. '}')
return {'claimed', 'running', attempt, field('created_at', '')}
"""

# ARGV[5..7]: attempt, step, total. Only the attempt that owns the running job reports progress.
_PROGRESS = _PRELUDE + """
if state ~= 'running' or field('attempt', '0') ~= ARGV[5] then return 0 end
redis.call('HSET', KEYS[1], 'step', ARGV[6], 'total_steps', ARGV[7])
emit('progress', 'running', ARGV[6], ARGV[7], '{}')
return 1
"""

# ARGV[5..9]: final state, attempt ('' = whichever; used when the job never started here), error JSON, result
# JSON, the event's data JSON. A final state is written once. (JSON is never decoded in Lua: cjson would turn
# 64-bit seeds into doubles.)
_FINISH = _PRELUDE + """
if final or not state then return 0 end
if ARGV[6] ~= '' and field('attempt', '0') ~= ARGV[6] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[5], 'finished_at', now, 'lease_until', '0')
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[7]) end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[8], 'step', field('total_steps', '0')) end
redis.call('EXPIRE', KEYS[1], ttl)
emit('state', ARGV[5], field('step', '0'), field('total_steps', '0'), ARGV[9])
return 1
"""

# ARGV[5..6]: attempt, the event's data JSON. A transient failure gives the lease up so a retry can claim the job.
_RELEASE = _PRELUDE + """
if state ~= 'running' or field('attempt', '0') ~= ARGV[5] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', '0')
redis.call('EXPIRE', KEYS[1], ttl)
emit('retry', 'running', field('step', '0'), field('total_steps', '0'), ARGV[6])
return 1
"""


@dataclass(frozen=True)
class Claim:
    outcome: str     # CLAIMED (this attempt runs the job), ALREADY_FINAL or BUSY (another live attempt runs it)
    state: str
    attempt: int
    created_at: float | None = None   # when the job was submitted (or first seen, without a submit)


class JobStore:
    """The state hash and event streams of jobs, in one Redis."""

    def __init__(self, client: redis.Redis, ttl_s: int = schema.STATE_TTL_SECONDS,
                 events_maxlen: int = schema.EVENTS_STREAM_MAXLEN):
        self.redis, self.ttl_s, self.events_maxlen = client, ttl_s, events_maxlen
        self._claim = client.register_script(_CLAIM)
        self._progress = client.register_script(_PROGRESS)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_settings(cls, settings) -> "JobStore":
        client = redis.Redis.from_url(settings.state_redis_url, decode_responses=True, socket_timeout=10,
                                      socket_connect_timeout=10, health_check_interval=30)
        return cls(client, ttl_s=settings.state_ttl_s, events_maxlen=settings.events_maxlen)

    def _run(self, script, job_id: str, *args, now: float | None = None):
        keys = [schema.job_key(job_id), schema.job_events_key(job_id), schema.EVENTS_STREAM]
        now = time.time() if now is None else now
        return script(keys=keys, args=[job_id, repr(now), self.ttl_s, self.events_maxlen, *map(str, args)])

    def claim(self, job_id: str, worker: str, lease_s: float, job: dict | None, max_attempts: int = 0,
              now: float | None = None) -> Claim:
        """Move the job to running under a new attempt, unless it is final or another attempt's lease is live.
        `job` (the validated job) is stored in the hash's `job` field, so a watchdog can enqueue it again. A job
        that already started `max_attempts` times (0: no limit) fails instead, with code internal."""
        now = time.time() if now is None else now
        job_json = "" if job is None else json.dumps(job, sort_keys=True)
        gave_up = {"code": schema.INTERNAL, "message": f"the job already started {max_attempts} times without "
                                                       "ending (its worker died or was killed); not run again"}
        outcome, state, attempt, created_at = self._run(self._claim, job_id, worker, repr(now + lease_s), job_json,
                                                        max_attempts, json.dumps(gave_up), now=now)
        return Claim(outcome, state, int(attempt), float(created_at) if created_at else None)

    def progress(self, job_id: str, attempt: int, step: int, total: int) -> bool:
        return bool(self._run(self._progress, job_id, attempt, step, total))

    def finish(self, job_id: str, state: str, attempt: int | None = None, error: dict | None = None,
               result: dict | None = None) -> bool:
        """Write the final state once; False when the job is already final or `attempt` no longer owns it."""
        if state not in schema.FINAL_STATES:
            raise ValueError(f"state: {state!r} is not one of {', '.join(sorted(schema.FINAL_STATES))}")
        data = {key: value for key, value in (("error", error), ("result", result)) if value}
        return bool(self._run(self._finish, job_id, state, "" if attempt is None else attempt,
                              json.dumps(error) if error else "", json.dumps(result) if result else "",
                              json.dumps(data)))

    def release(self, job_id: str, attempt: int, error: dict) -> bool:
        """A transient failure: keep the job running, drop this attempt's lease, record a `retry` event."""
        return bool(self._run(self._release, job_id, attempt, json.dumps({"attempt": attempt, "error": error})))

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(schema.cancel_key(job_id)))

    def status(self, job_id: str) -> schema.JobStatus:
        return schema.JobStatus.from_hash(job_id, self.redis.hgetall(schema.job_key(job_id)))


class ProgressReporter:
    """The pipeline's callback(step, total). Writes progress at most every `interval_s` (always the last step) and
    returns False, which stops the denoise loop, once the job's cancel flag is set or its deadline (a
    time.monotonic() value; the soft time limit, which a solo pool cannot enforce by signal) has passed, or once
    `lease_lost()` says another attempt took the job over (the GPU time would be wasted: its writes are refused)."""

    def __init__(self, store: JobStore, job_id: str, attempt: int, interval_s: float, deadline: float | None = None,
                 clock=time.monotonic, lease_lost: Callable[[], bool] = lambda: False):
        self.store, self.job_id, self.attempt = store, job_id, attempt
        self.interval_s, self.deadline, self.clock = interval_s, deadline, clock
        self.lease_lost = lease_lost
        self._last_sent = None
        self.step = 0   # the last step reported

    def __call__(self, step: int, total: int) -> bool:
        now, self.step = self.clock(), step
        if step >= total or self._last_sent is None or now - self._last_sent >= self.interval_s:
            self._last_sent = now
            self.store.progress(self.job_id, self.attempt, step, total)
        if self.lease_lost() or (self.deadline is not None and now > self.deadline):
            return False
        return not self.store.cancel_requested(self.job_id)
