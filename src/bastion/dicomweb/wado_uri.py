"""WADO-URI: ``GET /wado?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..`` (PS3.18 9).

``contentType`` (a comma list, PS3.18 9.1.2.1.5) picks ``application/dicom`` -- the Part 10
object, as stored with ``transferSyntax=*`` or converted to ``transferSyntax`` (default
Explicit VR Little Endian, PS3.18 9.1.2.1.18) -- or a rendered ``image/jpeg`` (the default)
or ``image/png``, which honour ``frameNumber``, ``windowCenter``/``windowWidth``,
``rows``/``columns`` and ``imageQuality``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from bastion.dicomweb.negotiation import DICOM, NotAcceptable, check_transfer_syntax
from bastion.dicomweb.rendered import RENDERED_TYPES, RenderOptions
from bastion.dicomweb.wado import check_uid
from bastion.errors import InvalidQuery
from bastion.model.uids import UNCOMPRESSED

_KNOWN = frozenset({
    "requestType", "studyUID", "seriesUID", "objectUID", "contentType", "transferSyntax", "frameNumber",
    "windowCenter", "windowWidth", "rows", "columns", "imageQuality", "charset", "anonymize", "region",
    "annotation", "presentationUID", "presentationSeriesUID",
})


@dataclass(frozen=True)
class UriRequest:
    """A parsed WADO-URI request."""

    study: str
    series: str
    sop: str
    media_type: str
    transfer_syntax: str
    frame: int
    render: RenderOptions


def _int(params: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidQuery(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise InvalidQuery(f"{name} must be between {low} and {high}")
    return value


def parse_request(params: Mapping[str, str]) -> UriRequest:
    """Check and parse WADO-URI parameters; InvalidQuery (400) or NotAcceptable (406)."""
    unknown = sorted(set(params) - _KNOWN)
    if unknown:
        raise InvalidQuery(f"unknown WADO-URI parameter(s): {', '.join(unknown)}")
    if params.get("requestType") != "WADO":
        raise InvalidQuery("requestType must be WADO")
    uids = {}
    for name in ("studyUID", "seriesUID", "objectUID"):
        if not params.get(name):
            raise InvalidQuery(f"{name} is required")
        uids[name] = check_uid(params[name], name)
    wanted = [t.split(";")[0].strip().lower() for t in params.get("contentType", "image/jpeg").split(",")]
    media_type = next((t for t in wanted if t in (DICOM, *RENDERED_TYPES, "*/*", "image/*")), None)
    if media_type is None:
        raise NotAcceptable(f"contentType {params.get('contentType')} is not available; use "
                            "application/dicom, image/jpeg or image/png")
    if media_type in ("*/*", "image/*"):
        media_type = "image/jpeg"
    ts = check_transfer_syntax(params.get("transferSyntax") or UNCOMPRESSED[0])
    frame = _int(params, "frameNumber", 1, 2**31 - 1) or 1
    window = None
    if params.get("windowCenter") or params.get("windowWidth"):
        try:
            window = (float(params["windowCenter"]), float(params["windowWidth"]), "linear")
        except (KeyError, ValueError):
            raise InvalidQuery("windowCenter and windowWidth must both be numbers") from None
        if not (math.isfinite(window[0]) and math.isfinite(window[1])) or window[1] <= 0:
            raise InvalidQuery("windowCenter must be finite and windowWidth positive")
    rows, columns = _int(params, "rows", 1, 8192), _int(params, "columns", 1, 8192)
    viewport = (columns or 8192, rows or 8192) if rows or columns else None
    quality = _int(params, "imageQuality", 1, 100) or 90
    render = RenderOptions(media_type if media_type != DICOM else "image/jpeg", window, viewport, quality)
    return UriRequest(uids["studyUID"], uids["seriesUID"], uids["objectUID"], media_type, ts, frame - 1,
                      render)
