"""HL7 ORU^R01 over MLLP and the printable report, over a real server (docs/reporting.md, "HL7" and "Printable
report"): an MLLP listener on a real TCP port receives the message of a signed report, which parses (hl7apy) and
carries the report's text, the patient ID and the accession number; an amendment sends a second message with status
C; with the listener's port closed the message waits in the outbox, across a restart of the server, and is delivered
once a listener answers there; an AE answer is retried, and after the last attempt the message is a dead letter
until retried. The PDF parses (pypdf) and holds the sections, the patient and the signer."""

from __future__ import annotations

import io
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import BastionServer, Study, free_port, make_study
from test_forward import wait_for

from bastion.reporting import hl7

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
#: Quick retries, so that a test waits seconds, not minutes.
FAST = {"BASTION_HL7_BACKOFF": "0.2", "BASTION_HL7_BACKOFF_MAX": "0.5", "BASTION_HL7_TIMEOUT": "5"}
TEXT = "Left frontal lesion | 5 µm ^ café & co ~ x \\ y.\nSecond line: é ü."


class Listener:
    """An MLLP receiver on ``port``: keeps each message received (ER7) and answers ``code()`` in MSA-1."""

    def __init__(self, port: int, code: Callable[[], str] = lambda: "AA") -> None:
        self.port, self.code = port, code
        self.received: list[str] = []
        self._server: socketserver.ThreadingTCPServer | None = None

    def start(self) -> Listener:
        listener = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data = b""
                while not data.endswith(b"\x1c\r"):
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                message = data.strip(b"\x0b\x1c\r").decode("utf-8")
                control = message.split("\r")[0].split("|")[9]
                listener.received.append(message)
                ack = (f"MSH|^~\\&|LISTENER|TEST|BASTION|BASTION|20260101000000||ACK^R01^ACK|{control}A|P|2.5.1\r"
                       f"MSA|{listener.code()}|{control}|as the test answers\r")
                self.request.sendall(b"\x0b" + ack.encode() + b"\x1c\r")

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def messages(self, report_id: str) -> list[str]:
        return [m for m in self.received if f"|{report_id}|" in m]


def api(server: BastionServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, server.url(path), timeout=60, **kwargs)


def stored_study(server: BastionServer, out: Path, accession: str) -> Study:
    made = make_study(out, series=1, per_series=1, modality="CT", patient_name="Müller^Zoé", accession=accession)
    sent = server.storescu(*made.files)
    assert sent.returncode == 0, sent.stderr
    return made


def signed_report(server: BastionServer, study: Study, signer: str = "Dr Hl7") -> dict[str, Any]:
    draft = api(server, "POST", "/api/reports", json={"study": study.study_uid, "template": "ct-head"})
    assert draft.status_code == 201, draft.text
    edited = api(server, "PUT", f"/api/reports/{draft.json()['id']}",
                 json={"sections": {"findings": TEXT, "impression": "No acute change."}, "version": 1})
    assert edited.status_code == 200, edited.text
    signed = api(server, "POST", f"/api/reports/{draft.json()['id']}/sign", json={"user": signer})
    assert signed.status_code == 200, signed.text
    return dict(signed.json())


def outbox(server: BastionServer, **params: str) -> dict[str, Any]:
    rsp = api(server, "GET", "/api/hl7", params=params)
    assert rsp.status_code == 200, rsp.text
    return dict(rsp.json())


def observations(er7: str) -> dict[str, tuple[str, str]]:
    """OBX by section name: (the text, OBX-11)."""
    order = hl7.parse(er7).oru_r01_patient_result.oru_r01_order_observation
    return {hl7.text_of(o.obx.obx_3): (hl7.text_of(o.obx.obx_5), hl7.text_of(o.obx.obx_11))
            for o in order.oru_r01_observation}


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    started = Listener(free_port()).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, listener: Listener) -> Iterator[BastionServer]:
    started = BastionServer(tmp_path_factory.mktemp("hl7") / "data", settings={
        **FAST, "BASTION_HL7_RECEIVERS": f"127.0.0.1:{listener.port}", "BASTION_HL7_RECEIVING_APPLICATION": "RIS",
        "BASTION_SITE_NAME": "St Élan Hospital"}).start()
    yield started
    started.stop()


def test_escaping_round_trips() -> None:
    assert hl7.escape("a|b^c&d~e\\f\ng") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\.br\\g"
    assert hl7.unescape(hl7.escape(TEXT)) == TEXT


def test_a_signed_report_and_its_amendment_reach_the_listener(server: BastionServer, listener: Listener,
                                                              tmp_path: Path) -> None:
    study = stored_study(server, tmp_path, "ACC-HL7-1")
    report = signed_report(server, study)
    rid = report["id"]
    er7 = wait_for("the ORU^R01 of the signed report", lambda: listener.messages(rid))[0]
    msg = hl7.parse(er7)
    assert hl7.text_of(msg.msh.msh_9) == "ORU" and "ORU^R01^ORU_R01" in er7.split("\r")[0]
    assert hl7.text_of(msg.msh.msh_5) == "RIS" and hl7.text_of(msg.msh.msh_12) == "2.5.1"
    result = msg.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    assert hl7.text_of(pid.pid_3) == study.patient_id and hl7.text_of(pid.pid_5) == "Müller"
    obr = result.oru_r01_order_observation.obr
    assert hl7.text_of(obr.obr_3) == rid and hl7.text_of(obr.obr_18) == "ACC-HL7-1"
    assert hl7.text_of(obr.obr_25) == "F" and hl7.text_of(obr.obr_32) == "Dr Hl7"
    assert hl7.text_of(obr.obr_7) == study.study_date and hl7.text_of(obr.obr_4) == "ct-head"
    found = observations(er7)
    assert found["findings"] == (TEXT, "F") and found["impression"] == ("No acute change.", "F")
    assert hl7.text_of(hl7.parse(er7, groups=False).zds.zds_1) == study.study_uid

    amended = api(server, "POST", f"/api/reports/{rid}/amend",
                  json={"sections": {"impression": "Lesion: see findings."}, "reason": "impression | corrected"})
    assert amended.status_code == 200, amended.text
    both = wait_for("the amendment's message", lambda: len(listener.messages(rid)) >= 2 and listener.messages(rid))
    second = observations(both[1])
    assert second["impression"] == ("Lesion: see findings.", "C")
    assert second["amendment"] == ("impression | corrected", "C")
    assert hl7.text_of(hl7.parse(both[1]).oru_r01_patient_result.oru_r01_order_observation.obr.obr_25) == "C"
    assert hl7.text_of(hl7.parse(both[0]).msh.msh_10) != hl7.text_of(hl7.parse(both[1]).msh.msh_10)
    state = wait_for("both counted delivered", lambda: [r for r in outbox(server)["receivers"]
                                                        if r["delivered"] >= 2])
    assert state[0]["receiver"] == f"127.0.0.1:{listener.port}" and state[0]["configured"] is True
    time.sleep(1.5)  # a few more looks at the reports: nothing is sent twice
    assert len(listener.messages(rid)) == 2


def test_the_printable_report(server: BastionServer, tmp_path: Path) -> None:
    import pypdf

    study = stored_study(server, tmp_path, "ACC-PDF-1")
    draft = api(server, "POST", "/api/reports", json={"study": study.study_uid, "template": "ct-head"}).json()
    api(server, "PUT", f"/api/reports/{draft['id']}", json={"sections": {"findings": TEXT}, "version": 1})
    rsp = api(server, "GET", f"/api/reports/{draft['id']}/pdf")
    assert rsp.status_code == 200 and rsp.headers["content-type"] == "application/pdf"
    text = "\n".join(p.extract_text() for p in pypdf.PdfReader(io.BytesIO(rsp.content)).pages)
    assert "DRAFT" in text and "NOT SIGNED" in text and study.patient_id in text and "Müller, Zoé" in text
    assert "St Élan Hospital" in text and "5 µm" in text and "café" in text and "ACC-PDF-1" in text
    api(server, "POST", f"/api/reports/{draft['id']}/sign", json={"user": "Dr Print"})
    signed = pypdf.PdfReader(io.BytesIO(api(server, "GET", f"/api/reports/{draft['id']}/pdf").content))
    text = "\n".join(p.extract_text() for p in signed.pages)
    assert "Signed by Dr Print" in text and "NOT SIGNED" not in text and "DRAFT" not in text
    assert "Findings" in text and "Second line: é ü." in text and "version 3" in text and "page 1 of" in text
    assert api(server, "GET", "/api/reports/" + "0" * 32 + "/pdf").status_code == 404


def test_queued_while_the_listener_is_down_and_delivered_after_a_restart(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there yet: connections are refused
    node = BastionServer(tmp_path / "data", settings={**FAST, "BASTION_HL7_RECEIVERS": f"127.0.0.1:{port}"}).start()
    later: Listener | None = None
    try:
        study = stored_study(node, tmp_path / "study", "ACC-HL7-2")
        rid = signed_report(node, study)["id"]
        waiting = wait_for("a failed attempt", lambda: [m for m in outbox(node)["messages"]
                                                        if m["report"] == rid and m["attempts"] >= 1])
        assert waiting[0]["state"] == "pending" and waiting[0]["last_error"]
        node.stop()
        node.start()
        assert [m["report"] for m in outbox(node)["messages"]] == [rid]  # still waiting after the restart
        later = Listener(port).start()
        er7 = wait_for("the delivery once a listener answers", lambda: later.messages(rid) if later else [])[0]
        assert hl7.text_of(hl7.parse(er7).oru_r01_patient_result.oru_r01_order_observation.obr.obr_18) == "ACC-HL7-2"
        wait_for("the outbox empty", lambda: not outbox(node)["messages"])
    finally:
        node.stop()
        if later is not None:
            later.stop()


def test_an_error_answer_is_retried_then_a_dead_letter_until_retried(tmp_path: Path) -> None:
    answer = ["AE"]
    listener = Listener(free_port(), lambda: answer[0]).start()
    node = BastionServer(tmp_path / "data", settings={**FAST, "BASTION_HL7_RECEIVERS": f"127.0.0.1:{listener.port}",
                                                      "BASTION_HL7_MAX_ATTEMPTS": "3"}).start()
    try:
        study = stored_study(node, tmp_path / "study", "ACC-HL7-3")
        rid = signed_report(node, study)["id"]
        dead = wait_for("a dead letter", lambda: outbox(node, state="dead")["messages"])
        assert dead[0]["report"] == rid and dead[0]["attempts"] == 3 and "AE" in dead[0]["last_error"]
        assert len(listener.messages(rid)) == 3  # each attempt sent the same message
        assert len({m.split("\r")[0].split("|")[9] for m in listener.messages(rid)}) == 1  # one control id
        assert api(node, "POST", "/api/hl7/retry", json={"receiver": 5}).status_code == 400
        answer[0] = "AA"
        assert api(node, "POST", "/api/hl7/retry", json={}).json() == {"retried": 1}
        wait_for("delivery after the retry", lambda: outbox(node, state="delivered")["messages"])
        assert len(listener.messages(rid)) == 4 and not outbox(node)["messages"]
        assert api(node, "GET", "/api/hl7", params={"state": "nope"}).status_code == 400
    finally:
        node.stop()
        listener.stop()


def test_a_refused_connection_is_an_mllp_error() -> None:
    import asyncio

    from bastion.reporting import mllp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(mllp.MllpError):
            asyncio.run(mllp.send(f"127.0.0.1:{port}", "MSH|^~\\&|A\r", "x", 2.0))
