"""The job-state contract in Redis (DESIGN §4): key names, the event entry and every Lua script of the state machine.

Torch-free (stdlib only). The client, the worker's state store (worker/events.py), the lease code (worker/lease.py)
and the HTTP API all change job state through the scripts here, so the state machine and the event entry are
written once. Each write is one script: the state check, the hash update and both stream entries are atomic.

Public names:
- Keys: `job_key(id)` (the state hash), `job_events_key(id)` (the job's stream), `cancel_key(id)`, `EVENTS_STREAM`
  (the shared stream, capped with MAXLEN ~), `LEASES_KEY` (sorted set of running jobs by lease end); defaults
  `STATE_TTL_SECONDS`, `EVENTS_STREAM_MAXLEN`.
- Events: the types `EVENT_STATE`, `EVENT_PROGRESS`, `EVENT_RETRY`; `EVENT_FIELDS`, the entry's fields (the one place
  a field is added: every script's `emit` and `parse_event` follow it); `parse_event(fields)`. A running job's
  `PHASES` (`FETCHING`, `ENCODING`, `DENOISING`, `DECODING`, `UPLOADING`), in its hash and in each event.
- Scripts: `Script`, `SCRIPTS` (every script, by name), `define_script(name, lua, job=True)`; the job scripts
  `CREATE_QUEUED`, `CANCEL` (client), `CLAIM`, `PROGRESS`, `FINISH`, `RELEASE` (worker), `EXPIRE_LEASE`, the
  plain script `RENEW_LEASE` (lease code), and the HTTP API's plain scripts `ADMIT`, `ROLLBACK_ADMISSION`,
  `QUEUE_POSITION`, `WEBHOOK_SCHEDULE`, `WEBHOOK_CLAIM_DUE`, `WEBHOOK_FINISH`.
- Webhooks: `WEBHOOKS_GROUP` (the dispatchers' consumer group on EVENTS_STREAM), `WEBHOOKS_DUE_KEY` (sorted set of
  pending deliveries by due time, ms), `webhook_delivery_key(msg_id)` (one delivery's hash).
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
           "EVENTS_STREAM_MAXLEN", "EVENT_STATE", "EVENT_PROGRESS", "EVENT_RETRY", "PHASES", "FETCHING", "ENCODING",
           "DENOISING", "DECODING", "UPLOADING", "EventField", "EVENT_FIELDS",
           "parse_event", "Script", "SCRIPTS", "define_script", "job_prelude", "Scripts", "CREATE_QUEUED", "CANCEL",
           "CLAIM", "PROGRESS", "FINISH", "RELEASE", "RENEW_LEASE", "EXPIRE_LEASE", "ADMIT", "ROLLBACK_ADMISSION",
           "QUEUE_POSITION", "WEBHOOKS_GROUP", "WEBHOOKS_DUE_KEY", "webhook_delivery_key", "WEBHOOK_SCHEDULE",
           "WEBHOOK_CLAIM_DUE", "WEBHOOK_FINISH"]

EVENTS_STREAM = "inpaint:events"
LEASES_KEY = "inpaint:leases"
STATE_TTL_SECONDS = 7 * 24 * 3600
EVENTS_STREAM_MAXLEN = 100_000

# The event types; the scripts below write them as Lua literals.
EVENT_STATE, EVENT_PROGRESS, EVENT_RETRY = "state", "progress", "retry"

# The phases of a running job, in order (the hash's and each event's `phase`): a claim starts `fetching` (the
# inputs), the pipeline reports `encoding`, `denoising` (with step/total_steps) and `decoding`, then the worker is
# `uploading`. A final state clears it.
FETCHING, ENCODING, DENOISING, DECODING, UPLOADING = "fetching", "encoding", "denoising", "decoding", "uploading"
PHASES = (FETCHING, ENCODING, DENOISING, DECODING, UPLOADING)


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
    # What a running job is doing (PHASES), as its hash says when the event is written; "" outside running.
    EventField("phase", "field('phase', '')"),
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

# ARGV[5]: the job's JSON, kept so a watchdog can enqueue it again; ARGV[6..]: more hash field/value pairs (the HTTP
# API's `owner`, `queue` and webhook fields). Only a job without a hash becomes `queued`: a duplicate submit of a
# job_id neither overwrites the state of a job that ran nor enqueues it again.
CREATE_QUEUED = define_script("create_queued", """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'job_id', job_id, 'state', 'queued', 'step', '0', 'total_steps', '0', 'attempt', '0',
           'created_at', now, 'job', ARGV[5])
if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
redis.call('EXPIRE', KEYS[1], ttl)
emit('state', 'queued', 0, 0, '{}')
return 1
""")

# KEYS[4]: the cancel flag. ARGV[5]: the error JSON. Returns the state the cancel found, checked and acted on in one
# step: 'queued' (it ends `canceled` now, so a worker that claims it later finds it final), 'running' (the flag is
# set: the run stops at its next step), a final state or 'expired' (no hash: unknown or expired); those last two
# are left untouched, no flag set.
CANCEL = define_script("cancel", """
if not state then return 'expired' end
if final then return state end
redis.call('SET', KEYS[4], '1', 'EX', ttl)
if state ~= 'queued' then return state end
redis.call('HSET', KEYS[1], 'state', 'canceled', 'finished_at', now, 'error', ARGV[5])
redis.call('EXPIRE', KEYS[1], ttl)
emit('state', 'canceled', 0, 0, '{"error": ' .. ARGV[5] .. '}')
return state
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
           'step', '0', 'total_steps', '0', 'phase', 'fetching')
redis.call('EXPIRE', KEYS[1], ttl)
emit('state', 'running', 0, 0, '{"attempt": ' .. attempt .. ', "worker": ' .. cjson.encode(ARGV[5]) .. '}')
return {'claimed', 'running', attempt, field('created_at', '')}
""")

# ARGV[5..8]: attempt, step, total, phase (one of PHASES). Only the attempt that owns the running job reports
# progress: a denoise step, or the start of a phase.
PROGRESS = define_script("progress", """
if state ~= 'running' or field('attempt', '0') ~= ARGV[5] then return 0 end
redis.call('HSET', KEYS[1], 'step', ARGV[6], 'total_steps', ARGV[7], 'phase', ARGV[8])
emit('progress', 'running', ARGV[6], ARGV[7], '{}')
return 1
""")

# ARGV[5..9]: final state, attempt ('' = whichever; used when the job never started here), error JSON, result
# JSON, the event's data JSON. A final state is written once. (JSON is never decoded in Lua: cjson would turn
# 64-bit seeds into doubles.)
FINISH = define_script("finish", """
if final or not state then return 0 end
if ARGV[6] ~= '' and field('attempt', '0') ~= ARGV[6] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[5], 'finished_at', now, 'lease_until', '0', 'phase', '')
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

# --- The HTTP API's (api/service.py): admission of an API key's submission, its rollback, a queued job's position.
# Plain scripts; the key names come from api_client/keys.py. -----------------------------------------------------
# Admission of one submission for a key, atomic. KEYS: the key's active set, its rate counter for this minute, its
# jobs sorted set, the Idempotency-Key's record (or any unused name when none). ARGV: job_id, rate (0 = none),
# max_active (0 = none), idempotency ('1' or '0'), body digest, idempotency TTL, now, state TTL, the job hash
# prefix. Returns {'admitted', job_id}, {'existing', job_id} (same Idempotency-Key and body), {'conflict', job_id}
# (same key, other body), {'rate_limited', ms until the minute ends} or {'busy', active count}. Jobs found final
# or expired leave the active set first, so the cap counts only jobs still queued or running.
ADMIT = define_script("admit", """
local job_id, rate, max_active = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now, ttl, prefix = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
if ARGV[4] == '1' then
  local seen = redis.call('GET', KEYS[4])
  if seen then
    local digest, previous = string.match(seen, '^(%S+) (%S+)$')
    if digest == ARGV[5] then return {'existing', previous} end
    return {'conflict', previous}
  end
end
if rate > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= rate then
  return {'rate_limited', redis.call('PTTL', KEYS[2])}
end
if max_active > 0 then
  for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local state = redis.call('HGET', prefix .. member, 'state')
    if not state or state == 'succeeded' or state == 'failed' or state == 'canceled' then
      redis.call('SREM', KEYS[1], member)
    end
  end
  local active = redis.call('SCARD', KEYS[1])
  if active >= max_active then return {'busy', active} end
end
redis.call('SADD', KEYS[1], job_id)
redis.call('EXPIRE', KEYS[1], ttl)
if redis.call('INCR', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], 60) end
redis.call('ZADD', KEYS[3], now, job_id)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - ttl)
redis.call('EXPIRE', KEYS[3], ttl)
if ARGV[4] == '1' then redis.call('SET', KEYS[4], ARGV[5] .. ' ' .. job_id, 'EX', tonumber(ARGV[6])) end
return {'admitted', job_id}
""", job=False)

# Undo an admission whose job could not be created (bad input found late, S3 or the queue down). KEYS: active
# set, jobs sorted set, Idempotency-Key record (or an unused name). ARGV: job_id.
ROLLBACK_ADMISSION = define_script("rollback_admission", """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local seen = redis.call('GET', KEYS[3])
if seen and string.sub(seen, -#ARGV[1]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
return 1
""", job=False)

# The position of a queued job in Celery's Redis queue: the messages that will be served before it. Kombu keeps
# one list per priority step (`queue`, `queue\x06\x163`, ...), LPUSHes and serves each from its tail, lower steps
# first. KEYS: the lists served before the job's own, then the job's own list last. ARGV: job_id, most entries to
# read. The lists before count by LLEN; the job's own list is read from its tail in chunks until the message
# naming the job_id is found: O(position) work in Redis, capped. Returns the position (0 = next), -1 when the
# message is in no list (a worker has taken it), -2 past the cap.
QUEUE_POSITION = define_script("queue_position", """
local job_id, cap, ahead = ARGV[1], tonumber(ARGV[2]), 0
for i = 1, #KEYS - 1 do ahead = ahead + redis.call('LLEN', KEYS[i]) end
local own, chunk = KEYS[#KEYS], 256
local length = redis.call('LLEN', own)
for start = 0, length - 1, chunk do
  if start >= cap then return -2 end
  local items = redis.call('LRANGE', own, -(start + chunk), -(start + 1))
  for j = #items, 1, -1 do
    if string.find(items[j], job_id, 1, true) then return ahead + start + #items - j end
  end
end
return -1
""", job=False)

# --- Webhooks (api/webhooks.py): the consumer group on the shared events stream, each delivery's hash, and the
# schedule of deliveries by due time (ms). Plain scripts. -----------------------------------------------------------
WEBHOOKS_GROUP = "inpaint:webhooks"
WEBHOOKS_DUE_KEY = "inpaint:webhooks:due"


def webhook_delivery_key(msg_id: str) -> str:
    return f"inpaint:webhook:{msg_id}"


# KEYS: shared stream, delivery hash, due set, job hash. ARGV: group, entry id, msg id, due (ms), job_id, owner, url,
# body, delivery TTL. Stores and schedules the delivery unless its record exists (a duplicate read of the entry),
# marks the job's webhook pending, and acknowledges the entry: all at once, so an event is never both acknowledged
# and unscheduled.
WEBHOOK_SCHEDULE = define_script("webhook_schedule", """
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[2], 'job_id', ARGV[5], 'owner', ARGV[6], 'url', ARGV[7], 'body', ARGV[8],
             'attempts', '0', 'state', 'pending')
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[9]))
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
  if redis.call('EXISTS', KEYS[4]) == 1 then
    redis.call('HINCRBY', KEYS[4], 'webhook_outstanding', 1)
    if redis.call('HGET', KEYS[4], 'webhook_state') ~= 'failed' then
      redis.call('HSET', KEYS[4], 'webhook_state', 'pending')
    end
  end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
""", job=False)

# KEYS: due set. ARGV: now (ms), lease end (ms), most to take. The deliveries due now, each moved to the lease end.
WEBHOOK_CLAIM_DUE = define_script("webhook_claim_due", """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, msg_id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], msg_id) end
return due
""", job=False)

# KEYS: delivery hash, due set, job hash. ARGV: msg id, lease end (ms) of the claim, outcome (pending = retry at
# ARGV[5], delivered, failed), the delivery's attempts so far, next due (ms), last error, finished record's TTL,
# '1' when this was an attempt (counted in the job's webhook_attempts). Nothing is written unless the claim's lease is
# still the delivery's due time (a claim that was taken over writes nothing).
WEBHOOK_FINISH = define_script("webhook_finish", """
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
local job = redis.call('EXISTS', KEYS[3]) == 1
if job and ARGV[8] == '1' then redis.call('HINCRBY', KEYS[3], 'webhook_attempts', 1) end
redis.call('HSET', KEYS[1], 'attempts', ARGV[4], 'last_error', ARGV[6])
if ARGV[3] == 'pending' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
  return 1
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'state', ARGV[3])
redis.call('HDEL', KEYS[1], 'body')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
if job then
  local left = redis.call('HINCRBY', KEYS[3], 'webhook_outstanding', -1)
  if ARGV[3] == 'failed' then
    redis.call('HSET', KEYS[3], 'webhook_state', 'failed')
  elseif left <= 0 and redis.call('HGET', KEYS[3], 'webhook_state') ~= 'failed' then
    redis.call('HSET', KEYS[3], 'webhook_state', 'delivered')
  end
end
return 1
""", job=False)
