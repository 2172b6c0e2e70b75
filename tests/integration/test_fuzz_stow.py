"""Fuzzing STOW-RS of a running ``bastion serve`` over HTTP (PS3.18 10.5): damaged datasets in well-formed
requests, and malformed multipart bodies (RFC 2046 5.1: bad boundaries, missing CRLF, huge header blocks, nested
multipart, zero parts, truncated).

Properties, for every request: the answer is never a 5xx; a well-framed request is answered 200, 202 or 409 with
a DICOM JSON body naming what was stored and what failed; a body broken in its framing is answered 400. After the
run: every object stored before is unchanged (file and SHA-256), the objects in the blob store are exactly those
the index knows (no file without a record, no record without a file), nothing is left in the spool, every object
stored by a well-framed request was reported stored, the server still answers ``/health`` and C-ECHO, and its
log holds no traceback.

Seeds: pydicom's sample files (``pydicom.data.get_testdata_files``), damaged by :func:`fuzzing.mutated`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from conftest import BastionServer, make_study, requires_dcmtk
from fuzzing import (
    MultipartCase,
    StoreSnapshot,
    encode_parts,
    first_traceback,
    fuzz_settings,
    multipart_cases,
    mutated,
    seed_files,
    snapshot,
)
from hypothesis import given
from hypothesis import strategies as st

pytestmark = [requires_dcmtk, pytest.mark.timeout(900)]

SEEDS = seed_files()
STORED, FAILED, REFERENCED_SOP = "00081199", "00081198", "00081155"
#: Malformations a server must answer with 400 (the others may happen to leave a well-formed body).
FRAMING_ERRORS = {"truncate", "no-close", "lf-only", "huge-header", "header-without-colon",
                  "text-after-boundary", "zero-parts"}
_SOP_OF_FILE = re.compile(r"^(?P<sop>[0-9.]+)_")


class Stow:
    """A STOW-RS client that remembers the SOP Instance UIDs the server said it stored."""

    def __init__(self, server: BastionServer) -> None:
        self.server = server
        self.client = httpx.Client(base_url=server.url("/dicom-web"), timeout=60)
        self.reported: set[str] = set()

    def post(self, body: bytes, boundary: str, study: str | None = None, part_type: str = "application/dicom",
             content_type: str | None = None) -> httpx.Response:
        ctype = content_type or f'multipart/related; type="{part_type}"; boundary="{boundary}"'
        url = f"/studies/{study}" if study else "/studies"
        r = self.client.post(url, content=body, headers={"Content-Type": ctype, "Accept": "application/dicom+json"})
        assert r.status_code < 500, (r.status_code, r.text[:500], body[:300])
        if r.status_code in (200, 202):
            self.reported |= {item[REFERENCED_SOP]["Value"][0] for item in r.json().get(STORED, {}).get("Value", [])}
        return r


def stored_sops(server: BastionServer) -> set[str]:
    """The SOP Instance UIDs of the object files in the blob store (their names start with it)."""
    names = (path.name for path in server.blob_files())
    return {m.group("sop") for name in names if (m := _SOP_OF_FILE.match(name))}


def indexed_sops(server: BastionServer) -> set[str]:
    """The SOP Instance UIDs the index knows, by QIDO-RS over all studies."""
    found: set[str] = set()
    offset = 0
    while True:
        r = httpx.get(server.url("/dicom-web/instances"), params={"limit": "1000", "offset": str(offset),
                                                                  "includefield": "00080018"}, timeout=60)
        assert r.status_code == 200, r.text
        page = r.json()
        found |= {item["00080018"]["Value"][0] for item in page}
        if len(page) < 1000:
            return found
        offset += 1000


def check_after(server: BastionServer, before: StoreSnapshot) -> None:
    """The properties of the server after a fuzzing run (see the module)."""
    after = snapshot(server)
    assert not before.unchanged_in(after), before.unchanged_in(after)
    assert stored_sops(server) == indexed_sops(server)
    assert after.counts["instances"] == len(indexed_sops(server))
    assert not server.spool_files(), server.spool_files()
    assert server.get_json("/health")["status"] == "ok"
    assert server.echo().returncode == 0
    assert not first_traceback(server.log()), first_traceback(server.log())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    """A server holding one study (stored by DCMTK storescu), the objects that must stay unchanged."""
    work = tmp_path_factory.mktemp("fuzz-stow")
    srv = BastionServer(work / "data").start()
    study = make_study(work / "study", series=1, per_series=3)
    assert srv.storescu(*study.files).returncode == 0
    srv.study_uid = study.study_uid  # type: ignore[attr-defined]
    yield srv
    srv.stop()


# -- damaged datasets in well-formed requests ------------------------------------------------------------------
@st.composite
def dataset_requests(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """One to three damaged sample files, and whether the request names a study in its URL."""
    return draw(st.lists(mutated(SEEDS), min_size=1, max_size=3)), draw(st.booleans())


def check_datasets(stow: Stow, parts: list[bytes], into_study: str | None) -> None:
    """One well-framed STOW-RS request of damaged datasets and the properties of its answer."""
    boundary = "fuzz-boundary-7f3a"
    body = encode_parts(boundary, [([("Content-Type", "application/dicom")], p) for p in parts])
    if b"\r\n--" + boundary.encode() in body[len(boundary) + 2: -len(boundary) - 8]:
        return  # a part holding the delimiter is not framed as generated
    r = stow.post(body, boundary, into_study)
    assert r.status_code in (200, 202, 409), (r.status_code, r.text[:500])
    answer = r.json()
    listed = len(answer.get(STORED, {}).get("Value", [])) + len(answer.get(FAILED, {}).get("Value", []))
    assert listed == len(parts), (answer, len(parts))


def test_damaged_datasets_are_stored_or_refused_part_by_part(server: BastionServer) -> None:
    before, sops_before = snapshot(server), stored_sops(server)
    stow = Stow(server)
    study = server.study_uid  # type: ignore[attr-defined]

    @given(request=dataset_requests())
    @fuzz_settings()
    def check(request: tuple[list[bytes], bool]) -> None:
        parts, into_study = request
        check_datasets(stow, parts, study if into_study else None)

    check()
    check_after(server, before)
    assert stored_sops(server) - sops_before <= stow.reported, "an object was stored but not reported stored"


# -- malformed multipart bodies --------------------------------------------------------------------------------
@st.composite
def multipart_requests(draw: st.DrawFn) -> tuple[MultipartCase, str]:
    """A multipart body of damaged samples, well formed or broken, and the Content-Type's part type."""
    part_type = draw(st.sampled_from(["application/dicom", "application/dicom", "multipart/related", "text/plain"]))
    case = draw(multipart_cases(contents=mutated(SEEDS), content_type=part_type))
    return case, part_type


def check_multipart(stow: Stow, case: MultipartCase, part_type: str) -> None:
    """One STOW-RS request with a (possibly) malformed multipart body and the properties of its answer."""
    r = stow.post(case.body, case.boundary, part_type=part_type)
    if case.malformation in FRAMING_ERRORS:
        assert r.status_code in (400, 415) if part_type != "application/dicom" else r.status_code == 400, \
            (case.malformation, r.status_code, r.text[:300])
    else:
        assert r.status_code in (200, 202, 400, 409, 415), (case.malformation, r.status_code, r.text[:300])


def test_malformed_multipart_bodies_are_refused(server: BastionServer) -> None:
    before = snapshot(server)
    stow = Stow(server)

    @given(request=multipart_requests())
    @fuzz_settings()
    def check(request: tuple[MultipartCase, str]) -> None:
        check_multipart(stow, *request)

    check()
    check_after(server, before)


#: h11's limit on a request head not yet parsed (``h11._connection.DEFAULT_MAX_INCOMPLETE_EVENT_SIZE``).
H11_HEAD_LIMIT = 16 * 1024


@pytest.mark.parametrize("content_type", [
    "multipart/related; boundary=" + "b" * 100_000,
    "multipart/related; type=application/dicom; " + "; ".join(["a=b"] * 10_000),
    "multipart/related",
    "multipart/related; boundary=",
    'multipart/related; boundary=""',
    "multipart/related; boundary=" + "\\" * 300,
    "application/dicom; " + "x" * 100_000,
])
def test_hostile_content_types_are_refused(server: BastionServer, content_type: str) -> None:
    """A Content-Type of 100 KB, of 10,000 parameters, or with an empty or absurd boundary: 400 or 415, and the
    server goes on serving.

    A request head larger than h11's limit (16 KiB of head not yet parsed) is refused by uvicorn itself when it
    arrives in pieces (TCP's segmentation decides): a plain-text 400 and the connection closed, with the rest of
    the head unread, which makes the kernel reset the connection: the client may see the 400 or the reset."""
    body = encode_parts("b", [([("Content-Type", "application/dicom")], SEEDS[0])])
    over_limit = len(content_type) > H11_HEAD_LIMIT
    try:
        r = httpx.post(server.url("/dicom-web/studies"), content=body, headers={"Content-Type": content_type},
                       timeout=60)
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        assert over_limit, "only a head over h11's limit may be cut off"
    else:
        assert r.status_code in (400, 415), (r.status_code, r.text[:300])
        assert "error" in r.json() or (over_limit and r.text.startswith("Invalid HTTP request")), r.text[:300]
    assert server.get_json("/health")["status"] == "ok"
