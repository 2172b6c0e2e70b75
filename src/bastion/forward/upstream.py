"""Asking an edge's upstream archive: which studies and instances it holds, and fetching studies from it.

Over DIMSE (``upstream = "AET@HOST:PORT"``): C-FIND (PS3.4 C.4.1) in the Study Root model at STUDY level, and at
SERIES then IMAGE level (hierarchical), and C-MOVE (C.4.2) of a study to this node's own AE title, which upstream
must know as a remote AE (its
``remotes``: ``EDGE = "edge-host:11112"``); the instances then arrive as any C-STORE does. Over DICOMweb
(``upstream = "https://HOST/dicom-web"``): QIDO-RS (PS3.18 10.6) and WADO-RS (10.4), each instance stored here
through the ingest pipeline.

Where upstream is a Bastion, ``GET /api/studies/{uid}/digests`` on its HTTP API (``upstream_api``, or a DICOMweb
``upstream``'s own server) names, for each instance, the digest of its data set (the bytes after the File Meta
Information, which the receiver writes anew) and its transfer syntax, so that the reconciliation compares content.

Every call here blocks (run it in a thread) and raises :class:`UpstreamUnreachable` when upstream cannot answer.
"""

from __future__ import annotations

import datetime
import json
import logging
import ssl
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bastion.dicomweb.multipart import parse_multipart
from bastion.dimse.tls import client_context
from bastion.errors import BastionError
from bastion.model.remotes import RemoteAE
from bastion.settings import Settings

log = logging.getLogger("bastion.forward.upstream")

#: Seconds to connect and wait for any one answer.
TIMEOUT_S = 30.0
#: Seconds a C-MOVE may go without a response (each sub-operation answers one).
MOVE_TIMEOUT_S = 300.0

_STUDY_UID, _SOP_UID, _PATIENT_ID = "0020000D", "00080018", "00100020"
_STUDY_DATE, _STUDY_TIME = "00080020", "00080030"


class UpstreamUnreachable(BastionError):
    """Upstream did not answer (down, refused the association, failed the request)."""


@dataclass(frozen=True)
class StudyFound:
    """A study upstream holds, as its C-FIND or QIDO-RS answer names it."""

    study_uid: str
    patient_id: str
    study_date: str = ""
    study_time: str = ""


@dataclass(frozen=True)
class InstanceDigest:
    """An instance as a Bastion upstream stores it: its transfer syntax and its data set's digest."""

    transfer_syntax: str
    dataset_digest: str


def resolve_dates(query: Sequence[tuple[str, str]], today: datetime.date) -> dict[str, str]:
    """The ``[prefetch] query`` with each relative date made a DICOM date range (PS3.4 C.2.2.2.5): ``-Nd`` is the
    last N days up to today, ``+Nd`` today and the next N days."""
    out = {}
    for keyword, value in query:
        if keyword.endswith("Date") and len(value) > 2 and value[0] in "+-" and value[-1] == "d" \
                and value[1:-1].isdigit():
            other = today + datetime.timedelta(days=int(value[:-1]))
            first, last = sorted((today, other))
            value = f"{first:%Y%m%d}-{last:%Y%m%d}"
        out[keyword] = value
    return out


class Upstream(ABC):
    """An edge's upstream archive (see the module docstring)."""

    def __init__(self, api: str, credential: str = "") -> None:
        self.api = api.rstrip("/")
        #: Sent as ``Authorization: Bearer`` on every HTTP request to upstream (``upstream_api_key``).
        self.credential = credential

    @abstractmethod
    def find_studies(self, keys: Mapping[str, str]) -> list[StudyFound]:
        """The studies matching ``keys`` (Study Root, STUDY level)."""

    @abstractmethod
    def instances(self, study_uid: str) -> set[str]:
        """The SOP Instance UIDs upstream holds in ``study_uid``."""

    @abstractmethod
    def retrieve(self, study_uid: str) -> int:
        """Fetch ``study_uid`` to this node; how many instances came (or were sent)."""

    @abstractmethod
    def answers(self) -> bool:
        """Whether upstream answers now (C-ECHO, or a QIDO-RS request)."""

    def digests(self, study_uid: str) -> dict[str, InstanceDigest] | None:
        """SOP Instance UID -> what a Bastion upstream stores of each instance of ``study_uid``; None where upstream
        has no such API (not a Bastion, or ``upstream_api`` not set)."""
        if not self.api:
            return None
        try:
            doc = _get_json(f"{self.api}/api/studies/{urllib.parse.quote(study_uid)}/digests", self.credential)
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and b"no study" in exc.read():
                return {}
            return None
        except (OSError, ValueError) as exc:
            raise UpstreamUnreachable(f"upstream API {self.api}: {exc}") from exc
        return {i["sop_uid"]: InstanceDigest(i["transfer_syntax"], i["dataset_digest"])
                for i in doc.get("instances", [])}


def _bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"} if credential else {}


def _get_json(url: str, credential: str = "") -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json, application/dicom+json",
                                                   **_bearer(credential)})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as rsp:
        body = rsp.read()
    return json.loads(body) if body else []


def _value(item: Any, tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])


class DimseUpstream(Upstream):
    """An upstream reached by C-FIND and C-MOVE (pynetdicom's requestor, in the calling thread); over DICOM TLS with
    ``tls`` (a ``tls://`` upstream: :func:`bastion.dimse.tls.client_context`)."""

    def __init__(self, remote: RemoteAE, calling_aet: str, api: str, credential: str = "",
                 tls: ssl.SSLContext | None = None) -> None:
        super().__init__(api, credential)
        self.remote = remote
        self.calling_aet = calling_aet
        self.tls = tls

    def _associate(self, model: Any) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.network_timeout = TIMEOUT_S
        ae.dimse_timeout = MOVE_TIMEOUT_S
        ae.add_requested_context(model)
        assoc = ae.associate(self.remote.host, self.remote.port, ae_title=self.remote.aet,
                             tls_args=(self.tls, self.remote.host) if self.tls is not None else None)
        if not assoc.is_established:
            raise UpstreamUnreachable(f"upstream {self.remote} did not accept the association")
        return assoc

    def answers(self) -> bool:
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        try:
            assoc = self._associate(Verification)
        except UpstreamUnreachable:
            return False
        try:
            status = assoc.send_c_echo()
            return getattr(status, "Status", None) == 0x0000
        finally:
            assoc.release()

    def _find(self, queries: Sequence[tuple[str, Mapping[str, str], Sequence[str]]],
              more: Callable[[list[Any]], list[tuple[str, Mapping[str, str], Sequence[str]]]] | None = None
              ) -> list[Any]:
        """The identifiers answering each (level, keys, keys returned) query, on one association; ``more``
        makes the next queries from the first's answers (a hierarchical descent)."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

        assoc = self._associate(StudyRootQueryRetrieveInformationModelFind)
        try:
            found = [i for q in queries for i in self._answers(assoc, *q)]
            if more is not None:
                found = [i for q in more(found) for i in self._answers(assoc, *q)]
        finally:
            assoc.release()
        return found

    def _answers(self, assoc: Any, level: str, keys: Mapping[str, str], returned: Sequence[str]) -> list[Any]:
        from pydicom import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for keyword in returned:
            setattr(ds, keyword, "")
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
        found: list[Any] = []
        for status, identifier in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code is None:
                raise UpstreamUnreachable(f"upstream {self.remote.aet}: no C-FIND response")
            if code in (0xFF00, 0xFF01) and identifier is not None:
                found.append(identifier)
            elif code != 0x0000:
                raise UpstreamUnreachable(f"upstream {self.remote.aet}: C-FIND status 0x{code:04X}")
        return found

    def find_studies(self, keys: Mapping[str, str]) -> list[StudyFound]:
        query = ("STUDY", keys, ("StudyInstanceUID", "PatientID", "StudyDate", "StudyTime"))
        return [StudyFound(str(i.StudyInstanceUID), str(i.get("PatientID", "")), str(i.get("StudyDate", "")),
                           str(i.get("StudyTime", ""))) for i in self._find([query]) if i.get("StudyInstanceUID")]

    def instances(self, study_uid: str) -> set[str]:
        """Series by series (the hierarchical search of PS3.4 C.4.1.3.1, which every SCP supports)."""

        def images(series: list[Any]) -> list[tuple[str, Mapping[str, str], Sequence[str]]]:
            return [("IMAGE", {"StudyInstanceUID": study_uid, "SeriesInstanceUID": str(s.SeriesInstanceUID)},
                     ("SOPInstanceUID",)) for s in series if s.get("SeriesInstanceUID")]

        found = self._find([("SERIES", {"StudyInstanceUID": study_uid}, ("SeriesInstanceUID",))], images)
        return {str(i.SOPInstanceUID) for i in found if i.get("SOPInstanceUID")}

    def retrieve(self, study_uid: str) -> int:
        from pydicom import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = study_uid
        assoc = self._associate(StudyRootQueryRetrieveInformationModelMove)
        final: Any = None
        try:
            for status, _ in assoc.send_c_move(ds, self.calling_aet, StudyRootQueryRetrieveInformationModelMove):
                if getattr(status, "Status", None) is None:
                    raise UpstreamUnreachable(f"upstream {self.remote.aet}: no C-MOVE response")
                final = status
        finally:
            assoc.release()
        if final is None or final.Status != 0x0000:
            code = "none" if final is None else f"0x{final.Status:04X}"
            raise UpstreamUnreachable(f"upstream {self.remote.aet}: C-MOVE of {study_uid} ended with status {code}"
                                      " (does upstream know this node as a remote AE?)")
        return int(final.get("NumberOfCompletedSuboperations", 0))


class DicomWebUpstream(Upstream):
    """An upstream reached by QIDO-RS and WADO-RS; what WADO-RS returns is stored by ``store`` (Part 10 bytes)."""

    def __init__(self, base: str, api: str, store: Callable[[bytes], None], credential: str = "") -> None:
        super().__init__(api or (base[: -len("/dicom-web")] if base.endswith("/dicom-web") else ""), credential)
        self.base = base.rstrip("/")
        self.store = store

    def _qido(self, path: str, params: Mapping[str, str]) -> list[Any]:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        try:
            doc = _get_json(url, self.credential)
        except (OSError, ValueError) as exc:
            raise UpstreamUnreachable(f"QIDO-RS {url}: {exc}") from exc
        return doc if isinstance(doc, list) else []

    def answers(self) -> bool:
        try:
            self._qido("/studies", {"limit": "1"})
        except UpstreamUnreachable:
            return False
        return True

    def find_studies(self, keys: Mapping[str, str]) -> list[StudyFound]:
        params = {**keys, "includefield": "StudyDate,StudyTime,PatientID"}
        return [StudyFound(_value(i, _STUDY_UID), _value(i, _PATIENT_ID), _value(i, _STUDY_DATE),
                           _value(i, _STUDY_TIME)) for i in self._qido("/studies", params) if _value(i, _STUDY_UID)]

    def instances(self, study_uid: str) -> set[str]:
        rows = self._qido(f"/studies/{urllib.parse.quote(study_uid)}/instances", {"includefield": "SOPInstanceUID"})
        return {_value(i, _SOP_UID) for i in rows if _value(i, _SOP_UID)}

    def retrieve(self, study_uid: str) -> int:
        url = f"{self.base}/studies/{urllib.parse.quote(study_uid)}"
        request = urllib.request.Request(url, headers={"Accept": 'multipart/related; type="application/dicom"; '
                                                                 "transfer-syntax=*", **_bearer(self.credential)})
        try:
            with urllib.request.urlopen(request, timeout=MOVE_TIMEOUT_S) as rsp:
                ctype, body = rsp.headers.get("Content-Type", ""), rsp.read()
        except OSError as exc:
            raise UpstreamUnreachable(f"WADO-RS {url}: {exc}") from exc
        boundary = next((p.split("=", 1)[1].strip('"') for p in ctype.split(";") if p.strip().startswith("boundary=")),
                        "")
        parts = parse_multipart(body, boundary)
        for part in parts:
            self.store(bytes(part.body))
        return len(parts)


def upstream_of(settings: Settings, store: Callable[[bytes], None]) -> Upstream | None:
    """The edge's upstream (None when this node is not an edge); ``store`` keeps what WADO-RS fetches."""
    rule = settings.upstream_rule
    if rule is None:
        return None
    if rule.stow_url:
        return DicomWebUpstream(rule.stow_url, settings.upstream_api, store, settings.upstream_api_key)
    assert rule.remote is not None
    tls = client_context(settings) if rule.remote.tls else None
    return DimseUpstream(rule.remote, settings.aet, settings.upstream_api, settings.upstream_api_key, tls)
