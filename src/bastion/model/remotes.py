"""The remote application entities Bastion associates with, and the forwarding rules that send to them.

A remote AE (``[remotes]``, :class:`RemoteAE`) is ``AET@HOST:PORT``, or ``AET@tls://HOST:PORT`` over DICOM TLS: a
C-MOVE destination, a forwarding destination, a Storage Commitment requester, an edge's upstream. A forwarding
rule (``[[forward]]``, :class:`ForwardRule`) names a destination, a remote AE or a DICOMweb base URL, and what
to send there. Pure data and parsing (as :mod:`bastion.model.peers`); a bad value raises
:class:`~bastion.errors.SettingsError`, which :mod:`bastion.settings` reports. The settings that hold them are
:class:`bastion.settings.Settings`'s ``remotes`` and ``forward``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bastion.errors import SettingsError

if TYPE_CHECKING:
    from bastion.model.matching import Condition

#: An AE title as PS3.5 6.2 allows it (no backslash, no control characters); checked by :func:`check_aet` and
#: :mod:`bastion.model.peers`.
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


@dataclass(frozen=True)
class RemoteAE:
    """A peer application entity that Bastion associates with (a C-MOVE destination, a forwarding destination, a
    Storage Commitment requester, an edge's upstream): over plain TCP, or over DICOM TLS (PS3.15 B.9) with ``tls``
    (:func:`bastion.dimse.tls.client_context`)."""

    aet: str
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, text: str) -> RemoteAE:
        """Parse ``AET@host:port``, or ``AET@tls://host:port`` for DICOM TLS."""
        m = REMOTE_AE.fullmatch(text.strip())
        if not m:
            raise SettingsError(f"remote AE {text!r} is not AET@HOST:PORT or AET@tls://HOST:PORT")
        return cls(check_aet(m.group(1).strip()), m.group(3), int(m.group(4)), tls=bool(m.group(2)))

    def __str__(self) -> str:
        return f"{self.aet}@{'tls://' if self.tls else ''}{self.host}:{self.port}"


#: ``AET@HOST:PORT`` or ``AET@tls://HOST:PORT`` (:meth:`RemoteAE.parse`).
REMOTE_AE = re.compile(r"([^@]{1,16})@(tls://)?([^:/@\s]+):(\d{1,5})")


#: The attributes a forward rule's ``match`` may test (bastion.forward.rules says where each is read from).
FORWARD_MATCH_KEYWORDS = ("Modality", "CallingAETitle", "SOPClassUID", "StationName", "StudyDescription")
#: Their tags and VRs; CallingAETitle is the File Meta's Source Application Entity Title (0002,0016), which a
#: C-STORE's ingest sets to the calling AE title.
_FORWARD_MATCH_ATTRIBUTES = {"Modality": (0x00080060, "CS"), "CallingAETitle": (0x00020016, "AE"),
                             "SOPClassUID": (0x00080016, "UI"), "StationName": (0x00081010, "SH"),
                             "StudyDescription": (0x00081030, "LO")}
_FORWARD_RULE_KEYS = frozenset({"name", "to", "match", "api_key"})


@dataclass(frozen=True)
class ForwardRule:
    """One ``[[forward]]`` table: instances newly stored here that ``match`` are sent to ``to``.

    ``to`` is ``AET@HOST:PORT`` (C-STORE, PS3.4 B) or an ``http(s)://`` DICOMweb base URL (STOW-RS, PS3.18
    10.5). ``name`` names the destination's queue (default: ``to``); rules with one name share one queue.
    ``match`` maps attributes of :data:`FORWARD_MATCH_KEYWORDS` to a value with PS3.4 C.2.2.2 wildcards
    (``*``, ``?``) or a backslash list of alternatives; every one must match (no ``match``: everything).
    ``api_key`` is sent as ``Authorization: Bearer`` to a STOW-RS destination that requires authentication (a
    Bastion with ``[auth]`` on: an ``uploader`` API key); it is never shown.
    """

    name: str
    to: str
    match: tuple[tuple[str, str], ...] = ()
    api_key: str = field(default="", repr=False)

    @property
    def remote(self) -> RemoteAE | None:
        """The C-STORE destination, or None for a STOW-RS one."""
        return None if self.stow_url else RemoteAE.parse(self.to)

    @property
    def stow_url(self) -> str:
        """The DICOMweb base URL of a STOW-RS destination (no trailing slash), else ``""``."""
        return self.to.rstrip("/") if self.to.startswith(("http://", "https://")) else ""

    @classmethod
    def parse(cls, table: Any) -> ForwardRule:
        """A rule from its TOML table (or a bare ``to`` string); SettingsError says what is wrong."""
        if isinstance(table, str):
            table = {"to": table}
        if not isinstance(table, Mapping):
            raise SettingsError(f"a [[forward]] rule must be a table, not {table!r}")
        unknown = set(table) - _FORWARD_RULE_KEYS
        if unknown:
            raise SettingsError(f"[[forward]]: unknown key(s) {', '.join(sorted(unknown))} (name, to, match, api_key)")
        to = str(table.get("to", "")).strip()
        if to.startswith(("http://", "https://")):
            if not re.fullmatch(r"https?://[^/\s:]+(:\d{1,5})?(/\S*)?", to):
                raise SettingsError(f"[[forward]] to = {to!r} is not an http(s)://HOST[:PORT]/PATH DICOMweb URL")
        elif not REMOTE_AE.fullmatch(to):
            raise SettingsError(f"[[forward]] to = {to!r} is neither AET@HOST:PORT nor an http(s):// DICOMweb URL "
                                "(AET@tls://HOST:PORT for DICOM TLS)")
        else:
            RemoteAE.parse(to)
        name = str(table.get("name") or to).strip()
        match = table.get("match", {})
        if not isinstance(match, Mapping):
            raise SettingsError(f"[[forward]] {name}: match must be a table, e.g. {{ Modality = \"CT\" }}")
        pairs = []
        for keyword, value in match.items():
            if keyword not in FORWARD_MATCH_KEYWORDS:
                raise SettingsError(f"[[forward]] {name}: cannot match on {keyword!r}; one of "
                                    f"{', '.join(FORWARD_MATCH_KEYWORDS)}")
            if isinstance(value, list):
                value = "\\".join(str(v) for v in value)
            if not isinstance(value, str) or not value.strip():
                raise SettingsError(f"[[forward]] {name}: match {keyword} must be a non-empty string")
            pairs.append((keyword, value.strip()))
        rule = cls(name, to, tuple(pairs), str(table.get("api_key") or "").strip())
        rule.conditions()  # each value parses as a matching key
        return rule

    def conditions(self) -> list[Condition]:
        """``match`` as PS3.4 C.2.2.2 matching keys (:mod:`bastion.model.matching`); SettingsError for a value
        that is not one (a malformed UID)."""
        from bastion.errors import InvalidQuery
        from bastion.model.matching import parse_condition

        out = []
        for keyword, value in self.match:
            tag, vr = _FORWARD_MATCH_ATTRIBUTES[keyword]
            try:
                out.append(parse_condition(keyword, tag, vr, value))
            except InvalidQuery as exc:
                raise SettingsError(f"[[forward]] {self.name}: match {exc.message}") from exc
        return out


def check_aet(aet: str) -> str:
    """Return ``aet`` if it is a valid AE title (PS3.5 6.2, AE), else raise."""
    if not AE_TITLE.match(aet) or not aet.strip():
        raise SettingsError(f"{aet!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return aet.strip()
