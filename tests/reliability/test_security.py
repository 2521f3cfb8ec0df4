"""Security: credentials never in logs, events, states or results; JSON-only Celery; boto3 retry and checksum
settings; presigned URLs with the configured expiry; Redis over TLS with a password."""
import subprocess
import time
import urllib.parse

import pytest
import redis

from api_client import schema
from api_client.client import InpaintClient
from tests.reliability.conftest import AWS_SECRET, BUCKET, REDIS_PASSWORD, WORKER_ENV, sample_image, sample_mask
from tests import devstack
from worker.app import create_app
from worker.settings import Settings
from worker.storage import Storage

TLS_PASSWORD = "tls-S3cret-0b2e"


def everything_in_redis(client: redis.Redis) -> str:
    """Every hash and stream entry in the state Redis, as one text."""
    parts = []
    for key in client.scan_iter(count=500):
        kind = client.type(key)
        if kind == "hash":
            parts.append(repr(client.hgetall(key)))
        elif kind == "stream":
            parts.append(repr(client.xrange(key)))
    return "\n".join(parts)


def test_credentials_never_in_logs_events_states_or_results(healthy_fleet):
    fleet = healthy_fleet
    succeeded = fleet.wait_final(fleet.submit())
    fleet.proxy.cut()
    failed = fleet.wait_final(fleet.submit(), timeout=60)   # storage errors carry endpoint messages
    fleet.proxy.restore()
    assert (succeeded.state, failed.state) == (schema.SUCCEEDED, schema.FAILED)
    texts = {"worker logs": fleet.logs(), "redis": everything_in_redis(fleet.redis),
             "results": repr([succeeded.result, failed.error])}
    for where, text in texts.items():
        assert REDIS_PASSWORD not in text and AWS_SECRET not in text, where
    assert "rel-key-id" in succeeded.result["images"][0]["url"]   # the key id is public; only the secret is not


def test_presigned_urls_expire_as_configured(healthy_fleet):
    status = healthy_fleet.wait_final(healthy_fleet.submit())
    query = urllib.parse.parse_qs(urllib.parse.urlparse(status.result["images"][0]["url"]).query)
    assert query["X-Amz-Expires"] == [WORKER_ENV["INPAINT_PRESIGN_EXPIRY_S"]]


def test_celery_accepts_json_only():
    conf = create_app(Settings()).conf
    assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == conf.event_serializer == "json"


def test_s3_client_retries_in_standard_mode_and_checksums_only_when_required():
    storage = Storage.from_settings(Settings(bucket=BUCKET, s3_endpoint_url="http://127.0.0.1:9"))
    config = storage.client.meta.config
    assert config.retries["mode"] == "standard"
    assert config.request_checksum_calculation == "when_required"
    assert storage.allowed_buckets == {BUCKET}


@pytest.fixture
def tls_redis(tmp_path):
    """redis-server listening on TLS only, with a password; its certificate is its own CA."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    port = devstack.free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
         "--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "key.pem"),
         "--tls-ca-cert-file", str(tmp_path / "cert.pem"), "--tls-auth-clients", "no",
         "--requirepass", TLS_PASSWORD, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ca = urllib.parse.quote(str(tmp_path / "cert.pem"))
    url = f"rediss://:{TLS_PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    deadline = time.monotonic() + 10
    while True:
        try:
            with redis.Redis.from_url(url, socket_timeout=1) as client:
                client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline and process.poll() is None, "TLS redis-server did not start"
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(10)


def test_worker_and_client_over_tls_with_a_password(tls_redis, rel_s3, tiny_model_dir, tmp_path, monkeypatch):
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(variable, WORKER_ENV[variable])   # the client's boto3 reads them
    env = devstack.worker_env(tls_redis, rel_s3.endpoint_url, BUCKET, tiny_model_dir,
                              **{**WORKER_ENV, "INPAINT_LOG_LEVEL": "INFO"})
    worker = devstack.start_worker(env, args=["--without-mingle", "--without-gossip"],
                                   log_path=tmp_path / "tls-worker.log")
    try:
        devstack.wait_worker_ready(tls_redis, worker, timeout=180)
        with InpaintClient(broker_url=tls_redis, s3_endpoint_url=rel_s3.endpoint_url, bucket=BUCKET) as client:
            job_id = client.submit(sample_image(), sample_mask(), "a red square", num_inference_steps=2,
                                   scheduler="ddim", seed=3)
            status = client.wait(job_id, timeout=90)
            assert status.state == schema.SUCCEEDED, status.error
        # A plain (non-TLS) connection to the same port gets nowhere.
        plain = tls_redis.replace("rediss://", "redis://").split("?")[0]
        with pytest.raises(redis.ConnectionError), redis.Redis.from_url(plain, socket_timeout=2) as client:
            client.ping()
    finally:
        worker.stop()
    assert TLS_PASSWORD not in worker.log_text()
