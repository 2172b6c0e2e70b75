"""The PS3.15 A.5 messages of logged events, their RFC 5424 syslog form, and sending them over TLS (RFC 5425) to a
real local TLS listener."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from syslog_listener import SyslogListener, certificate

from bastion.audit import AuditEvent, AuditKind, AuditLog, Outcome
from bastion.audit.chain import log_files
from bastion.audit.export import entries, jsonl_record, octet_counted, send_tls, syslog_record
from bastion.audit.forward import AuditForwarder, read_cursor
from bastion.audit.messages import audit_message, to_xml
from bastion.errors import BastionError


def _entries(tmp_path: Path, *events: AuditEvent) -> list[dict[str, object]]:
    log = AuditLog(str(tmp_path))
    for event in events:
        log.record(event)
    log.close()
    return list(entries(str(tmp_path)))


def test_a_store_is_dicom_instances_transferred_with_patient_and_study(tmp_path: Path) -> None:
    (entry,) = _entries(tmp_path, AuditEvent(AuditKind.STORE, action="C", user="MODALITY", address="10.1.2.3",
                                             destination="BASTION", via="dimse", patient_id="PAT1",
                                             studies=("1.2.840.1",), count=12))
    msg = audit_message(entry, "BASTION")
    ident = msg["EventIdentification"]
    assert ident["EventID"] == {"csd-code": "110104", "codeSystemName": "DCM",
                                "originalText": "DICOM Instances Transferred"}
    assert (ident["EventActionCode"], ident["EventOutcomeIndicator"]) == ("C", 0)
    requestor, archive = msg["ActiveParticipant"]
    assert requestor["UserID"] == "MODALITY" and requestor["UserIsRequestor"] is True
    assert (requestor["NetworkAccessPointID"], requestor["NetworkAccessPointTypeCode"]) == ("10.1.2.3", 2)
    assert requestor["RoleIDCode"]["csd-code"] == "110153" and archive["RoleIDCode"]["csd-code"] == "110152"
    patient, study = msg["ParticipantObjectIdentification"]
    assert (patient["ParticipantObjectID"], patient["ParticipantObjectTypeCode"],
            patient["ParticipantObjectTypeCodeRole"]) == ("PAT1", 1, 1)
    assert study["ParticipantObjectID"] == "1.2.840.1" and study["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"


@pytest.mark.parametrize(("kind", "given", "code", "action", "type_code"), [
    (AuditKind.QUERY, "", "110112", "E", None),
    (AuditKind.RETRIEVE, "", "110104", "R", None),
    (AuditKind.VIEW, "", "110103", "R", None),
    (AuditKind.EXPORT, "", "110106", "R", None),
    (AuditKind.DELETE, "", "110105", "D", None),
    (AuditKind.DELETE, "U", "110103", "U", None),
    (AuditKind.LOGIN, "", "110114", "E", "110122"),
    (AuditKind.ASSOCIATION, "", "110113", "E", "110126"),
    (AuditKind.EMERGENCY, "", "110113", "E", "110127"),
    (AuditKind.EMERGENCY, "D", "110113", "E", "110138"),
    (AuditKind.CONFIG, "110120", "110100", "E", "110120"),
    (AuditKind.CONFIG, "110121", "110100", "E", "110121"),
    (AuditKind.STORE, "110132", "110113", "E", "110132"),
])
def test_each_kind_maps_to_its_a53_message(tmp_path: Path, kind: AuditKind, given: str, code: str,
                                           action: str, type_code: str | None) -> None:
    """``given``: the event's EventTypeCode, or for a one-letter value its action (D, U)."""
    event = (AuditEvent(kind, Outcome.SUCCESS, given, user="u") if len(given) == 1
             else AuditEvent(kind, Outcome.SUCCESS, user="u", event_type=given))
    (entry,) = _entries(tmp_path, event)
    ident = audit_message(entry, "BASTION")["EventIdentification"]
    assert ident["EventID"]["csd-code"] == code and ident["EventActionCode"] == action
    assert [c["csd-code"] for c in ident.get("EventTypeCode", [])] == ([type_code] if type_code else [])


def test_a_query_carries_its_keys_and_level(tmp_path: Path) -> None:
    (entry,) = _entries(tmp_path, AuditEvent(AuditKind.QUERY, user="FINDSCU", level="STUDY", count=3,
                                             detail="PatientID=P1 StudyDate=20200101-"))
    query = audit_message(entry, "BASTION")["ParticipantObjectIdentification"][-1]
    assert query["ParticipantObjectTypeCodeRole"] == 24
    assert base64.b64decode(query["ParticipantObjectQuery"]).decode() == "level=STUDY PatientID=P1 StudyDate=20200101-"


def test_the_xml_is_one_well_formed_line_of_the_a51_schema(tmp_path: Path) -> None:
    (entry,) = _entries(tmp_path, AuditEvent(AuditKind.RETRIEVE, Outcome.MINOR_FAILURE, user="A<B&C",
                                             destination="DEST", studies=("1.2", "1.3"), count=4,
                                             detail='1 failed "x"\nnext'))
    xml = to_xml(audit_message(entry, "BASTION"))
    assert "\n" not in xml
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage"
    ident = root.find("EventIdentification")
    assert ident is not None and ident.get("EventOutcomeIndicator") == "4" and ident.get("EventActionCode") == "R"
    event_id = ident.find("EventID")
    assert event_id is not None and event_id.get("csd-code") == "110104"
    users = [p.get("UserID") for p in root.findall("ActiveParticipant")]
    assert users == ["A<B&C", "BASTION", "DEST"]
    assert [o.get("ParticipantObjectID") for o in root.findall("ParticipantObjectIdentification")] == ["1.2", "1.3"]
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "BASTION"


def test_syslog_and_jsonl_records(tmp_path: Path) -> None:
    (entry,) = _entries(tmp_path, AuditEvent(AuditKind.VIEW, user="alice", studies=("1.2",), count=1))
    line = syslog_record(entry, "BASTION", "pacs1")
    head, _, msg = line.partition(" - \ufeff")
    assert head == f"<85>1 {entry['time']} pacs1 bastion 1 IHE+RFC-3881"
    assert ET.fromstring(msg).tag == "AuditMessage"
    failed = dict(entry, outcome=8)
    assert syslog_record(failed, "BASTION", "pacs1").startswith("<84>1 ")
    record = json.loads(jsonl_record(entry, "BASTION"))
    assert record["seq"] == 1 and record["hash"] == entry["hash"]
    assert record["message"]["EventIdentification"]["EventID"]["csd-code"] == "110103"
    assert octet_counted("<85>1 é") == b"8 <85>1 \xc3\xa9"


def test_send_over_tls_with_octet_counting(tmp_path: Path) -> None:
    """A real TLS listener on a free port receives the messages framed as RFC 5425 says."""
    cert, key = certificate(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = bytearray()

    def serve() -> None:
        conn, _ = listener.accept()
        with server.wrap_socket(conn, server_side=True) as tls:
            while chunk := tls.recv(65536):
                received.extend(chunk)

    thread = threading.Thread(target=serve)
    thread.start()
    log_dir = tmp_path / "audit"
    found = _entries(log_dir, AuditEvent(AuditKind.VIEW, user="alice"), AuditEvent(AuditKind.QUERY, user="bob"))
    sent = send_tls(f"tls://localhost:{port}", (syslog_record(e, "BASTION", "h") for e in found), cafile=str(cert))
    thread.join(30)
    listener.close()
    assert sent == 2
    messages, rest = [], bytes(received)
    while rest:
        length, _, rest = rest.partition(b" ")
        messages.append(rest[:int(length)].decode())
        rest = rest[int(length):]
    assert len(messages) == 2
    assert all(m.startswith("<85>1 ") and "IHE+RFC-3881" in m for m in messages)
    assert 'UserID="bob"' in messages[1]


def test_send_refuses_a_server_it_cannot_trust(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    cert, key = certificate(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            server.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    with pytest.raises(BastionError, match="certificate"):
        send_tls(f"tls://localhost:{port}", ["x"])  # the system's trust store does not know our certificate
    thread.join(30)
    listener.close()
    with pytest.raises(BastionError, match="tls://HOST:PORT"):
        send_tls("udp://localhost:514", ["x"])


def test_the_forwarder_sends_each_entry_once_from_where_it_stopped(tmp_path: Path) -> None:
    listener = SyslogListener(tmp_path)
    directory = str(tmp_path / "audit")
    try:
        log = AuditLog(directory)
        for i in range(3):
            log.record(AuditEvent(AuditKind.QUERY, user=f"u{i}"))
        log.flush()
        forwarder = AuditForwarder(directory, f"tls://localhost:{listener.port}", "BASTION",
                                   cafile=str(listener.cert))
        assert forwarder.run_once() == 3
        assert forwarder.run_once() == 0  # nothing new: nothing sent, no connection needed
        with open(log_files(directory)[-1], "ab") as fh:
            fh.write(b'{"torn')  # a line being written waits for its end
        log.record(AuditEvent(AuditKind.VIEW, user="late"))
        log.close()
        again = AuditForwarder(directory, f"tls://localhost:{listener.port}", "BASTION", cafile=str(listener.cert))
        assert again.run_once() == 1  # a new forwarder (a restart) goes on from the cursor kept on disk
        assert read_cursor(directory).seq == 4
    finally:
        listener.close()
    procids = [m.split(" ")[4] for m in listener.messages]
    assert procids == ["1", "2", "3", "4"]
    assert 'UserID="late"' in listener.messages[3]


def test_a_failed_round_marks_nothing_sent(tmp_path: Path) -> None:
    directory = str(tmp_path / "audit")
    log = AuditLog(directory)
    log.record(AuditEvent(AuditKind.QUERY))
    log.close()
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    forwarder = AuditForwarder(directory, f"tls://127.0.0.1:{port}", "BASTION", interval=0.05)
    with pytest.raises(BastionError):
        forwarder.run_once()
    assert read_cursor(directory).seq == 0
    forwarder.start()
    forwarder.stop()
    assert forwarder.last_error and forwarder.sent == 0
