"""The web page on its own (no API behind it): how it is served, its controls' accessible names, the mask editor
(painting, eraser, invert, undo, clear, the PNG it sends) and its layout on a laptop and a tablet, in a real Chromium.
The page with the API, a worker and jobs is tested in test_page.py."""
import base64
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from api import errors, page as page_module
from tests import devstack
from tests.browser import browser, drag, mask_image, page  # noqa: F401  (fixtures)

IMAGE_SIZE = (96, 48)   # not square: the mask must come back at the image's own size
NAMED_CONTROLS = ["API key", "Image", "Mask", "Prompt", "Negative prompt", "Steps", "Seed", "Scheduler", "Guidance",
                  "Strength", "Keep unmasked", "Mask blur", "Brush", "Eraser", "Brush size"]


def page_only_app() -> FastAPI:
    app = FastAPI()
    errors.install(app, retry_after_s=5)
    app.include_router(page_module.router)
    return app


@pytest.fixture(scope="module")
def page_url():
    port = devstack.free_port()
    server = uvicorn.Server(uvicorn.Config(page_only_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the page server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", IMAGE_SIZE, (30, 120, 60)).save(path)
    return path


def open_with_image(tab, page_url, image_file):
    tab.goto(page_url)
    tab.get_by_label("Image", exact=True).set_input_files(image_file)
    tab.get_by_label("Mask", exact=True).wait_for(state="visible")


def test_the_page_and_its_files_are_served_with_their_types_and_a_strict_policy():
    client = TestClient(page_only_app())
    index = client.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in index.headers["content-security-policy"]
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        answer = client.get(f"/static/{name}")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
        assert f"/static/{name}" in index.text
    missing = client.get("/static/secrets.txt")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_nothing_is_loaded_from_another_origin():
    # No CDN, no external fonts: every reference in the shipped files is relative to the API's own origin.
    client = TestClient(page_only_app())
    for path in ["/", "/static/app.js", "/static/style.css"]:
        text = client.get(path).text
        assert "http://" not in text and "https://" not in text and "@import" not in text, path


def test_every_control_has_its_accessible_name(page, page_url):
    page.goto(page_url)
    for name in NAMED_CONTROLS:
        assert page.get_by_label(name, exact=True).count() == 1, name
    for name in ["Inpaint", "Undo", "Clear mask", "Invert mask"]:
        assert page.get_by_role("button", name=name, exact=True).count() == 1, name


def test_the_key_is_kept_for_the_browser_session_only(page, page_url, browser):
    page.goto(page_url)
    page.get_by_label("API key").fill("ik_test")
    page.get_by_label("API key").press("Enter")
    page.reload()
    assert page.get_by_label("API key").input_value() == "ik_test"
    assert page.evaluate("localStorage.length") == 0
    other = browser.new_context()   # another browser session
    try:
        fresh = other.new_page()
        fresh.goto(page_url)
        assert fresh.get_by_label("API key").input_value() == ""
    finally:
        other.close()


def test_painting_sends_a_white_on_black_mask_at_the_image_size(page, page_url, image_file):
    open_with_image(page, page_url, image_file)
    assert mask_image(page).getextrema() == (0, 0)   # nothing painted yet
    drag(page, (0.1, 0.5), (0.9, 0.5))
    painted = mask_image(page)
    assert painted.size == IMAGE_SIZE
    width, height = IMAGE_SIZE
    assert painted.getpixel((width // 2, height // 2)) == 255
    assert painted.getpixel((0, 0)) == 0 and painted.getpixel((width - 1, height - 1)) == 0


def test_eraser_invert_undo_and_clear(page, page_url, image_file):
    open_with_image(page, page_url, image_file)
    page.get_by_label("Brush size").fill("30")
    drag(page, (0.1, 0.5), (0.9, 0.5))
    width, height = IMAGE_SIZE
    centre, corner = (width // 2, height // 2), (1, 1)

    page.get_by_label("Eraser").check()
    drag(page, (0.5, 0.1), (0.5, 0.9))
    assert mask_image(page).getpixel(centre) == 0          # erased across the stroke
    assert mask_image(page).getpixel((width // 5, height // 2)) == 255

    page.get_by_role("button", name="Invert mask").click()
    inverted = mask_image(page)
    assert inverted.getpixel(corner) == 255 and inverted.getpixel((width // 5, height // 2)) == 0

    page.get_by_role("button", name="Undo").click()         # back to before the invert
    assert mask_image(page).getpixel(corner) == 0
    page.get_by_role("button", name="Undo").click()         # and before the eraser
    assert mask_image(page).getpixel(centre) == 255

    page.get_by_role("button", name="Clear mask").click()
    assert mask_image(page).getextrema() == (0, 0)


def test_submitting_without_a_mask_says_what_is_missing(page, page_url, image_file):
    page.goto(page_url)
    page.get_by_role("button", name="Inpaint").click()
    assert "Choose an image first" in page.get_by_role("alert").filter(has_text="image").inner_text()
    page.get_by_label("Image", exact=True).set_input_files(image_file)
    page.get_by_role("button", name="Inpaint").click()
    assert "Paint the mask first" in page.get_by_text("Paint the mask first").inner_text()


def test_submitting_without_a_key_asks_for_one_at_the_key(page, page_url, image_file):
    open_with_image(page, page_url, image_file)
    drag(page, (0.2, 0.5), (0.8, 0.5))
    page.get_by_role("button", name="Inpaint").click()
    assert page.locator("#key-error").inner_text() == "Enter your API key first."
    assert page.evaluate("document.activeElement.id") == "api-key"


def test_a_file_that_is_not_an_image_is_refused_in_words(page, page_url, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    page.goto(page_url)
    page.get_by_label("Image", exact=True).set_input_files(text)
    assert "not an image" in page.get_by_text("That file is not an image").inner_text()


# Events carrying a real File, as the browser builds them when a file is dragged in or an image pasted.
DROP = "new DragEvent('drop', {dataTransfer: transfer, bubbles: true})"
PASTE = "new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true})"


@pytest.mark.parametrize("event", [DROP, PASTE], ids=["drop", "paste"])
def test_a_dropped_or_pasted_image_is_opened_too(page, page_url, image_file, event):
    page.goto(page_url)
    data = base64.b64encode(image_file.read_bytes()).decode()
    page.evaluate("""async (data) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "photo.png", {type: "image/png"}));
        document.getElementById("stage").dispatchEvent(%s);
    }""" % event, data)
    canvas = page.get_by_label("Mask", exact=True)
    canvas.wait_for(state="visible")
    assert page.evaluate("[mask.canvas.width, mask.canvas.height]") == list(IMAGE_SIZE)


@pytest.mark.parametrize("viewport", [{"width": 1366, "height": 768}, {"width": 768, "height": 1024},
                                      {"width": 1024, "height": 768}], ids=["laptop", "tablet", "tablet-landscape"])
def test_the_layout_fits_laptop_and_tablet_screens(page, page_url, image_file, viewport):
    page.set_viewport_size(viewport)
    open_with_image(page, page_url, image_file)
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    box = page.get_by_label("Mask", exact=True).bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"]
    assert box["width"] >= 200   # a small image is shown large enough to paint on
    inpaint = page.get_by_role("button", name="Inpaint").bounding_box()
    assert inpaint["x"] + inpaint["width"] <= viewport["width"] and inpaint["height"] >= 36   # finger-sized


def test_the_event_stream_reader_handles_split_chunks_comments_and_ids(page, page_url):
    # The SSE parser behind the progress display (fetch() + a stream reader, since EventSource cannot send the key):
    # line breaks split across chunks, CRLF and LF, keep-alive comments, multi-line data, a missing space.
    page.goto(page_url)
    chunks = [": keep-alive\r\n\r\nid: 1-0\r", "\ndata: {\"a\":", " 1}\r\n\r", "\n:ping\n\nid:2-0\ndata: x\n",
              "data:y\n\n", "data: no end"]
    events = page.evaluate("""async (chunks) => {
        const encoder = new TextEncoder();
        const body = new ReadableStream({start(controller) {
            for (const chunk of chunks) controller.enqueue(encoder.encode(chunk));
            controller.close();
        }});
        const events = [];
        for await (const event of readServerSentEvents(new Response(body))) events.push(event);
        return events;
    }""", chunks)
    assert events == [{"id": "1-0", "data": '{"a": 1}'}, {"id": "2-0", "data": "x\ny"}]


def test_the_progress_line_shows_queue_position_phase_steps_elapsed_time_and_eta(page, page_url):
    # The job's events as the API streams them (times in the server's clock: the page only uses their differences).
    page.goto(page_url)
    lines = page.evaluate("""() => {
        const run = newRun({id: "job", state: "queued", step: 0, total_steps: 0, queue_position: 2}, null);
        const lines = [];
        const show = (event) => {
            if (event) applyEvent(run, {job_id: "job", data: {}, ...event});
            renderProgress(run);
            lines.push(document.getElementById("progress-text").textContent);
        };
        show(null);
        show({type: "state", state: "running", step: 0, total_steps: 0, ts: 1000, phase: "fetching"});
        show({type: "progress", state: "running", step: 0, total_steps: 10, ts: 1001, phase: "encoding"});
        show({type: "progress", state: "running", step: 1, total_steps: 10, ts: 1002, phase: "denoising"});
        show({type: "progress", state: "running", step: 3, total_steps: 10, ts: 1006, phase: "denoising"});
        show({type: "retry", state: "running", step: 3, total_steps: 10, ts: 1007, phase: "denoising",
              data: {error: {code: "storage_unavailable", message: "S3 did not answer"}}});
        show({type: "state", state: "running", step: 0, total_steps: 0, ts: 1010, phase: "fetching"});  // attempt 2
        show({type: "progress", state: "running", step: 10, total_steps: 10, ts: 1030, phase: "decoding"});
        show({type: "state", state: "succeeded", step: 10, total_steps: 10, ts: 1031, phase: ""});
        return lines;
    }""")
    assert lines == [
        "Queued: position 3 in the queue (2 ahead)",
        "Running: fetching inputs, 0.0 s elapsed",
        "Running: encoding, step 0/10, 1.0 s elapsed",
        "Running: denoising, step 1/10, 2.0 s elapsed, ETA ...",
        "Running: denoising, step 3/10, 6.0 s elapsed, ETA 14.0 s",     # 2 s a step, 7 steps left
        "Running: denoising, step 3/10, 7.0 s elapsed, ETA 14.0 s (retrying after S3 did not answer)",
        "Running: fetching inputs, 0.0 s elapsed",                        # the retry's new attempt
        "Running: decoding, step 10/10, 20.0 s elapsed",
        "Done",
    ]
