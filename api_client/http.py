"""The Python client over the HTTP API (DESIGN §8): the methods of InpaintClient, for services that hold an API key
instead of the fleet's Redis and bucket. `InpaintClient.from_env()` returns one when INPAINT_API_URL and
INPAINT_API_KEY are set.

Differences that follow from HTTP: the service picks the job id (a `job_id=` given to submit() is sent as the
Idempotency-Key, so resubmitting it returns the first job and does not run it again); inputs travel inline as data
URIs (or as s3:// URIs of uploads and allowed buckets); results are fetched through their presigned URLs.
"""
import base64
import io
import json
import os
import time
from datetime import datetime
from pathlib import Path

import httpx
from PIL import Image

from api_client import inputs, schema

__all__ = ["HttpInpaintClient", "ApiRequestError", "job_status"]

# How long one SSE read may stay silent: the server sends a keep-alive comment every INPAINT_API_KEEPALIVE_S.
STREAM_READ_TIMEOUT_S = 60.0


class ApiRequestError(RuntimeError):
    """An answer of the API that is not the job's fault nor the caller's input: unauthorized, not_found,
    conflict, rate_limited, unavailable, internal. `status`, `code`, `message` and `retry_after` (seconds or None)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def _seconds(iso_time: str | None) -> float | None:
    if not iso_time:
        return None
    return datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp()


def job_status(job: dict) -> schema.JobStatus:
    """The JobStatus of an API job object (times back to seconds since the epoch)."""
    return schema.JobStatus(job_id=job["id"], state=job["state"], phase=job.get("phase") or "", step=job["step"], total_steps=job["total_steps"],
                            attempt=job["attempt"], created_at=_seconds(job["created_at"]),
                            started_at=_seconds(job["started_at"]), finished_at=_seconds(job["finished_at"]),
                            error=job["error"], result=job["result"])


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        code, message = schema.INTERNAL, f"HTTP {response.status_code}: {response.text[:200]}"
    if response.status_code in (400, 422) and code in schema.ERROR_CODES:
        raise schema.JobError(code, message)
    retry_after = response.headers.get("Retry-After")
    raise ApiRequestError(response.status_code, code, message,
                          float(retry_after) if retry_after and retry_after.isdigit() else None)


class HttpInpaintClient:
    """Blocking client of the HTTP API with InpaintClient's methods. Use as a context manager, or call close()."""

    def __init__(self, api_url: str, api_key: str, timeout_s: float = 30.0, limits: schema.Limits = schema.Limits()):
        """limits: the service's limits, checked before anything is sent (the API checks them again)."""
        self.api_url = api_url.rstrip("/")
        self.limits = limits
        self._http = httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {api_key}"},
                                  timeout=timeout_s)

    @classmethod
    def from_env(cls, environ=None) -> "HttpInpaintClient":
        env = os.environ if environ is None else environ
        return cls(env["INPAINT_API_URL"], env["INPAINT_API_KEY"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "HttpInpaintClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ApiRequestError(0, "unavailable", f"{self.api_url}: {type(error).__name__}: {error}") from None
        _raise_for_error(response)
        return response.json()

    def submit(self, image, mask, prompt: str, **job_options) -> str:
        """Send the job (local images inline as data URIs); returns the job id the service gave it."""
        options = {name: value for name, value in job_options.items() if name not in ("job_id", "output_format")}
        checked = inputs.check_submission(image, mask, prompt, options, self.limits)
        body = {"image": _input(checked["image"]), "mask": _input(checked["mask"]), "prompt": prompt, **job_options}
        idempotency = body.pop("job_id", None)
        headers = {"Idempotency-Key": idempotency} if idempotency else {}
        return self._request("POST", "/v1/jobs", json=body, headers=headers)["id"]

    def job(self, job_id: str) -> dict:
        """The API's job object (queue_position, webhook, urls, ...)."""
        return self._request("GET", f"/v1/jobs/{job_id}")

    def status(self, job_id: str) -> schema.JobStatus:
        """The job's state; `expired` when the service does not know it (or it is another key's)."""
        try:
            return job_status(self.job(job_id))
        except ApiRequestError as error:
            if error.status == 404:
                return schema.JobStatus(job_id=job_id, state=schema.EXPIRED)
            raise

    def events(self, job_id: str, timeout: float | None = None):
        """Yield the job's events from its first; ends after a final state. A dropped stream is resumed after the
        last event received (Last-Event-ID). Raises TimeoutError when `timeout` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last_id = None
        while True:
            try:
                for entry_id, event in self._stream(job_id, last_id, deadline):
                    last_id = entry_id
                    yield event
                return
            except (httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ConnectError):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id}: not finished within the timeout") from None
                time.sleep(0.5)

    def _stream(self, job_id: str, last_id: str | None, deadline: float | None):
        headers = {"Last-Event-ID": last_id} if last_id else {}
        read_timeout = STREAM_READ_TIMEOUT_S if deadline is None else max(0.1, deadline - time.monotonic())
        with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                               timeout=httpx.Timeout(self._http.timeout.connect, read=read_timeout)) as response:
            if not response.is_success:
                response.read()
                _raise_for_error(response)
            entry_id = None
            for line in response.iter_lines():
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id}: not finished within the timeout")
                if line.startswith("id: "):
                    entry_id = line[4:]
                elif line.startswith("data: "):
                    yield entry_id, json.loads(line[6:])

    def wait(self, job_id: str, timeout: float | None = None) -> schema.JobStatus:
        for _ in self.events(job_id, timeout=timeout):
            pass
        return self.status(job_id)

    def fetch(self, job_id: str) -> list[Image.Image]:
        """A succeeded job's images, through their presigned URLs."""
        images = []
        for _, body in self._image_files(job_id):
            image = Image.open(io.BytesIO(body))
            image.load()
            images.append(image)
        return images

    def download(self, job_id: str, folder) -> list[Path]:
        """Save a succeeded job's image files in `folder` (named <job_id>-<i>.<format>, as InpaintClient does)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        paths = []
        for name, body in self._image_files(job_id):
            paths.append(Path(folder) / name)
            paths[-1].write_bytes(body)
        return paths

    def _image_files(self, job_id: str) -> list[tuple[str, bytes]]:
        status = self.status(job_id)
        if status.state != schema.SUCCEEDED:
            raise ValueError(f"job {status.job_id}: no images to fetch, the job is {status.state}")
        files = []
        for image in status.result["images"]:
            _, key = schema.parse_s3_uri("result", image["uri"])
            response = httpx.get(image["url"], timeout=self._http.timeout)
            if not response.is_success:
                raise ApiRequestError(response.status_code, "unavailable", f"result {image['uri']}: HTTP "
                                      f"{response.status_code} from the object store")
            files.append(("-".join(key.split("/")[-2:]), response.content))
        return files

    def cancel(self, job_id: str) -> str:
        """Cancel the job; returns the state it was in, as InpaintClient.cancel does (`expired` for an unknown
        job, a final state when there was nothing to cancel). The API's cancel itself is atomic; the state is read
        just before it."""
        found = self.status(job_id).state
        if found in (schema.QUEUED, schema.RUNNING):
            self._request("POST", f"/v1/jobs/{job_id}/cancel")
        return found


def _input(value: "inputs.LocalImage | str") -> str:
    """A checked input as the API takes it: s3:// URIs as they are, local files inline as data URIs."""
    if isinstance(value, str):
        return value
    return f"data:{value.content_type};base64,{base64.b64encode(value.body).decode()}"
