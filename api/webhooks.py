"""Signed webhooks (DESIGN §8): where a job's webhook may point, how a POST is signed, and the dispatcher that turns
the fleet's job events into POSTs, at least once.

Public names:
- `check_webhook_url(url, allow_hosts)`: raises `WebhookURLError` (a ValueError) naming the problem; the submit
  answers 422. `resolve_target(url, allow_hosts)`: the same check at delivery time, returning the addresses to
  connect to (the checked ones: a DNS answer that changes between check and connect is never used).
- `sign(secret, msg_id, timestamp, body) -> headers`: the Standard Webhooks headers (`webhook-id`,
  `webhook-timestamp`, `webhook-signature`).
- `webhook_event(event) -> "start" | "progress" | "completed" | None`: the filter name an event of the shared
  stream passes (DESIGN §4's entries, as the worker and the client write them).
- `Dispatcher(redis, settings)`: `dispatcher.start()` (or `await dispatcher.run()`) until `await dispatcher.stop()`;
  one in every inpaint-api process, started by the app's lifespan (never in a GPU worker). `redis` is a
  `redis.asyncio.Redis` with `decode_responses=True`. The body's job object is `api.render.render_job`'s.

How a delivery survives a lost process:
1. Every API process reads the shared stream in the consumer group `inpaint:webhooks`: each entry goes to one
   process. An entry read by a process that dies before step 2 stays pending in the group; another process takes
   it over with XAUTOCLAIM once it has been idle `INPAINT_WEBHOOK_RECLAIM_S`.
2. For an event that needs a POST, one script stores the delivery (hash `inpaint:webhook:<msg id>`, with the body
   rendered once, so every retry sends the same bytes under the same `webhook-id`), puts it on the schedule (sorted
   set `inpaint:webhooks:due`, score = when it is due, in ms) and acknowledges the entry, atomically.
3. A process takes due deliveries with one script that moves each one's due time `INPAINT_WEBHOOK_RECLAIM_S` ahead:
   that is its lease. If the process dies mid-POST, the delivery is due again when the lease runs out, for any
   process to take. The outcome is written only while the lease is still the one taken (a claim taken over by
   another process writes nothing).
"""
import asyncio
import ipaddress
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx
import redis.asyncio
import redis.exceptions
from standardwebhooks import Webhook

from api import render
from api_client import keys, schema, state

__all__ = ["WebhookURLError", "UnresolvableHost", "Target", "check_webhook_url", "resolve_target",
           "allowed_addresses", "sign", "webhook_event", "webhook_body", "job_filters", "retry_delay_s", "Dispatcher",
           "EVENT_FILTERS", "DEFAULT_EVENTS", "PENDING", "DELIVERED", "FAILED"]

log = logging.getLogger("inpaint.webhooks")

EVENT_FILTERS = ("start", "progress", "completed")   # what a job's webhook_events may list
DEFAULT_EVENTS = ("completed",)
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
MAX_URL_CHARS = 2048
POLL_S = 0.5                  # longest wait for new events; also how often due retries are looked for
BATCH = 100                   # events read (or reclaimed) at once
DONE_TTL_S = 24 * 3600        # a finished delivery's record (without its body) stays this long: a late duplicate
                              # of its event (an entry reclaimed from a stalled process) finds it and sends nothing
STALE_CONSUMER_MS = 3600_000  # a consumer with nothing pending and idle this long (a process gone) is removed
USER_AGENT = "inpaint-fleet-webhooks"


# --- Where a webhook may point ------------------------------------------------------------------------------------

class WebhookURLError(ValueError):
    """A webhook URL that is refused: malformed, not http(s), or reaching a non-public address. The message names
    the problem without the field's name (the caller prefixes `webhook: `)."""


class UnresolvableHost(WebhookURLError):
    """The host has no address now (DNS failure): refused at submit, retried at delivery."""


@dataclass(frozen=True)
class Target:
    """Where one POST goes: the URL as given, and the checked addresses to connect to, in the resolver's order."""
    url: httpx.URL
    addresses: tuple[str, ...]

    def request_url(self, address: str) -> httpx.URL:
        return self.url.copy_with(host=address)

    @property
    def headers(self) -> dict:
        return {"host": self.url.netloc.decode("ascii")}

    @property
    def extensions(self) -> dict:
        # TLS is negotiated and its certificate checked for the URL's host name, not for the address.
        return {"sni_hostname": self.url.raw_host.decode("ascii")} if self.url.scheme == "https" else {}


def _parse(url) -> tuple[httpx.URL, str, int]:
    if not isinstance(url, str):
        raise WebhookURLError(f"expected a URL string, got {type(url).__name__}")
    if len(url) > MAX_URL_CHARS:
        raise WebhookURLError(f"the URL is {len(url)} characters long, over the limit of {MAX_URL_CHARS}")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as error:
        raise WebhookURLError(f"not a valid URL ({error})") from None
    if parsed.scheme not in ("http", "https"):
        raise WebhookURLError(f"scheme {parsed.scheme or '(none)'!r} is not accepted; use http or https")
    if not parsed.host:
        raise WebhookURLError("the URL has no host")
    if parsed.userinfo:
        raise WebhookURLError("user name or password in the URL are not accepted (the signature "
                              "authenticates our POSTs)")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed, parsed.raw_host.decode("ascii"), port


def _normalized_hosts(allow_hosts) -> frozenset:
    """Host names lowercased and IPs in their canonical form, so `::1` matches `[::1]` and `0:0::1`."""
    hosts = set()
    for host in allow_hosts:
        host = host.strip().lower()
        try:
            hosts.add(str(ipaddress.ip_address(host)))
        except ValueError:
            hosts.add(host)
    return frozenset(hosts)


def _embedded_ipv4(ip) -> list:
    """The IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo, NAT64): each is checked too."""
    if ip.version != 6:
        return []
    embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
    if ip in ipaddress.ip_network("64:ff9b::/96"):
        embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [address for address in embedded if address is not None]


_REFUSED = (("unspecified", lambda ip: ip.is_unspecified), ("loopback", lambda ip: ip.is_loopback),
            ("link-local", lambda ip: ip.is_link_local), ("multicast", lambda ip: ip.is_multicast),
            ("private", lambda ip: ip.is_private or getattr(ip, "is_site_local", False)),
            ("reserved", lambda ip: ip.is_reserved), ("not globally routable", lambda ip: not ip.is_global))


def _refused_range(address: str) -> str | None:
    """The kind of range that makes `address` unreachable for webhooks, or None for a public address."""
    ip = ipaddress.ip_address(address)
    for candidate in (ip, *_embedded_ipv4(ip)):
        for kind, is_in in _REFUSED:
            if is_in(candidate):
                return kind
    return None


def allowed_addresses(host: str, addresses, allow_hosts) -> tuple[str, ...]:
    """`addresses` (what `host` resolves to), each checked: all must be public unless the host, or that address,
    is listed in `allow_hosts` exactly. Raises WebhookURLError naming the host, the address and its range."""
    unique = tuple(dict.fromkeys(str(ipaddress.ip_address(a.split("%")[0])) for a in addresses))
    if not unique:
        raise UnresolvableHost(f"host {host!r} has no address")
    allowed = _normalized_hosts(allow_hosts)
    if host.lower() in allowed or _canonical_ip(host) in allowed:
        return unique
    for address in unique:
        kind = _refused_range(address)
        if kind and address not in allowed:
            where = f"{host} is" if _canonical_ip(host) == address else f"{host} resolves to {address},"
            raise WebhookURLError(f"{where} a {kind} address; webhooks only go to public addresses "
                                  "(loopback, private, link-local, multicast and reserved ranges are refused)")
    return unique


def _canonical_ip(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise UnresolvableHost(f"cannot resolve host {host!r} ({error})") from None
    return [info[4][0] for info in infos]


def check_webhook_url(url, allow_hosts) -> None:
    """Refuse (WebhookURLError, a ValueError) a URL that is not http(s), does not resolve, or resolves to any
    non-public address, unless its host name or IP is in `allow_hosts` (INPAINT_WEBHOOK_ALLOW_HOSTS) exactly.
    Blocking (DNS): call it from a thread in async code."""
    _parsed, host, port = _parse(url)
    allowed_addresses(host, _resolve(host, port), allow_hosts)


async def resolve_target(url, allow_hosts) -> Target:
    """`check_webhook_url` at delivery time: resolve again, check every address, and return the checked ones."""
    parsed, host, port = _parse(url)
    addresses = await asyncio.to_thread(_resolve, host, port)
    return Target(parsed, allowed_addresses(host, addresses, allow_hosts))


# --- Signing and the body ----------------------------------------------------------------------------------------

def sign(secret: str, msg_id: str, timestamp: int, body: str) -> dict:
    """The Standard Webhooks headers of one POST: HMAC-SHA256 of "{msg_id}.{timestamp}.{body}" keyed by `secret`
    (`whsec_` + base64), as the `standardwebhooks` package computes and verifies it."""
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, timezone.utc), body)
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def webhook_event(event: dict) -> str | None:
    """Which filter an event passes: a job starting to run (each attempt), a progress step, or the job's end."""
    if event["type"] == state.EVENT_PROGRESS:
        return "progress"
    if event["type"] == state.EVENT_STATE and event["state"] == schema.RUNNING:
        return "start"
    if event["type"] == state.EVENT_STATE and event["state"] in schema.FINAL_STATES:
        return "completed"
    return None


def webhook_body(kind: str, ts: float, job: dict) -> str:
    """The POST's body: the same bytes on every retry of one event (they are what the signature covers)."""
    return json.dumps({"type": f"job.{kind}", "timestamp": render.iso_time(ts), "data": job},
                      separators=(",", ":"))


def job_filters(fields: dict) -> list[str]:
    """The job's `webhook_events` (a JSON list written at submit); the default when it is missing."""
    try:
        events = json.loads(fields.get("webhook_events") or "null")
    except ValueError:
        events = None
    return events if isinstance(events, list) else list(DEFAULT_EVENTS)


# --- The dispatcher ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    """How one try of a delivery ended: the delivery's next state and why (for the log and the record)."""
    state: str            # PENDING (retry later), DELIVERED or FAILED
    detail: str
    counted: bool = True  # an attempt at delivery (False: dropped without trying, e.g. after an earlier 410)


def retry_delay_s(attempts: int, base_s: float, cap_s: float) -> float:
    """The wait after `attempts` failed tries: the base after the first, doubled after each further one, capped."""
    return min(base_s * 2 ** max(attempts - 1, 0), cap_s)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Dispatcher:
    """Delivers the webhooks of job events, at least once, from any number of API processes (see the module's
    docstring). Settings: `webhook_timeout_s`, `webhook_max_attempts`, `webhook_backoff_s`,
    `webhook_backoff_max_s`, `webhook_reclaim_s`, `webhook_concurrency`, `webhook_hosts`, `state_ttl_s`."""

    def __init__(self, redis_client: redis.asyncio.Redis, settings):
        if not redis_client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("Dispatcher: the Redis client must be created with decode_responses=True")
        self.redis, self.settings = redis_client, settings
        # A blocking read must end well within the client's socket timeout, or it would count as Redis being down.
        socket_timeout = redis_client.get_connection_kwargs().get("socket_timeout")
        self._block_ms = max(1, int(1000 * min(POLL_S, socket_timeout / 2 if socket_timeout else POLL_S)))
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._scripts = state.Scripts(redis_client, settings.state_ttl_s, settings.events_maxlen)
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()   # a delivery was scheduled or a slot freed: look for due ones now
        self._started = False
        self._group_ready = False
        self._reclaim_cursor, self._next_reclaim = "0-0", 0.0
        self._in_flight: set[asyncio.Task] = set()
        self._http: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None   # start()'s: a reference keeps it from being collected

    async def run(self) -> None:
        """Read, schedule and deliver until `stop()`. Redis being down pauses the loops, never ends them."""
        self._started = True
        client = httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=self.settings.webhook_timeout_s,
                                   headers={"user-agent": USER_AGENT},
                                   # one connection per POST: a pooled one could carry another host's TLS session
                                   limits=httpx.Limits(max_keepalive_connections=0))
        try:
            async with client as self._http:
                # Two loops: the stream read blocks up to POLL_S, and must not hold back a delivery whose slot or
                # due time has come.
                await asyncio.gather(self._loop(self._read), self._loop(self._deliver_due))
                await self._drain()
        finally:
            self._stopped.set()

    def start(self) -> "Dispatcher":
        """Run in a background task of the running event loop."""
        self._task = asyncio.create_task(self.run(), name="inpaint-webhooks")
        return self

    async def stop(self) -> None:
        """Stop reading; deliveries in flight get up to the POST timeout to end (any that does not is taken over
        by another process once its lease runs out)."""
        self._stopping.set()
        self._wake.set()
        if self._started:
            await self._stopped.wait()

    async def _loop(self, step) -> None:
        while not self._stopping.is_set():
            try:
                await step()
            except redis.exceptions.ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
                self._group_ready = False   # the stream or group is gone (a Redis without persistence restarted)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
                log.warning("webhook dispatcher: Redis unavailable; trying again", extra={"error": str(error)})
                await self._pause(1.0)
            except Exception:   # a bug must not end webhook delivery for this process: log it, go on
                log.exception("webhook dispatcher step failed")
                await self._pause(1.0)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _read(self) -> None:
        """Read new events (and take over those of lost processes); schedule the ones that need a POST."""
        if not self._group_ready:
            await self._create_group()
        if time.monotonic() >= self._next_reclaim:
            await self._reclaim()
        reply = await self.redis.xreadgroup(state.WEBHOOKS_GROUP, self.consumer, {state.EVENTS_STREAM: ">"},
                                            count=BATCH, block=self._block_ms)
        for _stream, entries in reply or []:
            await self._accept(entries)

    async def _deliver_due(self) -> None:
        """Start the due deliveries there are free slots for; then wait for a slot, a new delivery or POLL_S."""
        await self._start_due()
        try:
            await asyncio.wait_for(self._wake.wait(), POLL_S)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    async def _create_group(self) -> None:
        try:   # from the stream's end: a new group does not replay history
            await self.redis.xgroup_create(state.EVENTS_STREAM, state.WEBHOOKS_GROUP, id="$", mkstream=True)
        except redis.exceptions.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._group_ready = True

    async def _reclaim(self) -> None:
        """Take over entries another (dead) process read but never scheduled; forget consumers long gone."""
        reclaim_ms = int(self.settings.webhook_reclaim_s * 1000)
        reply = await self.redis.xautoclaim(state.EVENTS_STREAM, state.WEBHOOKS_GROUP, self.consumer,
                                            min_idle_time=reclaim_ms, start_id=self._reclaim_cursor, count=BATCH)
        self._reclaim_cursor, entries = reply[0], reply[1]
        if entries:
            log.info("webhook events taken over from a lost process", extra={"count": len(entries)})
            await self._accept(entries)
        for consumer in await self.redis.xinfo_consumers(state.EVENTS_STREAM, state.WEBHOOKS_GROUP):
            if consumer["pending"] == 0 and consumer["idle"] > STALE_CONSUMER_MS:
                await self.redis.xgroup_delconsumer(state.EVENTS_STREAM, state.WEBHOOKS_GROUP, consumer["name"])
        if self._reclaim_cursor == "0-0":   # a full pass is done: the next one starts after a pause
            self._next_reclaim = time.monotonic() + self.settings.webhook_reclaim_s / 2

    async def _accept(self, entries) -> None:
        """Schedule the deliveries of these entries; acknowledge the rest at once."""
        unwanted = []
        for entry_id, fields in entries:
            if fields is None:   # trimmed from the stream while pending
                unwanted.append(entry_id)
                continue
            try:
                if not await self._schedule_entry(entry_id, fields):
                    unwanted.append(entry_id)
            except redis.exceptions.RedisError:
                raise
            except Exception:   # an entry that cannot be read must not come back forever
                log.exception("webhook event skipped", extra={"entry_id": entry_id})
                unwanted.append(entry_id)
        if unwanted:
            await self.redis.xack(state.EVENTS_STREAM, state.WEBHOOKS_GROUP, *unwanted)
        if len(unwanted) < len(entries):
            self._wake.set()

    async def _schedule_entry(self, entry_id: str, fields: dict) -> bool:
        event = state.parse_event(fields)
        kind = webhook_event(event)
        if kind is None:
            return False
        job_id = event["job_id"]
        # Most events (progress of jobs without a webhook) stop at this small read; the whole hash only when sending.
        url, events, webhook_state = await self.redis.hmget(state.job_key(job_id), "webhook_url", "webhook_events",
                                                            "webhook_state")
        if not url or kind not in job_filters({"webhook_events": events}) or webhook_state == FAILED:
            return False
        job = await self.redis.hgetall(state.job_key(job_id))
        msg_id = f"msg_{job_id}_{entry_id}"
        body = webhook_body(kind, event["ts"], render.render_job(job_id, job))
        await self._scripts.run(state.WEBHOOK_SCHEDULE,
                                [state.EVENTS_STREAM, state.webhook_delivery_key(msg_id), state.WEBHOOKS_DUE_KEY,
                                 state.job_key(job_id)],
                                [state.WEBHOOKS_GROUP, entry_id, msg_id, _now_ms(), job_id, job.get("owner", ""),
                                 url, body, self.settings.state_ttl_s])
        return True

    async def _start_due(self) -> None:
        free = self.settings.webhook_concurrency - len(self._in_flight)
        if free <= 0:
            return
        now_ms = _now_ms()
        lease_ms = now_ms + int(self.settings.webhook_reclaim_s * 1000)
        for msg_id in await self._scripts.run(state.WEBHOOK_CLAIM_DUE, [state.WEBHOOKS_DUE_KEY],
                                              [now_ms, lease_ms, free]):
            task = asyncio.create_task(self._deliver(msg_id, lease_ms))
            self._in_flight.add(task)
            task.add_done_callback(self._delivery_done)

    def _delivery_done(self, task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        self._wake.set()

    async def _drain(self) -> None:
        if self._in_flight:
            _done, late = await asyncio.wait(self._in_flight, timeout=self.settings.webhook_timeout_s)
            for task in late:
                task.cancel()

    async def _deliver(self, msg_id: str, lease_ms: int) -> None:
        try:
            record = await self.redis.hgetall(state.webhook_delivery_key(msg_id))
            if record.get("state") != PENDING:   # gone (expired) or finished: only its schedule entry was left
                await self.redis.zrem(state.WEBHOOKS_DUE_KEY, msg_id)
                return
            outcome = await self._attempt(msg_id, record)
            attempts = int(record["attempts"]) + (1 if outcome.counted else 0)
            if outcome.state == PENDING and attempts >= self.settings.webhook_max_attempts:
                outcome = Attempt(FAILED, f"{outcome.detail}; gave up after {attempts} attempts")
            delay_s = retry_delay_s(attempts, self.settings.webhook_backoff_s, self.settings.webhook_backoff_max_s)
            next_due = _now_ms() + int(delay_s * 1000)
            written = await self._scripts.run(state.WEBHOOK_FINISH,
                                              [state.webhook_delivery_key(msg_id), state.WEBHOOKS_DUE_KEY,
                                               state.job_key(record["job_id"])],
                                              [msg_id, lease_ms, outcome.state, attempts, next_due, outcome.detail,
                                               DONE_TTL_S, "1" if outcome.counted else "0"])
            log.info("webhook " + ("retry scheduled" if outcome.state == PENDING else outcome.state),
                     extra={"msg_id": msg_id, "job_id": record["job_id"], "attempts": attempts,
                            "detail": outcome.detail, "host": httpx.URL(record["url"]).host,
                            "recorded": bool(written)})
        except Exception:   # the lease runs out and the delivery is tried again
            log.exception("webhook delivery failed unexpectedly", extra={"msg_id": msg_id})

    async def _attempt(self, msg_id: str, record: dict) -> Attempt:
        if await self.redis.hget(state.job_key(record["job_id"]), "webhook_state") == FAILED:
            return Attempt(FAILED, "an earlier delivery of this job's webhook failed; nothing more is sent",
                           counted=False)
        secret = await self.redis.hget(keys.record_key(record["owner"]), "webhook_secret")
        if not secret:
            return Attempt(FAILED, "the job's API key was revoked: no secret to sign with", counted=False)
        try:
            target = await resolve_target(record["url"], self.settings.webhook_hosts)
        except UnresolvableHost as error:
            return Attempt(PENDING, str(error))
        except WebhookURLError as error:
            return Attempt(FAILED, str(error), counted=False)
        headers = sign(secret, msg_id, int(time.time()), record["body"])
        try:
            status = await asyncio.wait_for(self._post(target, headers, record["body"]),
                                            self.settings.webhook_timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return Attempt(PENDING, f"no answer within {self.settings.webhook_timeout_s}s")
        except httpx.HTTPError as error:
            return Attempt(PENDING, f"{type(error).__name__}: {error}")
        if 200 <= status < 300:
            return Attempt(DELIVERED, f"answered {status}")
        if status == 410:
            return Attempt(FAILED, "answered 410 Gone: no more deliveries for this job")
        return Attempt(PENDING, f"answered {status}" + (" (redirects are not followed)" if 300 <= status < 400
                                                       else ""))

    async def _post(self, target: Target, headers: dict, body: str) -> int:
        """POST to the checked addresses in turn (the next one only when connecting fails); the status code. The
        answer's body is never read."""
        error = None
        for address in target.addresses:
            try:
                async with self._http.stream("POST", target.request_url(address), content=body.encode(),
                                             headers={**headers, **target.headers,
                                                      "content-type": "application/json"},
                                             extensions=target.extensions) as response:
                    return response.status_code
            except httpx.ConnectError as connect_error:
                error = connect_error
        raise error
