"""The chat page's static files (``/``, ``/static/*``, ``/favicon.ico``) and the headers that
keep it safe: model text is untrusted, so the page may run only its own scripts, may not be
framed, and its files are never sniffed as another type."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

WEB_DIR = resources.files("tokenrelay") / "web"

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    # Scripts only from files tokenrelay serves: no inline script, no eval, no CDN. If model
    # text ever reached the DOM as markup, nothing in it could run.
    "script-src 'self'",
    "style-src 'self'",
    # Images in answers are shown as links, never loaded: no tracking pixels in a chat.
    "img-src 'self' data:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))

PAGE_HEADERS: Mapping[str, str] = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    # Older browsers that ignore CSP's frame-ancestors.
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


async def index(request: Request) -> Response:
    return FileResponse(str(WEB_DIR / "index.html"), headers={"cache-control": "no-cache", **PAGE_HEADERS})


async def favicon(request: Request) -> Response:
    # Browsers ask for /favicon.ico whatever the page says; the SVG icon answers it.
    return FileResponse(str(WEB_DIR / "favicon.svg"), media_type="image/svg+xml",
                        headers={"cache-control": "public, max-age=86400", **PAGE_HEADERS})


class PageFiles(StaticFiles):
    """``/static``: the page's files with the page's headers."""

    def __init__(self) -> None:
        super().__init__(directory=str(WEB_DIR))

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response
