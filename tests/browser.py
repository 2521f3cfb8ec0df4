"""A real Chromium for the page tests: Debian's `chromium` driven by Playwright's sync API.

Import the fixtures into a test module (`from tests.browser import browser, page`). The browser is the system one
(`make test` installs it with apt when missing; INPAINT_CHROMIUM names another executable); a missing browser fails
the test with that message, it never skips. `page` fails its test on any JavaScript error or console error the page
logs, so a broken script never passes unnoticed.
"""
import base64
import io
import os
import shutil

import pytest
from PIL import Image

__all__ = ["chromium_path", "browser", "page", "drag", "mask_image", "VIEWPORT"]

VIEWPORT = {"width": 1280, "height": 860}   # a laptop screen
ACTION_TIMEOUT_MS = 20_000


def chromium_path() -> str:
    path = os.environ.get("INPAINT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not os.access(path, os.X_OK):
        pytest.fail("no Chromium for the page tests: run `make browser` (apt-get install chromium) or set "
                    "INPAINT_CHROMIUM to a Chromium executable", pytrace=False)
    return path


# Per module: each module that imports these fixtures gets its own copy of them, and two Playwright sessions
# alive at once in one thread clash (the first one's event loop is running), so each module's ends with it.
@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        # Containers give /dev/shm little room and run as root: Chromium needs both flags there.
        chromium = playwright.chromium.launch(executable_path=executable,
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    tab = context.new_page()
    problems = []
    tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    tab.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
           if message.type == "error" and not _expected(message.text) else None)
    yield tab
    context.close()
    assert not problems, "the page reported errors:\n" + "\n".join(problems)


def _expected(text: str) -> bool:
    # The browser itself logs every 4xx/5xx answer to fetch(); the tests that cause one check what the page shows.
    return text.startswith("Failed to load resource")


def drag(tab, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A mouse drag over the "Mask" canvas between two points given as fractions of its shown box."""
    box = tab.get_by_label("Mask", exact=True).bounding_box()
    point = lambda fx, fy: (box["x"] + fx * box["width"], box["y"] + fy * box["height"])  # noqa: E731
    tab.mouse.move(*point(*start))
    tab.mouse.down()
    for step in range(1, 9):
        fraction = step / 8
        tab.mouse.move(*point(start[0] + (end[0] - start[0]) * fraction, start[1] + (end[1] - start[1]) * fraction))
    tab.mouse.up()


def mask_image(tab) -> Image.Image:
    """The mask the page would send now, decoded (mode L: 255 = repaint)."""
    uri = tab.evaluate("mask.toDataUri()")
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("L")
