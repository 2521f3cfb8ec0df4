"""The pure parts of api/webhooks.py: which URLs are refused, the Standard Webhooks signature, the event mapping,
the body and the retry delays. No network beyond 127.0.0.1 (IP literals and `localhost` resolve locally)."""
import base64
import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from api import webhooks
from api_client import schema, state

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
JOB_ID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("url, words", [
    ("http://127.0.0.1:8080/hook", ["127.0.0.1", "loopback"]),
    ("http://127.1.2.3/hook", ["loopback"]),
    ("http://localhost:9/hook", ["localhost resolves to", "loopback"]),   # a DNS name, checked after resolving
    ("http://[::1]/hook", ["::1", "loopback"]),
    ("http://10.1.2.3/hook", ["private"]),
    ("https://172.16.0.1/hook", ["private"]),
    ("http://192.168.1.1/hook", ["private"]),
    ("http://169.254.169.254/latest/meta-data", ["link-local"]),       # the cloud metadata service
    ("http://[fe80::1]/hook", ["link-local"]),
    ("http://224.0.0.1/hook", ["multicast"]),
    ("http://239.255.255.250/hook", ["multicast"]),
    ("http://[ff02::1]/hook", ["multicast"]),
    ("http://0.0.0.0/hook", ["unspecified"]),
    ("http://[::]/hook", ["unspecified"]),
    ("http://240.0.0.1/hook", ["reserved"]),
    ("http://[fc00::1]/hook", ["private"]),
    ("http://[fec0::1]/hook", ["private"]),
    ("http://100.64.0.1/hook", ["not globally routable"]),             # carrier-grade NAT
    ("http://[::ffff:127.0.0.1]/hook", ["loopback"]),                  # IPv4-mapped IPv6
    ("http://[::ffff:10.0.0.1]/hook", ["private"]),
    ("http://[2002:7f00:1::1]/hook", ["loopback"]),                     # 6to4 around 127.0.0.1
    ("http://[64:ff9b::a00:1]/hook", ["private"]),                      # NAT64 around 10.0.0.1
])
def test_non_public_addresses_are_refused_with_their_range_named(url, words):
    with pytest.raises(webhooks.WebhookURLError) as refused:
        webhooks.check_webhook_url(url, allow_hosts=())
    message = str(refused.value)
    for word in words:
        assert word in message
    assert isinstance(refused.value, ValueError)   # the submit turns it into a 422


@pytest.mark.parametrize("url, words", [
    ("ftp://example.com/hook", ["'ftp'", "http or https"]),
    ("file:///etc/passwd", ["'file'"]),
    ("example.com/hook", ["scheme"]),
    ("http:///hook", ["no host"]),
    ("https://user:secret@93.184.215.14/hook", ["password"]),
    ("http://93.184.215.14/" + "a" * 3000, ["over the limit of 2048"]),
    ("http://[::1/hook", ["not a valid URL"]),
])
def test_malformed_urls_are_refused_clearly(url, words):
    with pytest.raises(webhooks.WebhookURLError) as refused:
        webhooks.check_webhook_url(url, allow_hosts=())
    for word in words:
        assert word in str(refused.value)
    assert "secret" not in str(refused.value)   # a password in the URL is never echoed


def test_a_url_that_is_not_a_string_is_refused():
    with pytest.raises(webhooks.WebhookURLError, match="expected a URL string, got int"):
        webhooks.check_webhook_url(42, allow_hosts=())


@pytest.mark.parametrize("url", ["https://93.184.215.14/hook", "http://[2606:4700:4700::1111]:8443/x?y=1"])
def test_public_addresses_pass(url):
    webhooks.check_webhook_url(url, allow_hosts=())


def test_allow_hosts_lets_exactly_the_listed_host_or_ip_through():
    webhooks.check_webhook_url("http://127.0.0.1:8080/hook", allow_hosts=["127.0.0.1"])
    webhooks.check_webhook_url("http://[::1]:8080/hook", allow_hosts=[" ::1 "])
    webhooks.check_webhook_url("http://LocalHost:8080/hook", allow_hosts=["localhost"])   # names: any case
    with pytest.raises(webhooks.WebhookURLError, match="127.0.0.2"):   # exactly: no range, no neighbour
        webhooks.check_webhook_url("http://127.0.0.2:8080/hook", allow_hosts=["127.0.0.1"])
    with pytest.raises(webhooks.WebhookURLError, match="private"):
        webhooks.check_webhook_url("http://10.0.0.1/hook", allow_hosts=["127.0.0.1", "localhost"])


def test_a_listed_address_lets_a_name_resolving_to_it_through_but_every_address_is_checked():
    # localhost may resolve to 127.0.0.1 and ::1: every address must be public or listed.
    assert webhooks.allowed_addresses("hooks.test", ["127.0.0.1"], ["127.0.0.1"]) == ("127.0.0.1",)
    with pytest.raises(webhooks.WebhookURLError, match="hooks.test resolves to 10.0.0.7, a private address"):
        webhooks.allowed_addresses("hooks.test", ["93.184.215.14", "10.0.0.7"], ["127.0.0.1"])
    assert webhooks.allowed_addresses("hooks.test", ["93.184.215.14", "93.184.215.14"], ()) == ("93.184.215.14",)


def test_a_host_without_address_is_unresolvable():
    with pytest.raises(webhooks.UnresolvableHost, match="has no address"):
        webhooks.allowed_addresses("hooks.test", [], ())


def test_target_connects_to_the_checked_address_but_keeps_host_header_and_tls_name():
    target = webhooks.Target(webhooks.httpx.URL("https://Hooks.Example.com:8443/in?x=1"), ("2606:4700::1111",))
    assert str(target.request_url("2606:4700::1111")) == "https://[2606:4700::1111]:8443/in?x=1"
    assert target.headers == {"host": "hooks.example.com:8443"}
    assert target.extensions == {"sni_hostname": "hooks.example.com"}
    plain = webhooks.Target(webhooks.httpx.URL("http://hooks.example.com/in"), ("93.184.215.14",))
    assert plain.extensions == {} and str(plain.request_url("93.184.215.14")) == "http://93.184.215.14/in"


def test_signature_verifies_with_the_standardwebhooks_package():
    body = webhooks.webhook_body("completed", 1_760_000_000.5, {"id": JOB_ID, "state": "succeeded"})
    now = int(time.time())
    headers = webhooks.sign(SECRET, "msg_1", now, body)
    assert headers["webhook-id"] == "msg_1" and headers["webhook-timestamp"] == str(now)
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace("succeeded", "failed"), headers)
    other = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)


def test_signature_is_hmac_sha256_of_id_timestamp_and_body():
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    expected = base64.b64encode(hmac.new(key, b"msg_2.1700000000.{}", hashlib.sha256).digest()).decode()
    assert webhooks.sign(SECRET, "msg_2", 1_700_000_000, "{}")["webhook-signature"] == f"v1,{expected}"


@pytest.mark.parametrize("type_, state_, expected", [
    (state.EVENT_STATE, schema.QUEUED, None),
    (state.EVENT_STATE, schema.RUNNING, "start"),
    (state.EVENT_PROGRESS, schema.RUNNING, "progress"),
    (state.EVENT_RETRY, schema.RUNNING, None),
    (state.EVENT_STATE, schema.SUCCEEDED, "completed"),
    (state.EVENT_STATE, schema.FAILED, "completed"),
    (state.EVENT_STATE, schema.CANCELED, "completed"),
])
def test_events_map_to_the_three_filters(type_, state_, expected):
    entry = {"job_id": JOB_ID, "type": type_, "state": state_, "step": "3", "total_steps": "10", "ts": "0",
             "data": "{}"}
    assert webhooks.webhook_event(state.parse_event(entry)) == expected


def test_body_has_type_iso_timestamp_and_the_job_object():
    body = json.loads(webhooks.webhook_body("progress", 1_700_000_000.25, {"id": JOB_ID}))
    assert body == {"type": "job.progress", "timestamp": "2023-11-14T22:13:20.250000Z", "data": {"id": JOB_ID}}


def test_job_filters_default_to_completed():
    assert webhooks.job_filters({}) == ["completed"]
    assert webhooks.job_filters({"webhook_events": "not json"}) == ["completed"]
    assert webhooks.job_filters({"webhook_events": '["start", "progress"]'}) == ["start", "progress"]


def test_retry_delays_double_from_the_base_up_to_the_cap():
    assert [webhooks.retry_delay_s(n, 10.0, 60.0) for n in range(1, 6)] == [10.0, 20.0, 40.0, 60.0, 60.0]


def test_webhook_settings_are_checked_and_listed_in_the_readme():
    from dataclasses import fields

    from api.settings import ApiSettings

    base = {"INPAINT_BUCKET": "b"}
    with pytest.raises(ValueError, match="INPAINT_WEBHOOK_RECLAIM_S=10.0: must exceed INPAINT_WEBHOOK_TIMEOUT_S"):
        ApiSettings.from_env({**base, "INPAINT_WEBHOOK_TIMEOUT_S": "10", "INPAINT_WEBHOOK_RECLAIM_S": "10"})
    with pytest.raises(ValueError, match="INPAINT_WEBHOOK_BACKOFF_S=31.0: outside"):   # first retry within 30 s
        ApiSettings.from_env({**base, "INPAINT_WEBHOOK_BACKOFF_S": "31"})
    settings = ApiSettings.from_env({**base, "INPAINT_WEBHOOK_ALLOW_HOSTS": "127.0.0.1, localhost"})
    assert settings.webhook_hosts == {"127.0.0.1", "localhost"}
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    variables = [f.metadata["variable"] for f in fields(ApiSettings) if f.name.startswith("webhook_")]
    assert len(variables) == 7 and all(f"`{variable}`" in readme for variable in variables)


def test_dispatcher_needs_decoded_replies_and_reads_within_the_socket_timeout():
    import redis.asyncio

    from api.settings import ApiSettings

    settings = ApiSettings.from_env({"INPAINT_BUCKET": "b"})
    with pytest.raises(ValueError, match="decode_responses=True"):
        webhooks.Dispatcher(redis.asyncio.Redis(), settings)
    quick = webhooks.Dispatcher(redis.asyncio.Redis(decode_responses=True, socket_timeout=0.2), settings)
    assert quick._block_ms == 100   # a blocking read never looks like a Redis timeout
    assert webhooks.Dispatcher(redis.asyncio.Redis(decode_responses=True), settings)._block_ms == 500
