"""The reporting pages (docs/reporting.md, "Pages and the reading list"): static files that talk to the JSON API.

- ``/reporting``: the reading list (``static/reporting/reading-list.html``);
- ``/reporting/study/{uid}``: the report editor beside the bundled OHIF viewer (``static/reporting/editor.html``);
  it loads the dictation panel (``/reporting/static/dictation.js``) when that file is there;
- ``/reporting/typing``: the typing queue (``static/reporting/typing.html``) when that file is there;
- ``/reporting/static/<name>``: every file of ``static/reporting/``.

Files are read when asked for, so a file added to the directory is served without a restart.
"""

from __future__ import annotations

import mimetypes
import re
from importlib import resources
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

#: The dictation panel's script, which the editor loads when it is there.
DICTATION = "dictation.js"
#: Where the editor's page names the dictation panel's script.
DICTATION_MARK = "<!-- dictation -->"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html",
          ".json": "application/json", ".svg": "image/svg+xml"}
_NO_CACHE = {"Cache-Control": "no-cache"}


def static_dir() -> Path:
    """The directory of the reporting pages' files."""
    return Path(str(resources.files("bastion.web").joinpath("static/reporting")))


def _page(name: str) -> Response:
    path = static_dir() / name
    if not path.is_file():
        return PlainTextResponse("not found", status_code=404)
    html = path.read_text(encoding="utf-8")
    if DICTATION_MARK in html and (static_dir() / DICTATION).is_file():
        html = html.replace(DICTATION_MARK, f'<script type="module" src="/reporting/static/{DICTATION}"></script>')
    return HTMLResponse(html, headers=_NO_CACHE)


def routes() -> list[BaseRoute]:
    """The pages' routes (all ``GET``, public: their data comes from the API, which checks roles)."""

    async def reading_list(request: Request) -> Response:
        return _page("reading-list.html")

    async def slash(request: Request) -> Response:
        return RedirectResponse("/reporting")

    async def editor(request: Request) -> Response:
        return _page("editor.html")

    async def typing(request: Request) -> Response:
        return _page("typing.html")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        path = static_dir() / name
        if not _NAME.fullmatch(name) or not path.is_file():
            return PlainTextResponse("not found", status_code=404)
        kind = _TYPES.get(path.suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=kind, headers=_NO_CACHE)

    return [Route("/reporting", reading_list), Route("/reporting/", slash),
            Route("/reporting/study/{uid}", editor), Route("/reporting/typing", typing),
            Route("/reporting/static/{name}", static)]
