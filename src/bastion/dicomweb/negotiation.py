"""Media types and content negotiation for DICOMweb (PS3.18 8.7).

Parses ``Accept`` and ``Content-Type`` header values, with or without quotes around
parameter values (OHIF sends both forms), and holds the adapter's own HTTP errors::

    BastionError (bastion.errors)
    ├── InvalidQuery            400: a bad parameter, path or header
    ├── NotAcceptable           406: no acceptable representation (PS3.18 8.7.3)
    └── UnsupportedMediaType    415: a request body of the wrong type (PS3.18 10.5.1)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bastion.errors import BastionError, InvalidQuery
from bastion.model.uids import is_valid_uid

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
MULTIPART = "multipart/related"

#: Media types of compressed frames / bulk data in their stored syntax (PS3.18 Table 8.7.3-2).
IMAGE_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


class NotAcceptable(BastionError):
    """The server cannot produce any representation the ``Accept`` header allows (HTTP 406)."""

    http_status = 406


class UnsupportedMediaType(BastionError):
    """The request body has a media type the resource does not take (HTTP 415)."""

    http_status = 415


@dataclass(frozen=True)
class MediaRange:
    """One element of an ``Accept`` or ``Content-Type`` value: ``type/subtype; k=v; ...``."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def related_type(self) -> str:
        """The ``type`` parameter of a multipart/related range (lower case), or ``""``."""
        return self.params.get("type", "").lower()

    @property
    def transfer_syntax(self) -> str | None:
        """The ``transfer-syntax`` parameter, or None when absent."""
        return self.params.get("transfer-syntax")

    def matches(self, media_type: str) -> bool:
        """True if this range covers ``media_type`` (``*/*`` and ``type/*`` wildcards)."""
        mine = self.media_type
        if mine in ("*/*", "*"):
            return True
        if mine.endswith("/*"):
            return media_type.split("/")[0] == mine[:-2]
        return mine == media_type


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for c in text:
        if c == '"':
            quoted = not quoted
        if c == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    out.append("".join(cur))
    return out


def parse_media_type(text: str) -> MediaRange:
    """Parse one media type with parameters; quotes around values are removed."""
    head, *rest = _split(text, ";")
    params: dict[str, str] = {}
    q = 1.0
    for item in rest:
        name, eq, value = item.partition("=")
        if not eq:
            continue
        name, value = name.strip().lower(), value.strip().strip('"').strip()
        if name == "q":
            try:
                q = float(value)
            except ValueError:
                q = 0.0
            continue
        params[name] = value
    return MediaRange(head.strip().lower(), params, q)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an ``Accept`` value, best first (``*/*`` when the header is absent)."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges = [parse_media_type(part) for part in _split(header, ",") if part.strip()]
    ranges = [r for r in ranges if r.q > 0]
    return sorted(ranges, key=lambda r: -r.q)  # stable: equal q keeps the client's order


def check_transfer_syntax(value: str) -> str:
    """``value`` if it is ``*`` or a valid UID; else InvalidQuery (400)."""
    if value != "*" and not is_valid_uid(value):
        raise InvalidQuery(f"transfer-syntax {value!r} is not a UID")
    return value


def multipart_syntaxes(accept: list[MediaRange], part_type: str, default_syntax: str) -> list[str]:
    """Transfer syntaxes acceptable for ``multipart/related; type=part_type`` parts, best first.

    ``*`` means "as stored". A range without a ``transfer-syntax`` parameter asks for the
    default syntax of the part type (PS3.18 8.7.3.5.2). Wildcard ranges (``*/*``,
    ``multipart/*``) accept ``*``. An empty list means nothing acceptable (406).
    """
    out: list[str] = []
    for r in accept:
        if r.media_type in ("*/*", "*", "multipart/*"):
            out.append("*")
        elif r.media_type == MULTIPART:
            related = r.related_type
            if related and not MediaRange(related).matches(part_type):
                continue
            ts = r.transfer_syntax
            out.append(check_transfer_syntax(ts) if ts else default_syntax)
        elif r.media_type == part_type and r.transfer_syntax:
            out.append(check_transfer_syntax(r.transfer_syntax))
    return out


def require_multipart_related(content_type: str | None, part_type: str) -> MediaRange:
    """Check a request's ``multipart/related; type=...`` Content-Type (PS3.18 10.5.1.1)."""
    if not content_type:
        raise UnsupportedMediaType("the request has no Content-Type; expected multipart/related")
    ct = parse_media_type(content_type)
    if ct.media_type != MULTIPART:
        raise UnsupportedMediaType(f"Content-Type {ct.media_type} is not supported; expected "
                                   f'multipart/related; type="{part_type}"')
    if ct.related_type and ct.related_type != part_type:
        raise UnsupportedMediaType(f"multipart/related type {ct.related_type} is not supported; "
                                   f"expected {part_type}")
    if not ct.params.get("boundary"):
        raise InvalidQuery("the multipart/related Content-Type has no boundary")
    return ct
