"""Several DICOM worker processes share one listening socket and spread associations evenly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import BastionServer
from pynetdicom import AE
from pynetdicom.sop_class import Verification

pytestmark = pytest.mark.timeout(120)


def test_parallel_associations_spread_evenly_over_the_workers(tmp_path: Path) -> None:
    server = BastionServer(tmp_path / "data").start()  # the default: two DICOM worker processes
    ae = AE(ae_title="SPREAD")
    ae.add_requested_context(Verification)
    assocs = []
    try:
        for _ in range(6):  # one after another, as scanners connect: whichever worker wakes first could take all
            assoc = ae.associate(server.host, server.dicom_port, ae_title=server.aet)
            assert assoc.is_established
            assocs.append(assoc)
        deadline = time.monotonic() + 10
        while (stats := server.stats())["associations"] < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats["associations"] == 6, stats
        assert stats["associations_per_worker"] == [3, 3], stats
        for assoc in assocs:
            assert assoc.send_c_echo().Status == 0x0000  # every worker serves what it took
    finally:
        for assoc in assocs:
            assoc.release()
        ae.shutdown()
        server.stop()
    assert "Traceback" not in server.log()
