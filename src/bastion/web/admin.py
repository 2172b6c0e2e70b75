"""The admin page at ``/admin``: search, upload (STOW-RS), health, remote AEs."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route


def routes() -> list[BaseRoute]:
    """``/admin`` (the page is static; it talks to ``/api`` and ``/dicom-web``)."""
    page = resources.files("bastion.web").joinpath("static/admin.html").read_text(encoding="utf-8")

    async def admin(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    async def slash(request: Request) -> Response:
        return RedirectResponse("/admin")

    return [Route("/admin", admin), Route("/admin/", slash)]
