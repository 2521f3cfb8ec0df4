"""api_client.inputs: the checks every client runs before it uploads or queues anything, and the worker's header
check that shares them (worker.jobs.decode_image)."""
import io

import pytest
from PIL import Image

from api_client import inputs, schema
from tests.reliability.test_hostile_input import png_with_header_only

LIMITS = schema.Limits(max_pixels=128 * 128, max_steps=60, max_images=2, max_prompt_chars=50)


def png(size=(64, 64), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def refused(code: str, *args, **kwargs) -> str:
    with pytest.raises(schema.JobError) as caught:
        inputs.check_submission(*args, **kwargs)
    assert caught.value.code == code
    return caught.value.message


def test_a_decompression_bomb_header_is_limit_exceeded_naming_the_file_and_the_limit(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_with_header_only(40000, 40000))   # PIL raises DecompressionBombError on open
    message = refused(schema.LIMIT_EXCEEDED, bomb, png(), "p", {}, LIMITS)
    assert message.startswith(f"image {bomb}: ") and "16384 pixels (INPAINT_MAX_PIXELS)" in message
    assert "\n" not in message


def test_a_header_over_pillows_warning_threshold_is_limit_exceeded_too():
    over_warning = png_with_header_only(10000, 10000)   # 100 Mpx: DecompressionBombWarning, not the error
    message = refused(schema.LIMIT_EXCEEDED, over_warning, png(), "p", {}, schema.Limits(max_pixels=10**9))
    assert message.startswith("image: ") and "INPAINT_MAX_PIXELS" in message


def test_an_image_over_the_service_limit_is_refused_from_its_header_alone():
    message = refused(schema.LIMIT_EXCEEDED, png(), png_with_header_only(256, 256), "p", {}, LIMITS)
    assert message == ("mask: 256x256 = 65536 pixels is over the limit of 16384 pixels (INPAINT_MAX_PIXELS)")


def test_image_and_mask_must_have_one_size():
    message = refused(schema.INVALID_INPUT, png((64, 64)), png((64, 32), "L"), "p", {}, LIMITS)
    assert message == "mask: size 64x32 differs from the image's 64x64"


@pytest.mark.parametrize("prompt, options, message", [
    ("x" * 51, {}, "prompt: 51 characters is over the limit of 50 characters"),
    ("p", {"negative_prompt": "n" * 60}, "negative_prompt: 60 characters is over the limit of 50 characters"),
    ("p", {"num_inference_steps": 61}, "num_inference_steps: 61 is over the limit of 60"),
    ("p", {"num_images": 3}, "num_images: 3 is over the limit of 2"),
    ("p", {"width": 256}, "size: 256x64 = 16384"),   # the output: width given, height the image's
])
def test_prompts_and_fields_within_their_limits(prompt, options, message):
    limits = schema.Limits(max_pixels=128 * 64, max_steps=60, max_images=2, max_prompt_chars=50)
    assert refused(schema.LIMIT_EXCEEDED, png(), png(), prompt, options, limits).startswith(message)


@pytest.mark.parametrize("value, message", [
    (b"GIF89a not really", "image: not a readable PNG, JPEG, WEBP image"),
    (png((4, 64)), "image: 4x64 is smaller than 8x8 pixels"),
    ("/no/such/file.png", "image: no such file: /no/such/file.png"),
    (3.5, "image: expected a PIL image, bytes, a path or an s3:// URI, got float"),
])
def test_unreadable_inputs_are_invalid_input(value, message):
    assert refused(schema.INVALID_INPUT, value, png(), "p", {}, LIMITS).startswith(message)


def test_local_inputs_come_back_as_files_to_send_and_s3_uris_as_they_are(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(png())
    checked = inputs.check_submission(path, "s3://bucket/mask.png", "p", {"width": 128}, LIMITS)
    assert checked["mask"] == "s3://bucket/mask.png"
    image = checked["image"]
    assert (image.body, image.extension, image.content_type, image.width, image.height) == (
        path.read_bytes(), "png", "image/png", 64, 64)
    from_pil = inputs.read_input("mask", Image.new("L", (64, 64), 255), LIMITS.max_pixels)
    assert Image.open(io.BytesIO(from_pil.body)).getpixel((0, 0)) == 255


def test_the_worker_refuses_what_the_client_refuses_with_the_same_message():
    from worker import jobs

    for data, code in ((png_with_header_only(40000, 40000), schema.LIMIT_EXCEEDED),
                       (png_with_header_only(256, 256), schema.LIMIT_EXCEEDED), (b"junk", schema.INVALID_INPUT)):
        with pytest.raises(schema.JobError) as on_worker:
            jobs.decode_image("image", data, LIMITS.max_pixels)
        with pytest.raises(schema.JobError) as on_client:
            inputs.read_input("image", data, LIMITS.max_pixels)
        assert (on_worker.value.code, on_worker.value.message) == (code, on_client.value.message)
