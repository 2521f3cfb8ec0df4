"""The web page of `inpaint-api` (DESIGN §8, `GET /`): plain HTML, CSS and JavaScript shipped in this package.

No build step and no CDN: the files under `api/static/` are served as they are. The page talks to the `/v1` API
only, with the key the user types in (kept in the browser's sessionStorage).
"""
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from api import errors

__all__ = ["router", "STATIC_FILES"]

STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
# Scripts and styles only from this origin (no inline code); images and API calls may go to the S3 endpoint,
# whose address the page only learns from presigned URLs.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src * data: blob:; "
                               "connect-src *; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The files change with the package version; revalidating keeps an upgraded server's page consistent.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _static(name: str) -> Response:
    body = resources.files("api").joinpath("static", name).read_bytes()
    return Response(body, media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)


@router.get("/")
def page() -> Response:
    return _static("index.html")


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    if name not in STATIC_FILES:
        raise errors.ApiError(404, errors.NOT_FOUND, f"/static/{name[:64]}: no such file")
    return _static(name)
