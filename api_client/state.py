"""The job-state contract in Redis: the Lua scripts (DESIGN §4, §8). Stdlib only."""

# --- The HTTP API's scripts (api/): admission of a key's submission, its rollback, a queued job's position. ----
# Admission of one submission for a key, atomic. KEYS: the key's active set, its rate counter for this minute, its
# jobs sorted set, the Idempotency-Key's record (or any unused name when none). ARGV: job_id, rate (0 = none),
# max_active (0 = none), idempotency ('1' or '0'), body digest, idempotency TTL, now, state TTL, the job hash
# prefix. Returns {'admitted', job_id}, {'existing', job_id} (same Idempotency-Key and body), {'conflict', job_id}
# (same key, other body), {'rate_limited', ms until the minute ends} or {'busy', active count}. Jobs found final
# or expired leave the active set first, so the cap counts only jobs still queued or running.
ADMIT_SCRIPT = """
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
"""

# Undo an admission whose job could not be created (bad input found late, S3 or the queue down). KEYS: active
# set, jobs sorted set, Idempotency-Key record (or an unused name). ARGV: job_id.
ROLLBACK_SCRIPT = """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local seen = redis.call('GET', KEYS[3])
if seen and string.sub(seen, -#ARGV[1]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
return 1
"""

# The position of a queued job in Celery's Redis queue: the messages that will be served before it. Kombu keeps
# one list per priority step (`queue`, `queue\x06\x163`, ...), LPUSHes and serves each from its tail, lower steps
# first. KEYS: the lists served before the job's own, then the job's own list last. ARGV: job_id, most entries to
# read. The lists before count by LLEN; the job's own list is read from its tail in chunks until the message
# naming the job_id is found: O(position) work in Redis, capped. Returns the position (0 = next), -1 when the
# message is in no list (a worker has taken it), -2 past the cap.
QUEUE_POSITION_SCRIPT = """
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
"""

# --- Webhooks (api/webhooks.py): the consumer group on the shared events stream, each delivery's hash, and the
# schedule of deliveries by due time (ms). ------------------------------------------------------------------------
WEBHOOKS_GROUP = "inpaint:webhooks"
WEBHOOKS_DUE_KEY = "inpaint:webhooks:due"


def webhook_delivery_key(msg_id: str) -> str:
    return f"inpaint:webhook:{msg_id}"


# KEYS: shared stream, delivery hash, due set, job hash. ARGV: group, entry id, msg id, due (ms), job_id, owner, url,
# body, delivery TTL. Stores and schedules the delivery unless its record exists (a duplicate read of the entry),
# marks the job's webhook pending, and acknowledges the entry: all at once, so an event is never both acknowledged
# and unscheduled.
WEBHOOK_SCHEDULE_SCRIPT = """
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
"""

# KEYS: due set. ARGV: now (ms), lease end (ms), most to take. The deliveries due now, each moved to the lease end.
WEBHOOK_CLAIM_DUE_SCRIPT = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, msg_id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], msg_id) end
return due
"""

# KEYS: delivery hash, due set, job hash. ARGV: msg id, lease end (ms) of the claim, outcome (pending = retry at
# ARGV[5], delivered, failed), the delivery's attempts so far, next due (ms), last error, finished record's TTL,
# '1' when this was an attempt (counted in the job's webhook_attempts). Nothing is written unless the claim's lease is
# still the delivery's due time (a claim that was taken over writes nothing).
WEBHOOK_FINISH_SCRIPT = """
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
"""
