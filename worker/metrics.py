"""Prometheus metrics of a worker process, and its HTTP endpoint: `/metrics`, `/ready`, `/healthz`.

The job layer calls the module functions (`record_job`, `set_ready`, `observe_graph_captures`,
`observe_gpu_memory`); they update the process-wide `METRICS`. `start_metrics_server(port)` serves them on a
background thread. Each worker process serves its own port: the GPU supervisor (worker.gpus) gives process i the
port INPAINT_METRICS_PORT + i, and a prefork pool child adds its pool index (`metrics_port(base, index)`).

`/ready` answers 200 once the model is loaded and warmed (`set_ready(True)`), 503 before (a process whose model
does not load exits: worker.tasks); Kubernetes' readiness probe and the Docker HEALTHCHECK call it. `/healthz`
answers 200 while the process serves.
"""
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["FleetMetrics", "MetricsServer", "METRICS", "JOB_STATES", "start_metrics_server", "metrics_port",
           "record_job", "set_ready", "observe_graph_captures", "observe_gpu_memory"]

log = logging.getLogger("inpaint.metrics")

# The endings worker.jobs.run_job reports: final states, plus a retried, skipped (duplicate) or rejected delivery.
JOB_STATES = ("succeeded", "failed", "canceled", "retry", "skipped", "rejected")
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RUN_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 120, 300, 600)
STEPS_PER_S_BUCKETS = (0.5, 1, 2, 5, 10, 15, 20, 30, 40, 60, 80, 120)
MAX_PORT = 65535


class FleetMetrics:
    """The metrics of one worker process, in their own registry (no default process/platform collectors)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter("inpaint_jobs", "job deliveries by how they ended", ["state"], registry=r)
        for state in JOB_STATES:  # every series exists from the start, so rate() sees the first job
            self.jobs.labels(state=state)
        self.queue_wait = Histogram("inpaint_queue_wait_seconds", "time from submission to the start of the run",
                                    buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.run = Histogram("inpaint_run_seconds", "time a delivery ran (fetch, denoise, upload)",
                             buckets=RUN_BUCKETS, registry=r)
        self.steps_per_s = Histogram("inpaint_denoise_steps_per_second", "denoise steps per second of a "
                                     "succeeded job", buckets=STEPS_PER_S_BUCKETS, registry=r)
        self.last_steps_per_s = Gauge("inpaint_last_denoise_steps_per_second", "denoise steps per second of the "
                                      "latest succeeded job", registry=r)
        self.steps = Counter("inpaint_denoise_steps", "denoise steps of succeeded jobs", registry=r)
        self.images = Counter("inpaint_images", "images produced by succeeded jobs", registry=r)
        self.graphs = Counter("inpaint_cuda_graphs_captured", "CUDA graphs captured for the denoise loop",
                              registry=r)
        self.gpu_max_allocated = Gauge("inpaint_gpu_memory_max_allocated_bytes", "peak GPU memory held by "
                                       "tensors (torch.cuda.max_memory_allocated)", registry=r)
        self.gpu_reserved = Gauge("inpaint_gpu_memory_reserved_bytes", "GPU memory held by torch's caching "
                                  "allocator (torch.cuda.memory_reserved)", registry=r)
        self.ready = Gauge("inpaint_ready", "1 once the model is loaded and warmed, else 0", registry=r)
        self._ready = threading.Event()
        self._graphs_seen = 0

    def record_job(self, state: str, queue_wait_s: float | None, run_s: float, steps: int, images: int,
                   denoise_s: float | None = None) -> None:
        """One delivery ended. `steps` and `images` count what the delivery produced (0 unless it succeeded);
        steps/s is taken over `denoise_s` when the caller timed the denoise loop, else over `run_s`."""
        if state not in JOB_STATES:
            raise ValueError(f"state: {state!r} is not one of {', '.join(JOB_STATES)}")
        if run_s < 0 or steps < 0 or images < 0:
            raise ValueError(f"run_s, steps, images: must not be negative (got {run_s}, {steps}, {images})")
        self.jobs.labels(state=state).inc()
        if queue_wait_s is not None:
            # Submission time comes from the client's clock: a little skew must not make a negative wait.
            self.queue_wait.observe(max(0.0, queue_wait_s))
        self.run.observe(run_s)
        self.steps.inc(steps)
        self.images.inc(images)
        seconds = denoise_s if denoise_s is not None else run_s
        if state == "succeeded" and steps and seconds > 0:
            self.steps_per_s.observe(steps / seconds)
            self.last_steps_per_s.set(steps / seconds)

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)
        if ready:
            self._ready.set()
        else:
            self._ready.clear()

    def is_ready(self) -> bool:
        return self._ready.is_set()

    def observe_graph_captures(self, total: int) -> None:
        """The denoise runner's count of CUDA graphs captured so far: the counter moves up to it. A count below the
        last one comes from a new runner (a reloaded pipeline), which started again from zero."""
        self.graphs.inc(total - self._graphs_seen if total >= self._graphs_seen else total)
        self._graphs_seen = total

    def observe_gpu_memory(self, device=None) -> int | None:
        """Peak allocated bytes on `device` (the current CUDA device by default); None without CUDA or for a
        device that is not a GPU."""
        import torch  # here, not at the top: the client side and the GPU supervisor never load torch

        if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
            return None
        peak = torch.cuda.max_memory_allocated(device)
        self.gpu_max_allocated.set(peak)
        self.gpu_reserved.set(torch.cuda.memory_reserved(device))
        return peak

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """A running endpoint: `.port`, `.url`, `.stop()`."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread):
        self._httpd, self._thread = httpd, thread
        self.port = httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def _handler_for(metrics: FleetMetrics) -> type:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/ready":
                ready = metrics.is_ready()
                self._reply(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            else:
                self._reply(404, b"not found: /metrics, /ready, /healthz\n")

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            # Probes and scrapes hit this every few seconds: keep them out of the worker's log.
            return

    return Handler


def metrics_port(base: int, index: int) -> int:
    """The port of worker process `index` (GPU process or pool child) when the first serves on `base`."""
    if base == 0:
        return 0
    if index < 0 or not 0 < base + index <= MAX_PORT:
        raise ValueError(f"INPAINT_METRICS_PORT: {base} + process index {index} is not a usable port")
    return base + index


def start_metrics_server(port: int, metrics: FleetMetrics | None = None,
                         host: str = "0.0.0.0") -> MetricsServer | None:
    """Serve /metrics, /ready and /healthz on `port` in a daemon thread; port 0 means off (returns None)."""
    if port == 0:
        return None
    if not 0 < port <= MAX_PORT:
        raise ValueError(f"INPAINT_METRICS_PORT: {port} is not a port (1-{MAX_PORT}, or 0 for off)")
    try:
        httpd = ThreadingHTTPServer((host, port), _handler_for(metrics or METRICS))
    except OSError as error:
        raise OSError(f"INPAINT_METRICS_PORT: cannot serve metrics on {host}:{port}: {error}") from error
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name=f"metrics:{port}", daemon=True)
    thread.start()
    log.info("metrics server started", extra={"port": port})
    return MetricsServer(httpd, thread)


METRICS = FleetMetrics()
record_job = METRICS.record_job
set_ready = METRICS.set_ready
observe_graph_captures = METRICS.observe_graph_captures
observe_gpu_memory = METRICS.observe_gpu_memory
