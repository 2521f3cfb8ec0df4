"""worker.metrics: the endpoint serves real values after record_job calls; /ready follows set_ready."""
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import FleetMetrics, metrics_port, start_metrics_server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} of an exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def served():
    metrics = FleetMetrics()
    server = start_metrics_server(free_port(), metrics, host="127.0.0.1")
    yield metrics, server
    server.stop()


def test_metrics_endpoint_reports_recorded_jobs(served):
    metrics, server = served
    metrics.record_job("succeeded", queue_wait_s=1.5, run_s=4.0, steps=20, images=2)
    metrics.record_job("succeeded", queue_wait_s=0.2, run_s=2.0, steps=30, images=1, denoise_s=1.0)
    metrics.record_job("failed", queue_wait_s=None, run_s=0.3, steps=0, images=0)
    metrics.observe_graph_captures(1)
    status, text = get(server.url + "/metrics")
    assert status == 200
    values = samples(text)
    assert values[("inpaint_jobs_total", frozenset({("state", "succeeded")}))] == 2
    assert values[("inpaint_jobs_total", frozenset({("state", "failed")}))] == 1
    assert values[("inpaint_jobs_total", frozenset({("state", "canceled")}))] == 0
    assert values[("inpaint_queue_wait_seconds_count", frozenset())] == 2
    assert values[("inpaint_queue_wait_seconds_sum", frozenset())] == pytest.approx(1.7)
    assert values[("inpaint_run_seconds_count", frozenset())] == 3
    assert values[("inpaint_run_seconds_bucket", frozenset({("le", "2.0")}))] == 2
    assert values[("inpaint_denoise_steps_total", frozenset())] == 50
    assert values[("inpaint_images_total", frozenset())] == 3
    assert values[("inpaint_denoise_steps_per_second_sum", frozenset())] == pytest.approx(20 / 4.0 + 30 / 1.0)
    assert values[("inpaint_last_denoise_steps_per_second", frozenset())] == pytest.approx(30.0)
    assert values[("inpaint_cuda_graphs_captured_total", frozenset())] == 1


def test_graph_captures_follow_the_runners_count():
    metrics = FleetMetrics()

    def captured() -> float:
        return samples(metrics.exposition().decode())[("inpaint_cuda_graphs_captured_total", frozenset())]

    for total, expected in ((0, 0), (2, 2), (2, 2), (5, 5), (1, 6)):   # 1: a reloaded pipeline's new runner
        metrics.observe_graph_captures(total)
        assert captured() == expected


def test_ready_endpoint_follows_set_ready(served):
    metrics, server = served
    assert get(server.url + "/ready")[0] == 503
    assert samples(get(server.url + "/metrics")[1])[("inpaint_ready", frozenset())] == 0
    metrics.set_ready(True)
    assert get(server.url + "/ready") == (200, "ready\n")
    assert samples(get(server.url + "/metrics")[1])[("inpaint_ready", frozenset())] == 1
    metrics.set_ready(False)
    assert get(server.url + "/ready")[0] == 503
    assert get(server.url + "/healthz")[0] == 200
    assert get(server.url + "/nothing")[0] == 404


def test_negative_queue_wait_from_clock_skew_counts_as_zero():
    metrics = FleetMetrics()
    metrics.record_job("succeeded", queue_wait_s=-0.4, run_s=1.0, steps=1, images=1)
    values = samples(metrics.exposition().decode())
    assert values[("inpaint_queue_wait_seconds_sum", frozenset())] == 0
    assert values[("inpaint_queue_wait_seconds_bucket", frozenset({("le", "0.1")}))] == 1


@pytest.mark.parametrize("state, run_s, steps", [("done", 1.0, 1), ("succeeded", -1.0, 1), ("failed", 1.0, -2)])
def test_record_job_refuses_bad_values(state, run_s, steps):
    with pytest.raises(ValueError, match="state|negative"):
        FleetMetrics().record_job(state, queue_wait_s=0.0, run_s=run_s, steps=steps, images=0)


def test_gpu_memory_is_observed_only_with_cuda():
    import torch

    metrics = FleetMetrics()
    peak = metrics.observe_gpu_memory()
    value = samples(metrics.exposition().decode())[("inpaint_gpu_memory_max_allocated_bytes", frozenset())]
    if torch.cuda.is_available():
        assert peak == torch.cuda.max_memory_allocated() and value == peak
    else:
        assert peak is None and value == 0
    assert metrics.observe_gpu_memory(torch.device("cpu")) is None  # a CPU worker on a GPU host: nothing to read


def test_ports_per_process_and_off():
    assert metrics_port(9400, 0) == 9400
    assert metrics_port(9400, 3) == 9403
    assert metrics_port(0, 3) == 0
    assert start_metrics_server(0) is None
    with pytest.raises(ValueError, match="INPAINT_METRICS_PORT"):
        metrics_port(65535, 1)
    with pytest.raises(ValueError, match="INPAINT_METRICS_PORT"):
        start_metrics_server(70000)


def test_busy_port_is_a_clear_error(served):
    _, server = served
    with pytest.raises(OSError, match="INPAINT_METRICS_PORT"):
        start_metrics_server(server.port, FleetMetrics(), host="127.0.0.1")
