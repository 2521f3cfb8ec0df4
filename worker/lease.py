"""Leases on running jobs: a heartbeat keeps the running attempt's lease alive, a watchdog re-dispatches jobs whose
lease expired (their worker was killed, ran out of memory or lost its node).

Celery's Redis transport delivers an unacknowledged message again only after the visibility timeout (longer than
the longest run), so a lost worker's job would wait that long. Instead, as Dramatiq does with worker heartbeats:

- the attempt that claimed a job (worker.events) renews `lease_until` in the job's hash every `heartbeat_s`, and
  files the job in the sorted set `inpaint:leases` (score: lease_until);
- every worker runs a watchdog that looks in that set for leases that passed, takes the job out of the set and
  sends it (its JSON is kept in the hash) to the queue again, once per expired attempt. The new delivery's claim
  starts attempt n + 1 (or fails the job once it started `max_attempts` times); a delivery that finds the job
  final, or leased by a live attempt, drops itself.

Each check-and-write is one Lua script of api_client.state (RENEW_LEASE, EXPIRE_LEASE), so two watchdogs never
both re-dispatch the same expiry, and a heartbeat of an attempt that lost the job never revives it. A copy is sent
once, not again and again while it waits behind a backlog; if its sender dies before sending, the dead worker's own
message still comes back after Celery's visibility timeout. Lease times are wall-clock seconds (time.time()): the
workers' clocks must agree to well within a lease (NTP).
"""
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import redis

from api_client.state import (EVENTS_STREAM_MAXLEN, EXPIRE_LEASE, LEASES_KEY, RENEW_LEASE, STATE_TTL_SECONDS,
                              Scripts, job_key)

__all__ = ["renew", "forget", "expired_jobs", "redispatch_expired", "Heartbeat", "Watchdog"]

log = logging.getLogger("inpaint.lease")


def renew(client: redis.Redis, job_id: str, attempt: int, lease_s: float, now: float | None = None) -> bool:
    """Move the lease of `attempt` to now + lease_s; False when that attempt no longer owns a running job."""
    lease_until = (time.time() if now is None else now) + lease_s
    keys, args = [job_key(job_id), LEASES_KEY], [job_id, attempt, repr(lease_until)]
    return bool(Scripts(client).run(RENEW_LEASE, keys, args))


def forget(client: redis.Redis, job_id: str) -> None:
    """Stop watching the job: it was given back for a retry, whose message waits in the queue (for as long as the
    backlog ahead of it lasts). A second copy from a watchdog would only burn an attempt."""
    client.zrem(LEASES_KEY, job_id)


def expired_jobs(client: redis.Redis, now: float | None = None, limit: int = 100) -> list[str]:
    """Job ids whose lease has passed: the candidates of redispatch_expired."""
    now = time.time() if now is None else now
    return list(client.zrangebyscore(LEASES_KEY, "-inf", repr(now), start=0, num=limit))


def redispatch_expired(client: redis.Redis, dispatch: Callable[[dict], None],
                       ttl_s: int = STATE_TTL_SECONDS, events_maxlen: int = EVENTS_STREAM_MAXLEN,
                       now: float | None = None) -> list[str]:
    """Send every job whose lease expired to the queue again (`dispatch(job)`), once; the ids sent."""
    now = time.time() if now is None else now
    scripts = Scripts(client, ttl_s, events_maxlen)
    sent = []
    for job_id in expired_jobs(client, now):
        reply = scripts.run_job(EXPIRE_LEASE, job_id, extra_keys=[LEASES_KEY], now=now)
        if _text(reply[0]) != "expired":
            continue
        log.warning("lease expired, job sent again", extra={"job_id": job_id})
        try:
            dispatch(json.loads(_text(reply[1])))
        except Exception:
            client.zadd(LEASES_KEY, {job_id: now})   # not sent: the next look tries again
            raise
        sent.append(job_id)
    return sent


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Ticker:
    """Calls `tick()` every `interval_s` on a daemon thread until stop() or until it returns False; errors are
    logged, not raised, so an outage only delays the next tick."""

    def __init__(self, name: str, interval_s: float, tick: Callable[[], bool | None]):
        self.interval_s, self._tick = interval_s, tick
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _loop(self) -> None:
        while True:
            try:
                if self._tick() is False:
                    return
            except Exception:   # Redis or the broker away: a dead thread would stop leases for good; try again
                log.exception(f"{self._thread.name} failed")
            if self._stopped.wait(self.interval_s):
                return


@dataclass
class Heartbeat:
    """`with Heartbeat(...)`: renews the attempt's lease now and every `interval_s` while the block runs.
    `lost` turns True when another attempt took the job over (this one's writes are refused from then on)."""
    client: redis.Redis
    job_id: str
    attempt: int
    lease_s: float
    interval_s: float
    lost: bool = False

    def beat(self) -> bool:
        if renew(self.client, self.job_id, self.attempt, self.lease_s):
            return True
        self.lost = True
        log.info("lease no longer held", extra={"job_id": self.job_id, "attempt": self.attempt})
        return False

    def __enter__(self) -> "Heartbeat":
        self._ticker = _Ticker(f"heartbeat-{self.job_id}", self.interval_s, self.beat).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._ticker.stop()


class Watchdog:
    """A daemon thread in each worker process: every `interval_s`, re-dispatches the jobs whose lease expired."""

    def __init__(self, client: redis.Redis, dispatch: Callable[[dict], None], interval_s: float,
                 ttl_s: int = STATE_TTL_SECONDS, events_maxlen: int = EVENTS_STREAM_MAXLEN):
        self.client, self.dispatch = client, dispatch
        self.ttl_s, self.events_maxlen = ttl_s, events_maxlen
        self._ticker = _Ticker("lease-watchdog", interval_s, self.tick)

    def tick(self) -> None:
        redispatch_expired(self.client, self.dispatch, self.ttl_s, self.events_maxlen)

    def start(self) -> "Watchdog":
        self._ticker.start()
        return self

    def stop(self) -> None:
        self._ticker.stop()
