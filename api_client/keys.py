"""API keys of the HTTP API (DESIGN §8), in Redis. Redis keeps a SHA-256 of each key, never the key itself.

Layout (every name from the functions below):
- `inpaint:apikey:<key_id>`: hash `key_id`, `name`, `key_sha256`, `queues` (comma-separated), `rate` (submits per
  minute, 0 = no limit), `max_active` (0 = no limit), `webhook_secret` (`whsec_` + base64, read by the webhook
  dispatcher), `created_at`. `key_id` is the first 16 hex digits of the key's SHA-256, so a request finds its
  record in one read; the full digest is then compared in constant time.
- `inpaint:apikeys`: hash name -> key_id (names are unique).
- `inpaint:apikey:<key_id>:jobs`: sorted set of the key's job ids by creation time (GET /v1/jobs);
  `inpaint:apikey:<key_id>:active`: set of its jobs not yet seen final (the max-active cap);
  `inpaint:apikey:<key_id>:rate:<minute>`: submissions in that minute; `inpaint:idempotency:<key_id>:<sha256>`:
  `<body sha256> <job_id>` of an Idempotency-Key. Job hashes get the field `owner` (the key_id).

Keys are `ik_` + 43 URL-safe characters (256 random bits), so a plain SHA-256 is as safe as a slow hash.
"""
import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

__all__ = ["ApiKey", "NewKey", "KeyCommandError", "create_key", "list_keys", "revoke_key", "key_digest", "key_id_of",
           "record_key", "names_key", "jobs_key", "active_key", "rate_key", "idempotency_key", "parse_record",
           "matches", "DEFAULT_RATE", "DEFAULT_MAX_ACTIVE", "KEY_PREFIX"]

KEY_PREFIX = "ik_"
DEFAULT_RATE = 60          # submissions per minute
DEFAULT_MAX_ACTIVE = 10    # jobs queued or running at once
NAMES_KEY = "inpaint:apikeys"


class KeyCommandError(ValueError):
    """A keys command that cannot be done (duplicate name, unknown name, bad option), with a clear message."""


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    queues: tuple[str, ...]
    rate: int
    max_active: int
    webhook_secret: str
    created_at: float

    def public(self) -> dict:
        """What `inpaint keys list` shows: never the key, its digest or the secret."""
        return {"name": self.name, "key_id": self.key_id, "queues": list(self.queues), "rate": self.rate,
                "max_active": self.max_active, "created_at": self.created_at}


@dataclass(frozen=True)
class NewKey:
    name: str
    key: str
    webhook_secret: str


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str:
    return key_digest(key)[:16]


def names_key() -> str:
    return NAMES_KEY


def record_key(key_id: str) -> str:
    return f"inpaint:apikey:{key_id}"


def jobs_key(key_id: str) -> str:
    return f"inpaint:apikey:{key_id}:jobs"


def active_key(key_id: str) -> str:
    return f"inpaint:apikey:{key_id}:active"


def rate_key(key_id: str, minute: int) -> str:
    return f"inpaint:apikey:{key_id}:rate:{minute}"


def idempotency_key(key_id: str, idempotency: str) -> str:
    return f"inpaint:idempotency:{key_id}:{hashlib.sha256(idempotency.encode()).hexdigest()}"


def parse_record(values: dict) -> ApiKey | None:
    """The key described by a record hash (str values); None for an empty hash (unknown or revoked)."""
    if not values:
        return None
    return ApiKey(key_id=values["key_id"], name=values["name"],
                  queues=tuple(q for q in values.get("queues", "").split(",") if q),
                  rate=int(values.get("rate") or 0), max_active=int(values.get("max_active") or 0),
                  webhook_secret=values["webhook_secret"], created_at=float(values.get("created_at") or 0))


def matches(values: dict, key: str) -> bool:
    """True when the record hash belongs to `key` (constant-time digest comparison)."""
    return bool(values) and hmac.compare_digest(values.get("key_sha256", ""), key_digest(key))


def _check_options(name: str, queues, rate: int, max_active: int) -> None:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise KeyCommandError(f"name: {name!r} must be 1-64 letters, digits, '-', '_' or '.'")
    if not queues or any(not q or "," in q for q in queues):
        raise KeyCommandError(f"queues: {','.join(queues)!r} must name at least one queue")
    for option, value in (("rate", rate), ("max_active", max_active)):
        if value < 0:
            raise KeyCommandError(f"{option}: {value} must be >= 0 (0 = no limit)")


def create_key(redis_client, name: str, queues, rate: int = DEFAULT_RATE,
               max_active: int = DEFAULT_MAX_ACTIVE) -> NewKey:
    """A new key named `name` (unique) for `queues`; the key and its webhook secret are returned once."""
    queues = tuple(queues)
    _check_options(name, queues, rate, max_active)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    key_id = key_id_of(key)
    record = {"key_id": key_id, "name": name, "key_sha256": key_digest(key), "queues": ",".join(queues),
              "rate": str(rate), "max_active": str(max_active), "webhook_secret": secret,
              "created_at": repr(time.time())}
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.watch(NAMES_KEY)   # name check and both writes as one transaction: no name without its record
        if pipe.hexists(NAMES_KEY, name):
            raise KeyCommandError(f"name: a key named {name!r} exists already; revoke it first or pick another "
                                  "name")
        pipe.multi()
        pipe.hset(record_key(key_id), mapping=record)
        pipe.hset(NAMES_KEY, name, key_id)
        pipe.execute()
    return NewKey(name=name, key=key, webhook_secret=secret)


def list_keys(redis_client) -> list[ApiKey]:
    """Every key, by name."""
    key_ids = redis_client.hgetall(NAMES_KEY)
    with redis_client.pipeline(transaction=False) as pipe:
        for name in sorted(key_ids):
            pipe.hgetall(record_key(key_ids[name]))
        records = pipe.execute()
    return [key for key in map(parse_record, records) if key is not None]


def revoke_key(redis_client, name: str) -> None:
    """Delete the key named `name`: its requests answer 401 from now on. Its jobs run to their end."""
    key_id = redis_client.hget(NAMES_KEY, name)
    if key_id is None:
        raise KeyCommandError(f"name: no key named {name!r}")
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.delete(record_key(key_id))
        pipe.hdel(NAMES_KEY, name)
        pipe.execute()

