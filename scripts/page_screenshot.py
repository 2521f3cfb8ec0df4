"""The README's screenshot of the web page (docs/page.png): one finished job, driven in Chromium with Playwright.

    python scripts/page_screenshot.py URL KEY [--out docs/page.png] [--steps 20]

URL and KEY are the ones `make demo` prints (any running `inpaint-api` with a worker will do). The page is used as a
person would: the key typed in, examples/image.png chosen, the mask painted over the house with the mouse, a prompt,
Inpaint, then the result with its before/after comparison.
"""
import argparse
import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red brick cottage with a blue door, warm afternoon light"
VIEWPORT = {"width": 1280, "height": 900}
# Brush strokes over the house of examples/image.png, as fractions of the image: (x from, x to, y).
STROKES = [(0.36, 0.68, y / 100) for y in range(36, 74, 5)]
JOB_TIMEOUT_MS = 15 * 60 * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the page's URL, e.g. http://127.0.0.1:8000/")
    parser.add_argument("key", help="an API key (inpaint keys create --name NAME)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "page.png")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--chromium", default=shutil.which("chromium"), help="Chromium executable")
    args = parser.parse_args(argv)
    if not args.chromium:
        parser.error("no chromium on the PATH: `make browser` installs it, or pass --chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport=VIEWPORT)
        run_job(page, args.url, args.key, args.steps)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")
    return 0


def run_job(page, url: str, key: str, steps: int) -> None:
    page.goto(url)
    page.get_by_label("API key").fill(key)
    page.get_by_label("API key").press("Enter")
    page.get_by_label("Image", exact=True).set_input_files(ROOT / "examples" / "image.png")
    page.get_by_label("Brush size").fill("60")
    box = page.get_by_label("Mask", exact=True).bounding_box()
    for x_from, x_to, y in STROKES:
        page.mouse.move(box["x"] + x_from * box["width"], box["y"] + y * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + x_to * box["width"], box["y"] + y * box["height"], steps=12)
        page.mouse.up()
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_label("Negative prompt").fill("blurry, low quality")
    page.get_by_label("Steps").fill(str(steps))
    page.get_by_label("Seed").fill("42")
    page.get_by_label("Scheduler").select_option("dpmpp_2m_karras")
    page.get_by_role("button", name="Inpaint").click()
    page.get_by_role("img", name="Result 1", exact=True).wait_for(timeout=JOB_TIMEOUT_MS)
    page.wait_for_function("() => [...document.images].every((image) => image.complete)")
    page.get_by_role("button", name="Refresh").click()   # the finished job in the recent jobs too
    page.locator("#job-list li").first.wait_for()
    page.mouse.move(0, 0)   # no brush cursor in the picture


if __name__ == "__main__":
    sys.exit(main())
