"""Serves the bundled OHIF viewer at ``/`` with single-page-app fallback, and its ``app-config.js``.

The prebuilt OHIF distribution is fetched at install time by ``scripts/fetch-ohif.sh`` into
``var/ohif`` (or the ``ohif_dir`` setting). Its asset paths are absolute, so it must own ``/``;
Bastion's own pages live under ``/admin``, ``/api``, ``/dicom-web``, ``/wado`` and ``/health``.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from bastion.archive import Archive
from bastion.web.ohif_config import app_config_js, oidc_js

_RESERVED = ("dicom-web", "wado", "api", "admin", "health")


def find_ohif_dir(configured: str) -> Path | None:
    """The OHIF ``dist`` directory: the setting, else ``var/ohif`` in the working or source tree."""
    candidates = [Path(configured)] if configured else []
    candidates += [Path.cwd() / "var" / "ohif", Path(__file__).resolve().parents[3] / "var" / "ohif"]
    for path in candidates:
        if (path / "index.html").is_file():
            return path.resolve()
    return None


def routes(archive: Archive) -> list[BaseRoute]:
    """``/app-config.js`` and the catch-all that serves the viewer."""
    root = find_ohif_dir(archive.settings.ohif_dir)
    s = archive.settings
    config = app_config_js(oidc=oidc_js(s.auth_issuer, s.auth_client_id)
                           if s.auth_enabled and s.auth_client_id else "")

    async def app_config(request: Request) -> Response:
        return Response(config, media_type="application/javascript", headers={"Cache-Control": "no-cache"})

    async def viewer(request: Request) -> Response:
        if root is None:
            return PlainTextResponse("The OHIF viewer is not installed: run scripts/fetch-ohif.sh "
                                     "(make install does). The admin page is at /admin.", status_code=404)
        rel = request.path_params.get("path", "")
        if rel.split("/", 1)[0] in _RESERVED:
            return PlainTextResponse("not found", status_code=404)
        target = (root / rel).resolve()
        if rel and target.is_file() and os.path.commonpath([root, target]) == str(root):
            return FileResponse(target, headers={"Cache-Control": "public, max-age=3600"})
        return FileResponse(root / "index.html", headers={"Cache-Control": "no-cache"})

    return [Route("/app-config.js", app_config), Route("/", viewer), Route("/{path:path}", viewer)]
