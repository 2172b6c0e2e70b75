"""WADO-RS retrieve bodies (PS3.18 10.4.1.1.1) are streamed in bounded pieces that add up to one multipart body."""

from __future__ import annotations

import io
from typing import BinaryIO, cast

from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.dicomweb import wado
from bastion.dicomweb.multipart import encode_multipart, parse_multipart
from bastion.model.records import InstanceRecord
from bastion.query.retrieve import Retriever

STORED = "1.2.840.10008.1.2.1"
CONVERTED = "1.2.840.10008.1.2"


class FakeRetriever:
    """Blobs in memory; a "conversion" that marks the bytes so a test can tell it happened."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    def open(self, record: InstanceRecord) -> BinaryIO:
        return io.BytesIO(self.blobs[record.blob_key])

    def part10_bytes(self, record: InstanceRecord, transfer_syntax: str) -> bytes:
        return b"converted:" + self.blobs[record.blob_key]


def _record(i: int, size: int) -> InstanceRecord:
    return InstanceRecord(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.7", "1.2.3", "1.2", STORED, f"k{i}", "0" * 64, size)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=1500), min_size=1, max_size=8),
       batch=st.integers(min_value=1, max_value=700),
       recorded_size_error=st.integers(min_value=-400, max_value=400),
       converted=st.lists(st.booleans(), min_size=8, max_size=8))
def test_pieces_add_up_to_the_multipart_body(sizes: list[int], batch: int, recorded_size_error: int,
                                             converted: list[bool]) -> None:
    blobs = {f"k{i}": bytes([i + 1]) * n for i, n in enumerate(sizes)}
    # The index's sizes only size the buffers: a wrong one must not change the body.
    records = [_record(i, max(0, n + recorded_size_error)) for i, n in enumerate(sizes)]
    plan = [wado.Planned(r, CONVERTED if converted[i] else STORED) for i, r in enumerate(records)]
    retriever = FakeRetriever(blobs)
    original, wado.BATCH = wado.BATCH, batch
    try:
        pieces = list(wado.stream_instances(cast(Retriever, retriever), plan, "b0undary"))
    finally:
        wado.BATCH = original

    expected_parts = [(f"application/dicom; transfer-syntax={p.transfer_syntax}",
                       retriever.part10_bytes(p.record, CONVERTED) if converted[i] else blobs[p.record.blob_key])
                      for i, p in enumerate(plan)]
    body = b"".join(bytes(p) for p in pieces)
    assert body == encode_multipart(expected_parts, "b0undary")
    assert [p.body for p in parse_multipart(body, "b0undary")] == [c for _, c in expected_parts]
    for piece in pieces:
        if not bytes(piece).startswith(b"converted:"):
            assert len(piece) <= max(batch, wado._PART_OVERHEAD)


def test_a_small_instance_is_one_small_piece() -> None:
    retriever = FakeRetriever({"k0": b"x" * 1000})
    pieces = list(wado.stream_instances(cast(Retriever, retriever), [wado.Planned(_record(0, 1000), STORED)], "b"))
    assert len(pieces) == 1
    assert len(pieces[0]) < 1000 + 2 * wado._PART_OVERHEAD

