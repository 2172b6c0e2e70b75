"""Dictation in the report editor and the typing queue (docs/dictation.md, docs/reporting.md "Typing queue").

The API: a rejected transcription leaves the draft and waits in ``GET /api/typing``; the typed text joins the
dictation section; a report signed meanwhile answers 409; the queue comes back after ``bastion index rebuild``; the
``typist`` role works the queue and nothing else. The page: Chromium records an espeak-ng WAV as its microphone in
the editor, the transcript reaches the draft, the recording plays, is rejected, and is typed on ``/reporting/typing``.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import BastionServer, Study, browser_check_result, make_study, run_bastion, start_browser_check
from oidc_issuer import TestIssuer
from test_auth import AUDIENCE, auth_settings

#: A sentence the radiology model hears word for word (tests/integration/test_dictation.py), and the words the
#: draft must then hold.
SENTENCE = "no acute intracranial haemorrhage"
KEY_WORDS = {"intracranial", "haemorrhage"}
TYPED = "No acute intracranial haemorrhage. Typed by the secretary."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    started = BastionServer(tmp_path_factory.mktemp("dictation-pages") / "data").start()
    yield started
    started.stop()


def api(server: BastionServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, server.url(path), timeout=120, **kwargs)


def spoken(path: Path, text: str = SENTENCE) -> bytes:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: run scripts/install-test-deps.sh")
    subprocess.run(["espeak-ng", "-v", "en-gb", "-w", str(path), text], check=True, timeout=60)
    return path.read_bytes()


def draft(server: BastionServer, root: Path, modality: str = "CT", template: str = "ct-head") -> tuple[Study, str]:
    made = make_study(root, series=1, per_series=1, modality=modality)
    assert server.storescu(*made.files).returncode == 0
    created = api(server, "POST", "/api/reports", json={"study": made.study_uid, "template": template})
    assert created.status_code == 201, created.text
    return made, str(created.json()["id"])


def dictate(server: BastionServer, rid: str, audio: bytes, **kwargs: Any) -> dict[str, Any]:
    rsp = api(server, "POST", f"/api/reports/{rid}/audio", content=audio, headers={"Content-Type": "audio/wav",
                                                                                     **kwargs.get("headers", {})})
    assert rsp.status_code == 201, rsp.text
    answer: dict[str, Any] = rsp.json()
    return answer


def test_reject_queue_type_and_sign_meanwhile(server: BastionServer, tmp_path: Path) -> None:
    made, rid = draft(server, tmp_path / "ct")
    audio = spoken(tmp_path / "s.wav")
    kept = api(server, "PUT", f"/api/reports/{rid}", json={"sections": {"dictation": "Clinical note."}, "version": 1})
    assert kept.status_code == 200, kept.text
    first = dictate(server, rid, audio)
    assert KEY_WORDS <= set(first["transcript"].split()), first["transcript"]
    second = dictate(server, rid, audio)
    doc = api(server, "GET", f"/api/reports/{rid}").json()
    assert doc["sections"]["dictation"] == f"Clinical note.\n{first['transcript']}\n{second['transcript']}"
    assert api(server, "GET", "/api/typing").json()["queue"] == []

    assert api(server, "POST", f"/api/reports/{rid}/audio/{'0' * 32}/reject").status_code == 404
    rejected = api(server, "POST", f"/api/reports/{rid}/audio/{first['audio']}/reject")
    assert rejected.status_code == 200, rejected.text
    doc = rejected.json()
    # The rejected transcript leaves the section (its own line); the note and the other transcript stay.
    assert doc["sections"]["dictation"] == f"Clinical note.\n{second['transcript']}"
    entry = next(a for a in doc["audio"] if a["id"] == first["audio"])
    assert entry["status"] == "rejected" and entry["rejected_by"] == "anonymous" and entry["rejected_at"]
    assert api(server, "POST", f"/api/reports/{rid}/audio/{first['audio']}/reject").status_code == 409

    queue = api(server, "GET", "/api/typing").json()["queue"]
    assert [(q["report"], q["audio"]) for q in queue] == [(rid, first["audio"])]
    item = queue[0]
    assert item["study"] == made.study_uid and item["patient_id"] == made.patient_id
    assert item["dictated_by"] == "anonymous" and item["seconds"] == first["seconds"] > 1
    played = api(server, "GET", f"/api/typing/{rid}/{first['audio']}")
    assert played.status_code == 200 and played.content == audio
    assert played.headers["content-type"] == "audio/wav"
    assert api(server, "GET", f"/api/typing/{rid}/{second['audio']}").status_code == 404  # not rejected

    for bad in ({}, {"text": "  \n"}, {"text": 5}, {"text": "x" * 100_001}):
        refused = api(server, "POST", f"/api/typing/{rid}/{first['audio']}", json=bad)
        assert refused.status_code == 400 and "text" in refused.json()["error"], bad
    assert api(server, "POST", f"/api/typing/{rid}/{second['audio']}", json={"text": "x"}).status_code == 409
    assert api(server, "GET", f"/api/reports/{rid}").json()["version"] == doc["version"]  # nothing stored
    done = api(server, "POST", f"/api/typing/{rid}/{first['audio']}", json={"text": TYPED, "user": "sec.retary"})
    assert done.status_code == 200, done.text
    after = done.json()
    assert after["sections"]["dictation"] == f"Clinical note.\n{second['transcript']}\n{TYPED}"
    entry = next(a for a in after["audio"] if a["id"] == first["audio"])
    assert entry["status"] == "typed" and entry["typed_by"] == "sec.retary"
    assert api(server, "GET", "/api/typing").json()["queue"] == []
    again = api(server, "POST", f"/api/typing/{rid}/{first['audio']}", json={"text": TYPED})
    assert again.status_code == 409 and "typed already" in again.json()["error"]

    # Rejected, then signed before it is typed: the typist is told, nothing is added, it leaves the queue.
    assert api(server, "POST", f"/api/reports/{rid}/audio/{second['audio']}/reject").status_code == 200
    assert len(api(server, "GET", "/api/typing").json()["queue"]) == 1
    assert api(server, "POST", f"/api/reports/{rid}/sign", json={"user": "Dr^Who"}).status_code == 200
    late = api(server, "POST", f"/api/typing/{rid}/{second['audio']}", json={"text": "too late"})
    assert late.status_code == 409 and "signed meanwhile" in late.json()["error"], late.text
    assert "too late" not in api(server, "GET", f"/api/reports/{rid}").json()["sections"]["dictation"]
    assert api(server, "GET", "/api/typing").json()["queue"] == []
    assert api(server, "POST", f"/api/reports/{rid}/audio/{second['audio']}/reject").status_code == 409


def test_an_edited_transcript_stays_and_the_queue_survives_a_rebuild(server: BastionServer, tmp_path: Path) -> None:
    _, rid = draft(server, tmp_path / "mr", modality="MR", template="mr-brain")
    answer = dictate(server, rid, spoken(tmp_path / "s.wav"))
    doc = api(server, "GET", f"/api/reports/{rid}").json()
    edited = f"{answer['transcript']} (checked)"
    assert api(server, "PUT", f"/api/reports/{rid}", json={"sections": {"dictation": edited},
                                                             "version": doc["version"]}).status_code == 200
    rejected = api(server, "POST", f"/api/reports/{rid}/audio/{answer['audio']}/reject").json()
    assert rejected["sections"]["dictation"] == "(checked)"  # the transcript's words, verbatim, are taken out

    before = api(server, "GET", "/api/typing").json()["queue"]
    assert [q["audio"] for q in before] == [answer["audio"]]
    server.stop()
    rebuilt = run_bastion("index", "rebuild", "--data", server.data)
    assert rebuilt.returncode == 0, rebuilt.stderr
    server.start()
    assert api(server, "GET", "/api/typing").json()["queue"] == before
    assert api(server, "POST", f"/api/typing/{rid}/{answer['audio']}", json={"text": TYPED}).status_code == 200


def test_the_typist_role(tmp_path: Path) -> None:
    issuer = TestIssuer(audience=AUDIENCE).start()
    server = BastionServer(tmp_path / "data", settings=auth_settings(issuer)).start()
    try:
        def bearer(role: str, user: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {issuer.token(roles=[role], preferred_username=user)}"}

        typist, radiologist, viewer = bearer("typist", "sec"), bearer("radiologist", "dr.who"), bearer("viewer", "v")
        made = make_study(tmp_path / "cr", series=1, per_series=1, modality="CR")
        assert server.storescu(*made.files).returncode == 0
        rid = api(server, "POST", "/api/reports", json={"study": made.study_uid, "template": "chest-xray"},
                  headers=radiologist).json()["id"]
        answer = dictate(server, rid, spoken(tmp_path / "s.wav"), headers=radiologist)
        audio = answer["audio"]
        assert api(server, "POST", f"/api/reports/{rid}/audio/{audio}/reject", headers=typist).status_code == 403
        assert api(server, "POST", f"/api/reports/{rid}/audio/{audio}/reject", headers=radiologist
                   ).status_code == 200
        assert api(server, "GET", "/api/typing", headers=viewer).status_code == 403
        queue = api(server, "GET", "/api/typing", headers=typist)
        assert queue.status_code == 200 and queue.json()["queue"][0]["dictated_by"] == "dr.who"
        assert api(server, "GET", f"/api/typing/{rid}/{audio}", headers=typist).status_code == 200
        # A typist hears the queue's recordings, not the reports themselves.
        assert api(server, "GET", f"/api/reports/{rid}", headers=typist).status_code == 403
        assert api(server, "GET", f"/api/reports/{rid}/audio/{audio}", headers=typist).status_code == 403
        assert api(server, "PUT", f"/api/reports/{rid}", json={"sections": {}, "version": 1}, headers=typist
                   ).status_code == 403
        done = api(server, "POST", f"/api/typing/{rid}/{audio}", json={"text": TYPED, "user": "someone else"},
                   headers=typist)
        assert done.status_code == 200, done.text
        entry = next(a for a in done.json()["audio"] if a["id"] == audio)
        assert entry["typed_by"] == "sec"  # the principal, not the body's "user"
    finally:
        server.stop()
        issuer.stop()


def microphone(speech: Path, path: Path, after: float = 4.0) -> float:
    """``speech`` as a microphone hears it, written to ``path``: 0.3 s of quiet room noise (about -60 dBFS, fixed
    seed) before it and ``after`` seconds after it; the seconds until the speech ends.

    Chromium's fake capture sends exact zeros once the file has played, and a recording ending in seconds of exact
    zeros is transcribed badly (the engine's cepstral mean is taken over the whole utterance): the check stops the
    recording while the noise still plays."""
    with wave.open(str(speech)) as w:
        rate, voice = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2")
    noise = np.random.default_rng(7).normal(0, 30, int(rate * (0.3 + after))).astype("<i2")
    lead = int(rate * 0.3)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.concatenate([noise[:lead], voice, noise[lead:]]).tobytes())
    return 0.3 + len(voice) / rate


def test_dictation_and_typing_in_the_browser(server: BastionServer, tmp_path: Path) -> None:
    made, rid = draft(server, tmp_path / "ct", modality="CT", template="ct-head")
    wav = tmp_path / "microphone.wav"
    spoken(tmp_path / "speech.wav")
    speech_ends = microphone(tmp_path / "speech.wav", wav)
    proc = start_browser_check(
        "dictation_check.mjs", "--base", server.url(""), "--out", tmp_path / "out", "--study", made.study_uid,
        "--report", rid, "--wav", wav, "--record-ms", str(int(speech_ends * 1000) + 1000), "--typed", TYPED)
    report = browser_check_result(proc, timeout=240)
    assert report["exit_code"] == 0, report
    assert report["sawTranscribing"], report
    assert KEY_WORDS <= set(report["transcript"].split()), report
    assert KEY_WORDS <= set(report["dictation"].split()), report
    doc = api(server, "GET", f"/api/reports/{rid}").json()
    (recording,) = doc["audio"]
    assert recording["content_type"] == "audio/webm" and recording["status"] == "typed"
    kept = api(server, "GET", f"/api/reports/{rid}/audio/{recording['id']}")
    assert kept.status_code == 200 and kept.content[:4] == b"\x1a\x45\xdf\xa3"  # an EBML (WebM) header
    assert report["audioBytes"] == report["typingBytes"] == len(kept.content) > 1000
    assert report["rejected"] and not KEY_WORDS & set(report["dictationAfterReject"].split()), report
    assert report["typingListed"] and report["dictationAfterTyping"] == TYPED, report
    assert rid not in [q["report"] for q in report["queueAfter"]] and doc["sections"]["dictation"] == TYPED
