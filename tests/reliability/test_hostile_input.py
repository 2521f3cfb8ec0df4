"""Hostile and malformed jobs sent straight to the queue (no client-side checks): each ends `failed` with its code
and a message, before any denoising; odd but valid images run; the workers keep serving. The client refuses bad
jobs before sending anything."""
import io
import math
import pickle
import struct
import threading
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from kombu import Connection
from PIL import Image

from api_client import schema, state
from tests.reliability.conftest import BUCKET, OTHER_BUCKET, sample_image, sample_mask

INVALID, LIMIT, NOT_FOUND = schema.INVALID_INPUT, schema.LIMIT_EXCEEDED, schema.INPUT_NOT_FOUND


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over an empty image stream: what a decompression bomb or a
    zero-sized image looks like before its pixels are read."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def animated(image_format: str) -> bytes:
    frames = [sample_image(), Image.new("RGB", (64, 64), "green")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=image_format, save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 200, 200, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def grey_16_bit() -> bytes:
    image = Image.new("I;16", (64, 64))
    image.putdata([50000] * (64 * 64))
    return png_bytes(image)


class CountingHandler(BaseHTTPRequestHandler):
    requests = 0

    def do_GET(self):
        CountingHandler.requests += 1
        self.send_response(200)
        self.end_headers()
        self.wfile.write(png_bytes(sample_image()))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server():
    """A web server the workers must never be made to call (SSRF)."""
    server = HTTPServer(("127.0.0.1", 0), CountingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def image_file(body_of):
    return lambda fleet, job_id, http: {"image": fleet.put_bytes(f"in/{job_id}/hostile", body_of())}


def field(**fields):
    return lambda fleet, job_id, http: fields


# name -> (what the job gets, expected code; None = the job runs and succeeds)
CASES = {
    "random bytes": (image_file(lambda: bytes(range(256)) * 40), INVALID),
    "truncated png": (image_file(lambda: png_bytes(sample_image())[:150]), INVALID),
    "decompression bomb header": (image_file(lambda: png_with_header_only(60000, 60000)), LIMIT),
    "zero-sized image": (image_file(lambda: png_with_header_only(0, 0)), INVALID),
    "one-pixel image": (image_file(lambda: png_bytes(Image.new("RGB", (1, 1)))), INVALID),
    "animated png": (image_file(lambda: animated("PNG")), INVALID),
    "animated webp": (image_file(lambda: animated("WEBP")), INVALID),
    "gif": (image_file(lambda: animated("GIF")), INVALID),
    "16-bit grey png runs": (image_file(grey_16_bit), None),
    "cmyk jpeg runs": (image_file(cmyk_jpeg), None),
    "mask of another size": (lambda f, j, h: {"mask": f.put_image(f"in/{j}/m", sample_mask((32, 32)))}, INVALID),
    "mask of another mode runs": (lambda f, j, h: {"mask": f.put_image(f"in/{j}/m", sample_mask().convert("RGBA"))},
                                  None),
    "steps 0": (field(num_inference_steps=0), INVALID),
    "steps huge": (field(num_inference_steps=10**9), LIMIT),
    "guidance nan": (field(guidance_scale=math.nan), INVALID),
    "guidance infinite": (field(guidance_scale=math.inf), INVALID),
    "guidance negative": (field(guidance_scale=-1.0), INVALID),
    "strength 0": (field(strength=0.0), INVALID),
    "strength over 1": (field(strength=1.5), INVALID),
    "strength negative": (field(strength=-0.5), INVALID),
    "thousands of images": (field(num_images=5000), LIMIT),
    "megabyte prompt": (field(prompt="x" * 1_000_000), LIMIT),
    "megabyte negative prompt": (field(negative_prompt="y" * 1_000_000), LIMIT),
    "unknown scheduler": (field(scheduler="turbo"), INVALID),
    "unknown field": (field(callback_url="http://127.0.0.1/"), INVALID),
    "steps as a string": (field(num_inference_steps="20"), INVALID),
    "seed as a bool": (field(seed=True), INVALID),
    "prompt as a number": (field(prompt=42), INVALID),
    "output as a list": (field(output=[BUCKET]), INVALID),
    "width not a multiple of 8": (field(width=60), INVALID),
    "http image (ssrf)": (lambda f, j, http: {"image": f"{http}/image.png"}, INVALID),
    "http mask (ssrf)": (lambda f, j, http: {"mask": f"{http}/mask.png"}, INVALID),
    "file uri": (field(image="file:///etc/passwd"), INVALID),
    "s3 uri without key": (field(image=f"s3://{BUCKET}/"), INVALID),
    "input bucket not allowed": (lambda f, j, h: {"image": f.put_image(f"in/{j}/i", sample_image(), OTHER_BUCKET)},
                                 INVALID),
    "output bucket not allowed": (lambda f, j, h: {"output": {"bucket": OTHER_BUCKET, "prefix": f"jobs/{j}/"}},
                                  INVALID),
    "missing key": (lambda f, j, h: {"mask": f"s3://{BUCKET}/in/{j}/nothing-here.png"}, NOT_FOUND),
}


@pytest.fixture(scope="module")
def outcomes(fleet, http_server):
    """Every hostile job sent at once; name -> final status."""
    fleet.proxy.restore()
    fleet.ensure_workers()
    sent = {}
    for name, (change, _) in CASES.items():
        job = fleet.raw_job()
        sent[name] = fleet.send_raw({**job, **change(fleet, job["job_id"], http_server)})
    return {name: fleet.wait_final(job_id) for name, job_id in sent.items()}


@pytest.mark.parametrize("name", CASES)
def test_hostile_job_ends_with_its_code(outcomes, name):
    status, expected = outcomes[name], CASES[name][1]
    if expected is None:
        assert status.state == schema.SUCCEEDED, status.error
        return
    assert status.state == schema.FAILED and status.error["code"] == expected, status.error
    assert status.error["message"] and status.step == 0   # refused before any denoising
    assert status.result is None


def test_no_url_was_ever_fetched(outcomes):
    assert CountingHandler.requests == 0


def test_sixteen_bit_input_keeps_its_brightness(outcomes, fleet):
    # A 16-bit grey of 50000/65535 is ~195/255 in 8 bits (not clipped to white); the unmasked pixels keep it.
    _, key = schema.parse_s3_uri("result", outcomes["16-bit grey png runs"].result["images"][0]["uri"])
    output = Image.open(io.BytesIO(fleet.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())).convert("RGB")
    assert all(abs(channel - 195) <= 2 for channel in output.getpixel((60, 60)))


def test_pickle_message_is_never_deserialised(outcomes, fleet, tmp_path):
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    job = fleet.raw_job()
    with Connection(fleet.redis_url) as connection:
        connection.Producer().publish(
            pickle.dumps(([job, Exploit()], {}, {})), routing_key="inpaint", content_type="application/x-python-serialize",
            content_encoding="binary", headers={"task": schema.TASK_NAME, "id": job["job_id"], "lang": "py"})
    follower = fleet.send_raw(fleet.raw_job())
    assert fleet.wait_final(follower).state == schema.SUCCEEDED
    fleet.wait_for(follower, lambda _: "Refusing to deserialize untrusted content" in fleet.logs(), timeout=30)
    assert not marker.exists()
    assert not fleet.redis.exists(state.job_key(job["job_id"]))


def test_workers_keep_serving_after_all_of_it(outcomes, fleet):
    assert fleet.wait_final(fleet.submit()).state == schema.SUCCEEDED
    assert len(fleet.live_workers()) >= 3


@pytest.mark.parametrize("options, words", [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"strength": 2.0}, "strength"),
    ({"guidance_scale": math.nan}, "guidance_scale"),
    ({"scheduler": "turbo"}, "scheduler"),
    ({"seed": "1"}, "seed"),
    ({"tile": True}, "unknown field"),
])
def test_client_refuses_bad_jobs_before_sending(fleet, options, words):
    job_id = uuid.uuid4().hex
    with pytest.raises(ValueError, match=words):
        fleet.client.submit(sample_image(), sample_mask(), "p", job_id=job_id, **options)
    assert not fleet.redis.exists(state.job_key(job_id))
    assert fleet.output_keys(job_id) == [] and not fleet.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"inputs/{job_id}/").get("Contents")
