"""The job object of the HTTP API (DESIGN §8), rendered from the job's state hash; GET /v1/jobs/{id}, the list,
the SSE-free answers and the webhook bodies all use `render_job`."""
import json
from datetime import datetime, timezone
from typing import Callable

from api_client import schema

__all__ = ["render_job", "iso_time", "job_urls"]


def iso_time(seconds) -> str | None:
    """An epoch time (float or its text) as ISO 8601 UTC, or None."""
    if seconds in (None, ""):
        return None
    return datetime.fromtimestamp(float(seconds), tz=timezone.utc).isoformat().replace("+00:00", "Z")


def job_urls(job_id: str) -> dict:
    base = f"/v1/jobs/{job_id}"
    return {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"}


def _webhook(values: dict) -> dict | None:
    if not values.get("webhook_url"):
        return None
    return {"url": values["webhook_url"], "events": json.loads(values.get("webhook_events") or '["completed"]'),
            "state": values.get("webhook_state") or "pending", "attempts": int(values.get("webhook_attempts") or 0)}


def _result(result: dict | None, presign: Callable[[str], str] | None) -> dict | None:
    """The worker's result, each image's `url` presigned afresh when `presign` is given (the stored one may have
    expired)."""
    if not result or presign is None:
        return result
    images = [{**image, "url": presign(image["uri"])} if image.get("uri") else image for image in result["images"]]
    return {**result, "images": images}


def render_job(job_id: str, values: dict, presign: Callable[[str], str] | None = None,
               queue_position: int | None = None) -> dict:
    """The job object of one state hash (str keys and values, as redis-py returns with decode_responses).

    presign(uri) -> URL renews the result's image URLs; queue_position is shown while the job is queued."""
    status = schema.JobStatus.from_hash(job_id, values)
    return {"id": job_id, "state": status.state, "phase": status.phase or None,
            "step": status.step, "total_steps": status.total_steps, "queue_position": queue_position if status.state == schema.QUEUED else None,
            "attempt": status.attempt, "queue": values.get("queue") or None,
            "created_at": iso_time(status.created_at), "started_at": iso_time(status.started_at),
            "finished_at": iso_time(status.finished_at), "error": status.error,
            "result": _result(status.result, presign), "webhook": _webhook(values), "urls": job_urls(job_id)}
