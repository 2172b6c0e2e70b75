"""The PostgreSQL index when its database goes away: a commit whose outcome is unknown keeps its object, and a
primary that fails over to its synchronous replica loses no acknowledged instance (issue 21, item 5). Real
PostgreSQL clusters (``pgcluster``), real DCMTK, real S3."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from backends import remote_locations
from conftest import BastionServer, make_study, requires_dcmtk, run_dcmtk
from pgcluster import pg_cluster
from pgtest import admin, pg_url

from bastion.archive import Archive
from bastion.errors import CommitOutcomeUnknown
from bastion.settings import load_settings

pytestmark = pytest.mark.timeout(300)


def test_a_commit_cut_off_by_a_lost_connection_keeps_its_object(tmp_path: Path) -> None:
    """The database ends the connection while the record commits (a deferred trigger makes the commit wait, and
    the test ends the connection then): the store fails with CommitOutcomeUnknown, and the object stays, since the
    index might hold it. Here it does not: it is stored but not indexed, which `bastion verify` reports."""
    study = make_study(tmp_path / "study", series=1, per_series=2)
    with pg_url() as url:
        settings = load_settings(None, env={}, data=tmp_path / "data", index=url)
        archive = Archive.open(settings)
        try:
            archive.ingest.store_bytes(study.files[0].read_bytes(), "test")
            schema = url.rsplit("bastion_schema=", 1)[1]
            with admin() as conn:
                conn.execute(f'SET search_path TO "{schema}"')
                conn.execute("CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
                             "$$ BEGIN PERFORM pg_sleep(30); RETURN NULL; END $$")
                conn.execute("CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON instances "
                             "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()")
            failure: list[BaseException] = []

            def store() -> None:
                try:
                    archive.ingest.store_bytes(study.files[1].read_bytes(), "test")
                except BaseException as exc:  # noqa: BLE001 - what the store raised is what the test checks
                    failure.append(exc)

            storing = threading.Thread(target=store)
            storing.start()
            with admin() as conn:  # the commit waits in the trigger: end its connection there
                deadline = time.monotonic() + 60
                ended = False
                while not ended and time.monotonic() < deadline:
                    row = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                       "query LIKE 'COMMIT%%' AND wait_event = 'PgSleep'").fetchone()
                    ended = bool(row and row[0])
                    time.sleep(0.05)
            storing.join(60)
            assert ended, "the commit never waited in the trigger"
            assert len(failure) == 1 and isinstance(failure[0], CommitOutcomeUnknown), failure
            keys = list(archive.blobs.keys())
            assert len(keys) == 2, "the object of the store whose outcome is unknown was removed"
            assert archive.index.statistics().instances == 1  # the cut-off commit did not happen
        finally:
            archive.close()


@requires_dcmtk
def test_stores_resume_after_the_primary_fails_over_and_no_acknowledged_instance_is_lost(
        tmp_path: Path, bastion_factory: Any) -> None:
    """A primary with a synchronous replica; the node names both in a libpq multi-host URL. Stores run one
    association at a time while the primary is stopped hard and the replica promoted: the stores in between fail
    (0xA702, out of resources), then succeed again against the new primary, and every instance acknowledged before,
    during and after is in the index."""
    study = make_study(tmp_path / "study", series=4, per_series=15)
    files = study.files
    with pg_cluster() as cluster:
        blobs = remote_locations(tmp_path / "shared")["blobs"]
        server: BastionServer = bastion_factory(tmp_path / "node", settings={
            "BASTION_INDEX": cluster.url, "BASTION_BLOBS": blobs})
        acknowledged: list[str] = []
        acknowledged_at: list[float] = []
        failures: list[float] = []
        stop = threading.Event()

        def send() -> None:
            for f in files:
                while not stop.is_set():
                    sent = run_dcmtk("storescu", *server.addr(), f, timeout=60)
                    if sent.returncode == 0:
                        acknowledged.append(str(f))
                        acknowledged_at.append(time.monotonic())
                        break
                    failures.append(time.monotonic())
                    time.sleep(0.2)  # as a modality retries

        sender = threading.Thread(target=send)
        sender.start()
        try:
            deadline = time.monotonic() + 60
            while len(acknowledged) < 15 and time.monotonic() < deadline:
                time.sleep(0.05)
            started = time.monotonic()
            cluster.fail_over()
            sender.join(240)
        finally:
            stop.set()
            sender.join(30)
        assert acknowledged == [str(f) for f in files], "some instance was never acknowledged"
        instances = server.get_json(f"/dicom-web/studies/{study.study_uid}/instances")
        assert {i["00080018"]["Value"][0] for i in instances} == set(study.sop_uids)
        resumed = min(t for t in acknowledged_at if t > started) - started  # a figure, not a test (BENCHMARKS.md)
        print(f"\nfirst store acknowledged {resumed:.1f} s after the fail-over began; "
              f"{sum(t > started for t in failures)} store(s) refused meanwhile")
