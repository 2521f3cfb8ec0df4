"""The job-state contract in Redis (DESIGN §4): key names, the event entry and every Lua script of the state machine.

Torch-free (stdlib only). The client, the worker's state store (worker/events.py), the lease code (worker/lease.py)
and the HTTP API all change job state through the scripts here, so the state machine and the event entry are
written once. Each write is one script: the state check, the hash update and both stream entries are atomic.

Public names:
- Keys: `job_key(id)` (the state hash), `job_events_key(id)` (the job's stream), `cancel_key(id)`, `EVENTS_STREAM`
  (the shared stream, capped with MAXLEN ~), `LEASES_KEY` (sorted set of running jobs by lease end); defaults
  `STATE_TTL_SECONDS`, `EVENTS_STREAM_MAXLEN`.
- Events: the types `EVENT_STATE`, `EVENT_PROGRESS`, `EVENT_RETRY`; `EVENT_FIELDS`, the entry's fields (the one place
  a field is added: every script's `emit` and `parse_event` follow it); `parse_event(fields)`.
- Scripts: `Script`, `SCRIPTS` (every script, by name), `define_script(name, lua, job=True)`; the job scripts
  `CREATE_QUEUED`, `CANCEL` (client), `CLAIM`, `PROGRESS`, `FINISH`, `RELEASE` (worker), `EXPIRE_LEASE`, and the
  plain script `RENEW_LEASE` (lease code).
- `Scripts(redis_client, ttl_s, events_maxlen)` runs them on one client (redis.Redis, or redis.asyncio.Redis whose
  calls return awaitables): `run_job(script, job_id, *args, extra_keys=(), now=None)`, `run(script, keys, args)`.

Adding a script: `NAME = define_script("name", '''...lua...''')` in this module. A job script (`job=True`) runs after
the shared prelude, `job_prelude()`: it gets KEYS[1] the job hash, KEYS[2] the job's stream, KEYS[3] the shared
stream, then its `extra_keys` from KEYS[4]; ARGV[1..4] are job_id, now (time.time(), as repr), the TTL in seconds
and the shared stream's cap, then its own `args` from ARGV[5]. The prelude defines the locals `job_id`, `now`,
`ttl`, `cap`, `state` (the job's state or false), `final`, and the functions `field(name, default)` (a hash field)
and `emit(type, state, step, total_steps, data_json)`, the only writer of an event entry. A script that writes no
job state (`job=False`) gets exactly the keys and args it is called with.
"""
import json
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["job_key", "job_events_key", "cancel_key", "EVENTS_STREAM", "LEASES_KEY", "STATE_TTL_SECONDS",
           "EVENTS_STREAM_MAXLEN", "EVENT_STATE", "EVENT_PROGRESS", "EVENT_RETRY", "EventField", "EVENT_FIELDS",
           "parse_event", "Script", "SCRIPTS", "define_script", "job_prelude", "Scripts", "CREATE_QUEUED", "CANCEL",
           "CLAIM", "PROGRESS", "FINISH", "RELEASE", "RENEW_LEASE", "EXPIRE_LEASE"]

EVENTS_STREAM = "inpaint:events"
LEASES_KEY = "inpaint:leases"
STATE_TTL_SECONDS = 7 * 24 * 3600
EVENTS_STREAM_MAXLEN = 100_000

# The event types; the scripts below write them as Lua literals.
EVENT_STATE, EVENT_PROGRESS, EVENT_RETRY = "state", "progress", "retry"


def job_key(job_id: str) -> str:
    return f"inpaint:job:{job_id}"


def job_events_key(job_id: str) -> str:
    return f"inpaint:events:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"inpaint:cancel:{job_id}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class EventField:
    """One field of an event entry: its name, its value as a Lua expression inside `emit` (over the arguments
    `kind`, `state`, `step`, `total`, `data` and the prelude's `job_id`, `now`, `field(name, default)`), and how
    `parse_event` turns the stored text (None when missing) back into a Python value."""
    name: str
    lua: str
    parse: Callable[[str | None], object] = lambda text: text or ""


# The event entry (DESIGN §4), in stream order. Flat strings: step and total_steps as integers, ts as seconds since
# the epoch, data a JSON object.
EVENT_FIELDS = (
    EventField("job_id", "job_id"),
    EventField("type", "kind"),
    EventField("state", "state"),
    EventField("step", "tostring(step)", lambda text: int(text or 0)),
    EventField("total_steps", "tostring(total)", lambda text: int(text or 0)),
    EventField("ts", "now", lambda text: float(text or 0.0)),
    EventField("data", "data", lambda text: json.loads(text or "{}")),
)


def parse_event(entry_fields: dict) -> dict:
    """A stream entry's fields (str or bytes) back as Python values, one key per EVENT_FIELDS entry."""
    values = {_text(key): _text(value) for key, value in entry_fields.items()}
    return {field.name: field.parse(values.get(field.name)) for field in EVENT_FIELDS}


def _emit_lua() -> str:
    entry = ", ".join(f"'{field.name}', {field.lua}" for field in EVENT_FIELDS)
    return f"""
local function emit(kind, state, step, total, data)
  local entry = {{{entry}}}
  redis.call('XADD', KEYS[2], '*', unpack(entry))
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', cap, '*', unpack(entry))
end
"""


_PRELUDE_HEAD = """
local job_id, now, ttl, cap = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local function field(name, default)
  local value = redis.call('HGET', KEYS[1], name)
  if value then return value end
  return default
end
"""
_PRELUDE_TAIL = """
local state = redis.call('HGET', KEYS[1], 'state')
local final = state == 'succeeded' or state == 'failed' or state == 'canceled'
"""


def job_prelude() -> str:
    """The Lua every job script starts with (see the module's docstring), rendered from EVENT_FIELDS now."""
    return _PRELUDE_HEAD + _emit_lua() + _PRELUDE_TAIL



@dataclass(frozen=True)
class Script:
    """A named Lua script; `job` scripts run after the job prelude."""
    name: str
    lua: str
    job: bool = True

    def source(self) -> str:
        return job_prelude() + self.lua if self.job else self.lua


SCRIPTS: dict[str, Script] = {}


def define_script(name: str, lua: str, job: bool = True) -> Script:
    """Register a script under a new name and return it (pass it to Scripts.run_job or Scripts.run)."""
    if name in SCRIPTS:
        raise ValueError(f"script {name!r} is already defined")
    SCRIPTS[name] = Script(name, lua, job)
    return SCRIPTS[name]


class Scripts:
    """The scripts on one Redis client (redis.Redis, or redis.asyncio.Redis: then each call returns an awaitable).
    `ttl_s` is the lifetime of the job's hash and stream, `events_maxlen` the shared stream's approximate cap."""

    def __init__(self, client, ttl_s: int = STATE_TTL_SECONDS, events_maxlen: int = EVENTS_STREAM_MAXLEN):
        self.client, self.ttl_s, self.events_maxlen = client, ttl_s, events_maxlen
        self._registered = {}

    def run_job(self, script: Script, job_id: str, *args, extra_keys=(), now: float | None = None):
        """Run a job script on `job_id`'s keys plus `extra_keys`, with the prelude's arguments then `args`."""
        if not script.job:
            raise ValueError(f"script {script.name!r} is not a job script: call run()")
        keys = [job_key(job_id), job_events_key(job_id), EVENTS_STREAM, *extra_keys]
        now = time.time() if now is None else now
        return self._call(script, keys, [job_id, repr(now), self.ttl_s, self.events_maxlen, *args])

    def run(self, script: Script, keys, args):
        """Run a plain script with exactly these keys and args."""
        if script.job:
            raise ValueError(f"script {script.name!r} is a job script: call run_job()")
        return self._call(script, keys, args)

    def _call(self, script: Script, keys, args):
        if script.name not in self._registered:   # redis-py loads it on first use (EVALSHA, then SCRIPT LOAD)
            self._registered[script.name] = self.client.register_script(script.source())
        return self._registered[script.name](keys=list(keys), args=[str(arg) for arg in args])


# --- The client's writes. -------------------------------------------------------------------------------------

# ARGV[5]: the job's JSON, kept so a watchdog can enqueue it again. Only a job without a hash becomes `queued`: a
# duplicate submit of a job_id neither overwrites the state of a job that ran nor enqueues it again.
CREATE_QUEUED = define_script("create_queued", """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'job_id', job_id, 'state', 'queued', 'step', '0', 'total_steps', '0', 'attempt', '0',
           'created_at', now, 'job', ARGV[5])
redis.call('EXPIRE', KEYS[1], ttl)
emit('state', 'queued', 0, 0, '{}')
return 1
""")

# KEYS[4]: the cancel flag. ARGV[5]: the error JSON. Sets the flag (a running job stops at its next step); a job
# still `queued` ends `canceled` at once, in the same step, so a worker that claims it later finds it final.
CANCEL = define_script("cancel", """
redis.call('SET', KEYS[4], '1', 'EX', ttl)
if state ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'canceled', 'finished_at', now, 'error', ARGV[5])
redis.call('EXPIRE', KEYS[1], ttl)
emit('state', 'canceled', 0, 0, '{"error": ' .. ARGV[5] .. '}')
return 1
""")

# --- The worker's writes. A run owns the job through its `attempt` number and a lease (`lease_until`): writes
# from an attempt that no longer owns the job are refused, and a job `running` under a live lease is never claimed
# a second time. The state only moves forward: queued -> running -> succeeded | failed | canceled. -------------

# ARGV[5..9]: worker, lease_until, the job's JSON ('' = keep what is there), the most attempts (0 = no limit), the
# error JSON written when that many attempts have started already. Returns {outcome, state, attempt, created_at}.
# A worker runs one job at a time, so a job still leased to the claiming worker belongs to an attempt of its that
# has ended (a retry after a lost state-store connection, a redelivery after its process died): it is taken over.
# The attempt limit stops a job that kills its worker (out of memory, hard time limit) from looping forever.
CLAIM = define_script("claim", """
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
""")

# ARGV[5..7]: attempt, step, total. Only the attempt that owns the running job reports progress.
PROGRESS = define_script("progress", """
if state ~= 'running' or field('attempt', '0') ~= ARGV[5] then return 0 end
redis.call('HSET', KEYS[1], 'step', ARGV[6], 'total_steps', ARGV[7])
emit('progress', 'running', ARGV[6], ARGV[7], '{}')
return 1
""")

# ARGV[5..9]: final state, attempt ('' = whichever; used when the job never started here), error JSON, result
# JSON, the event's data JSON. A final state is written once. (JSON is never decoded in Lua: cjson would turn
# 64-bit seeds into doubles.)
FINISH = define_script("finish", """
if final or not state then return 0 end
if ARGV[6] ~= '' and field('attempt', '0') ~= ARGV[6] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[5], 'finished_at', now, 'lease_until', '0')
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[7]) end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[8], 'step', field('total_steps', '0')) end
redis.call('EXPIRE', KEYS[1], ttl)
emit('state', ARGV[5], field('step', '0'), field('total_steps', '0'), ARGV[9])
return 1
""")

# ARGV[5..6]: attempt, the event's data JSON. A transient failure gives the lease up so a retry can claim the job.
RELEASE = define_script("release", """
if state ~= 'running' or field('attempt', '0') ~= ARGV[5] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', '0')
redis.call('EXPIRE', KEYS[1], ttl)
emit('retry', 'running', field('step', '0'), field('total_steps', '0'), ARGV[6])
return 1
""")

# --- Leases (worker/lease.py). -----------------------------------------------------------------------------------

# A plain script. KEYS: job hash, leases set. ARGV: job_id, attempt, lease_until. Only the attempt that owns the
# running job renews; for any other the job is left alone (a newer attempt keeps its own lease). A lease given up
# for a retry (lease_until 0) stays given up.
RENEW_LEASE = define_script("renew_lease", """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then return 0 end
if redis.call('HGET', KEYS[1], 'lease_until') == '0' then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
""", job=False)

# KEYS[4]: the leases set. Returns {'expired', job JSON} when this caller is to re-dispatch the job (it has left
# the set, so no other watchdog sends it too), else {outcome}.
EXPIRE_LEASE = define_script("expire_lease", """
local score = redis.call('ZSCORE', KEYS[4], job_id)
if not score or tonumber(score) > tonumber(now) then return {'taken'} end
if state ~= 'running' then
  redis.call('ZREM', KEYS[4], job_id)
  return {'gone'}
end
local lease_until = tonumber(field('lease_until', '0'))
if lease_until > tonumber(now) then
  redis.call('ZADD', KEYS[4], lease_until, job_id)
  return {'live'}
end
local job = redis.call('HGET', KEYS[1], 'job')
redis.call('ZREM', KEYS[4], job_id)
if not job then return {'no_job'} end
local data = '{"attempt": ' .. field('attempt', '0') .. ', "reason": "lease_expired", "worker": ' ..
             cjson.encode(field('worker', '')) .. '}'
emit('retry', 'running', field('step', '0'), field('total_steps', '0'), data)
return {'expired', job}
""")
