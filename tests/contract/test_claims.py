"""Claims on the reading list (:mod:`bastion.jobs.claims`), run unchanged on both backends: SQLite in a jobs file of
its own and PostgreSQL (a schema of its own in the test database). Two ``Claims`` on one location stand for two
nodes. Expiry is the database's clock: a claim of a fraction of a second is waited out with a generous deadline."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pgtest import pg_url

from bastion.jobs.claims import Claim, ClaimHeld, Claims
from bastion.jobs.postgresql import PostgresJobs
from bastion.jobs.sql import SqlJobs
from bastion.jobs.sqlite import SqliteJobs

pytestmark = pytest.mark.timeout(60)

#: A claim that runs out while a test waits for it (minutes); one that does not within a test.
SHORT, LONG = 0.005, 30.0
OpenClaims = Callable[[float], Claims]


@pytest.fixture(params=["sqlite", "postgresql"])
def open_(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenClaims]:
    """Opens ``Claims`` (each call: a jobs database connection of its own, as another node would have)."""
    with contextlib.ExitStack() as stack:
        location = stack.enter_context(pg_url()) if request.param == "postgresql" else str(tmp_path / "jobs.sqlite3")
        opened: list[SqlJobs] = []

        def open_claims(minutes: float) -> Claims:
            jobs: SqlJobs = PostgresJobs(location) if request.param == "postgresql" else SqliteJobs(location)
            opened.append(jobs)
            return Claims(jobs, minutes)

        yield open_claims
        for jobs in opened:
            jobs.close()


def test_a_claim_is_held_renewed_seen_and_released(open_: OpenClaims) -> None:
    a, b = open_(LONG), open_(LONG)
    first = a.take("1.2.3", "alice")
    assert first.user == "alice" and first.expires is not None
    with pytest.raises(ClaimHeld) as held:
        b.take("1.2.3", "bob")
    assert held.value.claim.user == "alice" and "alice" in held.value.message
    assert held.value.http_status == 409
    renewed = b.take("1.2.3", "alice")  # the holder renews it from any node
    assert renewed.user == "alice" and renewed.expires is not None and renewed.expires >= first.expires
    seen = b.of(["1.2.3", "9.9.9"])
    assert set(seen) == {"1.2.3"} and seen["1.2.3"].to_json() == {"user": "alice", "expires": renewed.expires_iso()}
    with pytest.raises(ClaimHeld):
        b.release("1.2.3", "bob")
    assert a.release("1.2.3", "alice") is True
    assert a.release("1.2.3", "alice") is False  # nothing left to release
    assert b.of(["1.2.3"]) == {}
    assert b.take("1.2.3", "bob").user == "bob"
    assert a.release("1.2.3", "admin", anyone=True) is True


def test_an_expired_claim_is_none_and_is_taken_over(open_: OpenClaims) -> None:
    short, other = open_(SHORT), open_(LONG)
    short.take("1.2.4", "alice")
    deadline = time.monotonic() + 20
    taken: Claim | None = None
    while taken is None and time.monotonic() < deadline:
        try:
            taken = other.take("1.2.4", "bob")
        except ClaimHeld:
            time.sleep(0.05)
    assert taken is not None and taken.user == "bob", "the expired claim was not taken over"
    with pytest.raises(ClaimHeld):
        short.take("1.2.4", "alice")  # bob's claim is live now
    short.take("1.2.5", "carol")
    deadline = time.monotonic() + 20
    while other.of(["1.2.5"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert other.of(["1.2.5"]) == {}  # expired: read as no claim
    assert short.prune() >= 1 and other.of(["1.2.4"])["1.2.4"].user == "bob"  # the live one is kept


def test_priority_is_kept_with_or_without_a_claim(open_: OpenClaims) -> None:
    a = open_(LONG)
    assert a.set_priority("1.2.6", "stat") == Claim("1.2.6", priority="stat")
    a.take("1.2.6", "alice")
    a.set_priority("1.2.7", "urgent")
    assert a.with_priority("stat") == ["1.2.6"] and a.with_priority("urgent") == ["1.2.7"]
    assert a.release("1.2.6", "alice") is True
    assert a.of(["1.2.6"])["1.2.6"] == Claim("1.2.6", priority="stat")  # the priority outlives the claim
    a.set_priority("1.2.7", "routine")
    assert a.with_priority("urgent") == []
    with pytest.raises(ValueError):
        a.set_priority("1.2.7", "soon")
