"""The HL7 sender of a node: finds the signed report versions not yet queued for each receiver, queues their ORU^R01
(:mod:`bastion.reporting.hl7`) in the outbox (:mod:`bastion.reporting.hl7_outbox`) and sends each receiver's
messages over MLLP (:mod:`bastion.reporting.mllp`), retrying with a capped exponential backoff.

**Derived, so nothing is lost.** What to send is derived from the reports themselves, not from a call made when a
report is signed: every :data:`SCAN_S` the sender reads the reports changed since its last look (the index's
``reports`` table, newest change first, less :data:`MARGIN_S` for clocks and commits) and queues each version of
their ``history`` that is signed (``final`` or ``amended``), was signed after the receiver was configured
(:meth:`~bastion.reporting.hl7_outbox.Outbox.since`), and is not in the outbox for that receiver yet. At start and
every :data:`DEEP_S` it looks back :data:`LOOKBACK_DAYS`. A node that stops (or crashes) between a signature and its
message finds the signed version at its next start; a version is queued once per receiver however many nodes look
(the outbox's key).

**Sending.** One task per receiver claims the receiver's oldest pending message (leased: no two nodes send one
message at once, and messages of a receiver keep their order), sends it and waits for the ACK: ``AA``/``CA``
delivers it; anything else is retried after ``hl7_backoff`` seconds, twice as long after each further failure, at
most ``hl7_backoff_max``, until ``hl7_max_attempts``, when it becomes a dead letter (``GET /api/hl7``,
``POST /api/hl7/retry``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from bastion.blobs.base import BlobStore
from bastion.blobs.reportlog import ReportLog
from bastion.errors import BastionError
from bastion.index.base import Index
from bastion.index.reports import ReportQuery
from bastion.reporting import hl7, mllp
from bastion.reporting.hl7_outbox import Message, Outbox
from bastion.reporting.report import SIGNED, now_iso
from bastion.settings import Settings

log = logging.getLogger("bastion.reporting.hl7")

#: How often the reports are read for new signed versions, and a receiver's queue when it had nothing due.
SCAN_S = 1.0
IDLE_S = 0.5
#: A look covers the changes since the last one began, less this many seconds.
MARGIN_S = 60.0
#: At start and every :data:`DEEP_S`, the reports changed in the last this many days are looked at (fewer than the
#: outbox keeps delivered messages): reports whose change is older than its arrival here (from an edge, by the
#: report intake; a rebuilt index; another node's late clock).
LOOKBACK_DAYS = 7.0
DEEP_S = 600.0
#: Reports read at once while looking.
PAGE = 50
#: How often delivered messages past their keeping are deleted.
PRUNE_S = 3600.0

#: The study's attributes by DICOM keyword (PatientBirthDate, PatientSex, ...) for a Study Instance UID.
StudyFacts = Callable[[str], dict[str, str]]


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Hl7Sender:
    """Queues and sends the ORU^R01 messages of signed reports to ``settings.hl7_receivers`` (see the module
    docstring). Run one per node; several nodes sharing a PostgreSQL index share its outbox."""

    def __init__(self, settings: Settings, index: Index, blobs: BlobStore, outbox: Outbox, facts: StudyFacts) -> None:
        self.settings = settings
        self.index = index
        self.log = ReportLog(blobs)
        self.outbox = outbox
        self.facts = facts
        self.parties = hl7.Parties(settings.hl7_sending_application, settings.hl7_sending_facility,
                                   settings.hl7_receiving_application, settings.hl7_receiving_facility)
        self.receivers = settings.hl7_receivers
        self._since: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> Hl7Sender:
        first = now_iso()
        for receiver in self.receivers:
            self._since[receiver] = await asyncio.to_thread(self.outbox.since, receiver, first)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._scan_loop()),
                       *(loop.create_task(self._send_loop(r)) for r in self.receivers)]
        log.info("HL7: ORU^R01 of signed reports to %s", ", ".join(self.receivers))
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.outbox.close()

    # -- finding what to send

    def scan(self, changed_since: str, deep: bool = False) -> int:
        """Queue the signed versions of the reports changed at or after ``changed_since`` (ISO 8601) that are not
        queued yet for a receiver; how many messages were added. ``deep``: read what the outbox holds at once
        (a look over many reports), else report by report."""
        added, offset = 0, 0
        facts: dict[str, dict[str, str]] = {}
        everything = self.outbox.every_known() if deep else None

        def known(report_id: str) -> set[tuple[str, int]]:
            if everything is None:
                return self.outbox.known(report_id)
            return {(r, v) for r, i, v in everything if i == report_id}

        while True:
            rows = self.index.reports(ReportQuery(limit=PAGE, offset=offset))
            for row in rows:
                if row.updated < changed_since:
                    return added
                added += self._queue_versions(row.document(), facts, known)
            if len(rows) < PAGE:
                return added
            offset += PAGE

    def consider(self, doc: dict[str, Any]) -> int:
        """Queue the signed versions of report ``doc`` not queued yet (the intake calls it for a report that came
        with its SR, from an edge: changed long before this node's last look); how many messages were added."""
        if len(self._since) < len(self.receivers):
            return 0  # not started yet: its first look will see the report
        return self._queue_versions(doc, {}, self.outbox.known)

    def _queue_versions(self, doc: dict[str, Any], facts: dict[str, dict[str, str]],
                        known_of: Callable[[str], set[tuple[str, int]]]) -> int:
        signed = [h for h in doc.get("history", []) if h.get("state") in SIGNED]
        wanted = [(r, int(h["version"])) for h in signed for r in self.receivers if str(h.get("at", "")) >= self._since[r]]
        if not wanted:
            return 0
        known = known_of(str(doc["id"]))
        added = 0
        for receiver, version in wanted:
            if (receiver, version) in known:
                continue
            kept = doc if version == doc["version"] else self.log.read(str(doc["id"]), version)
            study = str(doc.get("study", ""))
            if study not in facts:
                try:
                    facts[study] = self.facts(study)
                except BastionError:  # the study is gone: the report's own fields stand
                    facts[study] = {}
            message = hl7.oru_r01(kept, facts[study], self.parties, now_iso())
            if self.outbox.add(receiver, str(doc["id"]), version, hl7.control_id(str(doc["id"]), version), message):
                added += 1
                log.info("HL7: report %s version %d queued for %s", doc["id"], version, receiver)
        return added

    async def _scan_loop(self) -> None:
        loop = asyncio.get_running_loop()
        since, deep_at, pruned = "", loop.time(), loop.time()
        while True:
            began = datetime.now(UTC)
            deep = not since or loop.time() - deep_at > DEEP_S
            try:
                await asyncio.to_thread(self.scan, _iso(began - timedelta(days=LOOKBACK_DAYS)) if deep else since,
                                        deep)
                since = _iso(began - timedelta(seconds=MARGIN_S))
                deep_at = loop.time() if deep else deep_at
                if loop.time() - pruned > PRUNE_S:
                    await asyncio.to_thread(self.outbox.prune)
                    pruned = loop.time()
            except BastionError as exc:  # the index or the outbox failing: look again (from the same time)
                log.warning("HL7: looking for signed reports failed: %s", exc.message)
            except Exception:
                log.exception("HL7: looking for signed reports failed; trying again")
            await asyncio.sleep(SCAN_S)

    # -- sending

    def delay(self, attempts: int) -> float:
        """Seconds before the next attempt of a message that failed ``attempts`` times (1, 2, ...)."""
        s = self.settings
        return float(min(s.hl7_backoff_max, s.hl7_backoff * 2.0 ** min(attempts - 1, 40)))

    async def _send_loop(self, receiver: str) -> None:
        lease_s = self.settings.hl7_timeout + 60.0
        while True:
            try:
                message = await asyncio.to_thread(self.outbox.claim, receiver, lease_s)
                if message is None:
                    await asyncio.sleep(IDLE_S)
                    continue
                await self._send(message)
            except BastionError as exc:
                log.warning("HL7 to %s: %s", receiver, exc.message)
                await asyncio.sleep(IDLE_S)
            except Exception:
                log.exception("HL7 to %s failed; trying again", receiver)
                await asyncio.sleep(IDLE_S)

    async def _send(self, message: Message) -> None:
        try:
            code = await mllp.send(message.receiver, message.message, message.control_id, self.settings.hl7_timeout)
        except mllp.MllpError as exc:
            attempts = message.attempts + 1
            state = await asyncio.to_thread(self.outbox.failed, message, exc.message, self.delay(attempts),
                                            self.settings.hl7_max_attempts)
            if state == "dead":
                log.error("HL7: report %s version %d not delivered to %s after %d attempts, a dead letter: %s",
                          message.report_id, message.version, message.receiver, attempts, exc.message)
            else:
                log.warning("HL7: report %s version %d not delivered to %s (attempt %d): %s", message.report_id,
                            message.version, message.receiver, attempts, exc.message)
            return
        except asyncio.CancelledError:
            with contextlib.suppress(BastionError):
                await asyncio.shield(asyncio.to_thread(self.outbox.release, message))
            raise
        await asyncio.to_thread(self.outbox.delivered, message)
        log.info("HL7: report %s version %d delivered to %s (%s)", message.report_id, message.version,
                 message.receiver, code)
