"""The web page at `/` of a real `inpaint-api`, driven in a real Chromium, with redis-server, moto S3 and a worker on
the tiny model behind it (this folder's `stack`): paint a mask and submit, follow the progress to "Result 1",
reopen the job from the recent jobs, cancel a running job, inpaint again from a result, and the errors in words
(a bad key, an image over the limit). Jobs are small (64x64, a few steps) so each test takes seconds."""
import hashlib
import io
import json
import random
import re

import boto3
import pytest
from PIL import Image

from api_client import schema, state
from tests.api.conftest import JOB_TIMEOUT_S, MAX_BODY_BYTES, WORKER_ENV
from tests.browser import browser, drag, page  # noqa: F401  (fixtures)
from tests.service.conftest import sample_image

JOB_TIMEOUT_MS = JOB_TIMEOUT_S * 1000
# Records every text the progress line shows, so a test can check what was seen while the job ran.
RECORD_PROGRESS = """() => {
    window.progressSeen = [];
    const line = document.getElementById("progress-text");
    new MutationObserver(() => window.progressSeen.push(line.textContent))
        .observe(line, {childList: true, characterData: true, subtree: true});
}"""


@pytest.fixture
def key(stack, key_name) -> str:
    return stack.new_key(key_name)


@pytest.fixture
def s3(stack):
    return boto3.client("s3", endpoint_url=stack.s3_endpoint_url, aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"],
                        region_name=stack.env["AWS_DEFAULT_REGION"])


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "photo.png"
    sample_image().save(path)
    return path


def open_page(tab, stack, key: str) -> None:
    tab.goto(f"{stack.url}/")
    tab.get_by_label("API key").fill(key)
    tab.get_by_label("API key").press("Enter")
    tab.evaluate(RECORD_PROGRESS)


def fill_job(tab, image_file, steps: int, prompt: str = "a red square") -> None:
    tab.get_by_label("Image", exact=True).set_input_files(image_file)
    drag(tab, (0.2, 0.2), (0.8, 0.8))
    tab.get_by_label("Prompt", exact=True).fill(prompt)
    tab.get_by_label("Steps").fill(str(steps))
    tab.get_by_label("Seed").fill("7")
    tab.get_by_label("Scheduler").select_option("ddim")


def inpaint(tab, image_file, steps: int, prompt: str = "a red square") -> str:
    """Fill the form, paint, click Inpaint; the id of the job the page then follows."""
    fill_job(tab, image_file, steps, prompt)
    tab.get_by_role("button", name="Inpaint").click()
    tab.wait_for_function("() => current && current.id")
    return tab.evaluate("current.id")


def stored_job(stack, job_id: str) -> dict:
    """The job as the API submitted it (image and mask as s3:// URIs)."""
    return json.loads(stack.redis.hget(state.job_key(job_id), "job"))


def read_image(s3, uri: str) -> Image.Image:
    bucket, key = schema.parse_s3_uri("uri", uri)
    return Image.open(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))


def expect_result(tab, number: int = 1):
    result = tab.get_by_role("img", name=f"Result {number}", exact=True)
    result.wait_for(state="visible", timeout=JOB_TIMEOUT_MS)
    tab.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=result.element_handle())
    return result


def test_paint_submit_watch_the_progress_and_see_the_result(page, stack, key, image_file, s3):
    open_page(page, stack, key)
    job_id = inpaint(page, image_file, steps=3)
    expect_result(page)

    seen = page.evaluate("window.progressSeen")
    running = [text for text in seen if text.startswith("Running")]
    assert any(re.search(r"step [12]/3, \d+\.\d s elapsed, ETA ", text) for text in running), seen
    assert page.get_by_role("status").filter(has_text="Done").count() == 1
    assert page.get_by_role("img", name="Before").is_visible() and page.get_by_role("img", name="After").is_visible()
    # What was sent: the painted mask as white on black at the image's size, the image itself, the form's values.
    job = stored_job(stack, job_id)
    assert (job["num_inference_steps"], job["seed"], job["scheduler"]) == (3, 7, "ddim")
    sent_mask = read_image(s3, job["mask"]).convert("L")
    assert sent_mask.size == sample_image().size
    assert sent_mask.getpixel((32, 32)) == 255 and sent_mask.getpixel((2, 60)) == 0
    assert read_image(s3, job["image"]).convert("RGB").tobytes() == sample_image().tobytes()


def test_recent_jobs_reopen_their_inputs_and_results(page, stack, key, image_file, browser):
    open_page(page, stack, key)
    job_id = inpaint(page, image_file, steps=2, prompt="a blue door")
    expect_result(page)

    page.reload()   # a fresh page: nothing of the job left in memory
    opener = page.get_by_role("button", name=f"Open job {job_id}")
    opener.click()
    expect_result(page)
    assert page.get_by_label("Prompt", exact=True).input_value() == "a blue door"
    assert page.get_by_label("Steps").input_value() == "2"
    assert page.evaluate("!mask.isEmpty() && [mask.canvas.width, mask.canvas.height]") == list(sample_image().size)

    # Another browser (no inputs kept there) still reopens the results, and says why the inputs are missing.
    other = browser.new_context()
    try:
        elsewhere = other.new_page()
        open_page(elsewhere, stack, key)
        elsewhere.get_by_role("button", name=f"Open job {job_id}").click()
        expect_result(elsewhere)
        assert "not sent from this browser" in elsewhere.get_by_text("not sent from this browser").inner_text()
    finally:
        other.close()


def test_a_dropped_event_stream_is_resumed_after_the_last_event_seen(page, stack, key, image_file):
    sent_ids, delivered_ids = [], []   # the Last-Event-ID of each events request; the ids the first one got

    def end_the_first_stream_early(route):
        sent_ids.append(route.request.headers.get("last-event-id"))
        if len(sent_ids) > 1:
            return route.continue_()
        whole = route.fetch(timeout=JOB_TIMEOUT_MS)   # the real stream, to the job's end
        first_two = [block for block in whole.text().split("\n\n") if block.startswith("id:")][:2]
        delivered_ids.extend(re.search(r"^id: (\S+)", block, re.MULTILINE).group(1) for block in first_two)
        route.fulfill(response=whole, body="".join(block + "\n\n" for block in first_two))   # then it ends

    page.route("**/v1/jobs/*/events", end_the_first_stream_early)
    open_page(page, stack, key)
    inpaint(page, image_file, steps=2)
    expect_result(page)
    assert sent_ids[0] is None and sent_ids[1] == delivered_ids[-1]
    assert any("reconnecting" in text for text in page.evaluate("window.progressSeen"))


def test_cancel_a_running_job(page, stack, key, tmp_path):
    # The largest job the workers take (most steps, most pixels), so it is still running when Cancel is clicked.
    largest = tmp_path / "largest.png"
    sample_image().resize((128, 128)).save(largest)
    assert 128 * 128 == int(WORKER_ENV["INPAINT_MAX_PIXELS"])
    open_page(page, stack, key)
    job_id = inpaint(page, largest, steps=int(WORKER_ENV["INPAINT_MAX_STEPS"]))
    page.get_by_role("status").filter(has_text=re.compile(r"step [1-9]\d*/")).wait_for(timeout=JOB_TIMEOUT_MS)
    page.get_by_role("button", name="Cancel").click()

    page.get_by_text("The job was canceled.").wait_for(timeout=JOB_TIMEOUT_MS)
    assert stack.redis.hget(state.job_key(job_id), "state") == schema.CANCELED
    assert page.get_by_role("button", name="Cancel").is_hidden()
    assert page.get_by_role("img", name="Result 1").count() == 0


def test_inpaint_again_from_a_result(page, stack, key, image_file, s3):
    open_page(page, stack, key)
    first_id = inpaint(page, image_file, steps=2)
    expect_result(page)
    first_result = json.loads(stack.redis.hget(state.job_key(first_id), "result"))["images"][0]

    page.get_by_role("button", name="Use result 1 as input").click()
    page.wait_for_function("() => input && input.file.name === 'result-1.png' && mask.isEmpty()")
    drag(page, (0.1, 0.9), (0.9, 0.1))
    page.get_by_role("button", name="Inpaint").click()
    page.wait_for_function("(first) => current && current.id !== first", arg=first_id)
    second_id = page.evaluate("current.id")
    expect_result(page)

    # The second job's input is the first job's result, byte for byte.
    sent = stored_job(stack, second_id)["image"]
    bucket, object_key = schema.parse_s3_uri("image", sent)
    assert hashlib.sha256(s3.get_object(Bucket=bucket, Key=object_key)["Body"].read()).hexdigest() == \
        first_result["sha256"]


def test_a_bad_key_is_said_in_words_at_the_key(page, stack, image_file):
    open_page(page, stack, "ik_not-a-key")
    key_error = page.locator("#key-error")
    key_error.wait_for()
    assert "The API key was refused: unknown or revoked API key" in key_error.inner_text()
    fill_job(page, image_file, steps=2)
    page.get_by_role("button", name="Inpaint").click()   # the submit's own 401, shown at the key again
    page.wait_for_function("() => !document.getElementById('inpaint').disabled")
    assert "The API key was refused" in key_error.inner_text()
    assert page.get_by_role("img", name="Result 1").count() == 0


def test_an_image_over_the_pixel_limit_is_said_in_words_at_the_image(page, stack, key, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (256, 256), (10, 200, 90)).save(big)   # over INPAINT_MAX_PIXELS (128 x 128)
    open_page(page, stack, key)
    inpaint(page, big, steps=2)
    # Refused before any model work (by the API at submit, or by the worker); the page says so at the image.
    words = re.compile(rf"image: 256x256 .*over the limit of {WORKER_ENV['INPAINT_MAX_PIXELS']} pixels")
    image_error = page.locator("#image-error", has_text=words)
    image_error.wait_for(timeout=JOB_TIMEOUT_MS)
    assert "limit_exceeded" in image_error.inner_text()


def test_an_image_over_the_body_limit_goes_through_an_upload(page, stack, key, tmp_path):
    # Noise does not compress: a PNG over the API's body limit (1 MiB) as a data URI, so the page uploads it to
    # S3 with POST /v1/uploads instead; it is also over the workers' limits, so the job fails, in words.
    noisy = tmp_path / "noisy.png"
    Image.frombytes("RGB", (600, 600), random.Random(0).randbytes(600 * 600 * 3)).save(noisy)
    assert noisy.stat().st_size * 4 / 3 > MAX_BODY_BYTES
    open_page(page, stack, key)
    job_id = inpaint(page, noisy, steps=2)
    assert stored_job(stack, job_id)["image"].startswith(f"s3://{stack.env['INPAINT_BUCKET']}/uploads/")
    job_error = page.locator("#job-error")
    job_error.wait_for(timeout=JOB_TIMEOUT_MS)
    assert "The job failed (limit_exceeded)" in job_error.inner_text()
