"""``bastion serve``: the DICOM listener and the HTTP listener.

The process started runs no server itself: a :class:`Supervisor` (no thread, no database connection) forks
them and replaces any that dies. With ``workers = N > 1`` the DICOM listening socket is shared by N processes,
which spread associations evenly over themselves (:class:`~bastion.dimse.loadboard.LoadBoard`), so parallel
senders use every core. The first also serves HTTP. One more process, at the lowest CPU priority, builds
WADO-RS metadata for new objects from the change log. All processes write the same index (their write
transactions queue on a lock file, see :class:`~bastion.index.sqlite.SqliteIndex`) and the same blob store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from bastion import __version__
from bastion.archive import (
    RUNNING_MARKER,
    SCRUB_FILE,
    Archive,
    RunMarker,
    exclusive,
    node_identity,
    open_blobs,
)
from bastion.audit import AUDIT_DIR
from bastion.audit.chain import read_head
from bastion.audit.events import lifecycle_event
from bastion.audit.forward import AuditForwarder
from bastion.blobs import s3fast
from bastion.blobs.landing import LandingStore, run_mover
from bastion.blobs.repair import MB, Repairer
from bastion.dicomweb.metadata import start_warmer
from bastion.dimse.loadboard import LoadBoard
from bastion.dimse.moves import MoveRunner
from bastion.dimse.server import DicomServer
from bastion.dimse.tls import server_context
from bastion.errors import BastionError
from bastion.forward import open_queue
from bastion.forward.edge import Edge, upstream_holds
from bastion.forward.forwarder import Forwarder, begin_forwarding
from bastion.index.base import is_postgresql
from bastion.ingest.online_rebuild import OnlineRebuild, read_state, switch_in
from bastion.reporting.intake import CHECKPOINT as INTAKE_CHECKPOINT
from bastion.reporting.intake import ReportIntake
from bastion.reporting.seal import ReportKey
from bastion.settings import Settings, load_settings
from bastion.web.app import ServerStatus, create_app
from bastion.web.reporting_outputs import start_hl7
from bastion.web.timeouts import header_deadline_protocol

log = logging.getLogger("bastion")


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the config file, environment and the command's flags."""
    return load_settings(args.config, data=args.data, index=args.index, blobs=args.blobs, node_id=args.node_id,
                         copies_required=getattr(args, "copies_required", None),
                         aet=getattr(args, "aet", None),
                         host=getattr(args, "host", None), dicom_port=getattr(args, "dicom_port", None),
                         http_port=getattr(args, "http_port", None), remotes=getattr(args, "remote", None),
                         log_level=getattr(args, "log_level", None), workers=getattr(args, "workers", None))


def listening_socket(host: str, port: int, what: str) -> socket.socket:
    """A bound, listening socket, made by the supervisor and kept open across process replacements.

    Its connections do not wait for the peer's ACK before sending a small write (``TCP_NODELAY``, which they
    inherit): asyncio sets it only on sockets it made itself (``proto`` IPPROTO_TCP), and uvicorn writes a small
    response's headers and body in two sends, so without it the second waits for the client's delayed ACK on
    every answer after the first on a kept-alive connection.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(256)
    except OSError as exc:
        sock.close()
        raise BastionError(f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def dicom_socket(settings: Settings) -> socket.socket:
    """The bound, listening DICOM socket (shared by every worker)."""
    return listening_socket(settings.host, settings.dicom_port, "DICOM")


def tls_socket(settings: Settings) -> socket.socket | None:
    """The bound, listening DICOM TLS socket (shared by every worker), None without ``tls_port``. The certificate,
    key and CA are loaded once here first, so a file that cannot be used stops ``bastion serve`` with its reason."""
    if not settings.tls_port:
        return None
    server_context(settings)
    return listening_socket(settings.host, settings.tls_port, "DICOM TLS")


async def _until_signal(*extra: asyncio.Future[Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiters = {asyncio.ensure_future(stop.wait()), *extra}
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)


async def _orphaned(parent: int) -> None:
    """Return once the supervisor ``parent`` is gone."""
    while os.getppid() == parent:
        await asyncio.sleep(1)


def start_repair(archive: Archive) -> Repairer:
    """The background repair and scrub of the archive's blob stores' copies (:mod:`bastion.blobs.repair`), started:
    in the primary process only, one per node. Nothing runs with a single blob store."""
    s = archive.settings
    index = archive.index
    return Repairer(archive.blobs, scrub_state=str(s.data / SCRUB_FILE),
                    scrub_rate=None if s.scrub_rate is None else s.scrub_rate * MB, scrub_days=s.scrub_days,
                    reconcile_s=s.repair_interval, indexed_keys=lambda: (v.blob_key for v in index.versions()),
                    is_indexed=index.has_blob, stored_bytes=lambda: index.statistics().stored_bytes).start()


async def start_forwarder(archive: Archive) -> tuple[Forwarder | None, Edge | None]:
    """The node's forwarder (:mod:`bastion.forward`), started when ``[[forward]]`` rules are configured, and on an
    edge (``upstream``) its edge mode (:mod:`bastion.forward.edge`): in the primary process only, one per node.
    With an index shared by several nodes, each forwards what it stored."""
    if not archive.settings.forward:
        return None, None
    shared = is_postgresql(archive.settings.index_location)
    forwarder = Forwarder(archive, node_id=archive.node_id if shared else None)
    edge = await Edge(archive, forwarder).start() if archive.settings.upstream_rule else None
    return await forwarder.start(), edge


def online_rebuild(archive: Archive, supervisor: int) -> OnlineRebuild | None:
    """The online rebuild of the archive's index (:mod:`bastion.ingest.online_rebuild`), whose new index the
    ``supervisor`` switches in when SIGUSR1 asks it (:meth:`Supervisor.run`): in the primary process only. None for
    a PostgreSQL index (it is rebuilt offline only, for now)."""
    if is_postgresql(archive.settings.index_location):
        return None
    return OnlineRebuild(archive.blobs, archive.index, archive.settings.data,
                         ask_switch=lambda: os.kill(supervisor, signal.SIGUSR1))


def switch_index(settings: Settings, began: float | None = None) -> None:
    """The switch of an online rebuild (:func:`bastion.ingest.online_rebuild.switch_in`), while no server process
    runs: in a one-shot process of the supervisor's, or before it forks. ``began``: when the stop began."""
    blobs = open_blobs(settings)
    try:
        state = switch_in(blobs, settings.index_location, settings.data, began=began)
    finally:
        blobs.close()
    if state.state == "done":
        log.info("the rebuilt index is switched in (%d stored object(s) caught up)", state.report.get("caught_up", 0))


async def _when_serving(http: uvicorn.Server, rebuild: OnlineRebuild) -> None:
    while not http.started:
        await asyncio.sleep(0.01)
    await asyncio.to_thread(rebuild.serving)


async def serve(settings: Settings, sock: socket.socket, http_sock: socket.socket, board: LoadBoard,
                parent: int, tls_sock: socket.socket | None = None) -> None:
    """The primary process (worker 0): DICOM and HTTP until SIGINT/SIGTERM or its supervisor is gone; it alone runs
    the repair and scrub of the blob stores' copies, the forwarder and an online rebuild of the index."""
    archive = Archive.open(settings)
    repairer = start_repair(archive)
    status = ServerStatus()
    status.index_rebuild = online_rebuild(archive, parent)
    dicom = DicomServer(archive, board=board, worker=0, upstream_holds=upstream_holds(archive))
    await dicom.start(settings.host, settings.dicom_port, sock=sock, tls_sock=tls_sock)
    runner = MoveRunner(dicom.services.moves)  # the node's one runner of C-MOVE jobs whose lease ran out
    runner.start()
    forwarder, edge = await start_forwarder(archive)
    hl7 = await start_hl7(archive)  # signed reports as HL7 ORU^R01 to hl7_receivers
    key = ReportKey(archive.blobs, settings.report_key_file)
    intake = ReportIntake(archive.blobs, archive.index, key, settings.data / INTAKE_CHECKPOINT,  # SRs' reports
                          on_kept=None if hl7 is None else hl7.consider).start()
    status.dicom_listening = True
    status.dicom_address = f"{settings.host}:{settings.dicom_port}"
    status.per_worker = board.counts  # type: ignore[method-assign]
    status.worker_pids = board.pids  # type: ignore[method-assign]
    config = uvicorn.Config(create_app(archive, status), host=settings.host, port=settings.http_port,
                            log_level="warning", access_log=False, lifespan="off",
                            # The client's address is the TCP peer's (the failure limit, the audit log):
                            # uvicorn would otherwise take X-Forwarded-For from any local sender, forgeable
                            # through a same-host TCP proxy or by any local process.
                            proxy_headers=False,
                            http=header_deadline_protocol(settings.http_header_timeout))
    http = uvicorn.Server(config)
    http.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    http_task = asyncio.ensure_future(http.serve(sockets=[http_sock]))
    serving = (None if status.index_rebuild is None
               else asyncio.ensure_future(_when_serving(http, status.index_rebuild)))
    log.info("Bastion %s: node %s, DICOM %s@%s:%d (%d worker(s)), HTTP http://%s:%d, data %s", __version__,
             archive.node_id, settings.aet, settings.host, settings.dicom_port, settings.workers, settings.host,
             settings.http_port, settings.data)
    if settings.tls_port:
        log.info("DICOM TLS %s:%d (TLS 1.2+, BCP 195), client certificates %s", settings.host, settings.tls_port,
                 f"required (CA {settings.tls_ca})" if settings.tls_ca else "not asked for")
    log.info("DICOM access: %d known peer(s), unknown calling AE titles %s", len(settings.dimse_peers),
             "allowed" if settings.allows_unknown_peers else "rejected")
    if settings.auth_enabled:
        log.info("HTTP access: authentication on (issuer %s), every route checked", settings.auth_issuer)
    elif settings.host in ("127.0.0.1", "::1", "localhost"):
        log.info("HTTP access: authentication off (listening on %s only)", settings.host)
    else:
        log.warning("HTTP access: authentication off while listening on %s: anyone who can reach port %d can read, "
                    "store and delete; set [auth] enabled = true (docs/authentication.md)", settings.host,
                    settings.http_port)
    parts = archive.capabilities()
    if parts.header_scan == "python":
        log.warning("the compiled header scan is not loaded (BASTION_PURE_PYTHON set, or no C compiler at "
                    "install): storing runs its Python twin, about 40 % more CPU per object")
    if parts.blob_write == "python":
        log.warning("the compiled file write is not loaded (BASTION_PURE_PYTHON set, or no C compiler at "
                    "install): objects of 128 KB and more are written in Python, about 10 % slower")
    if parts.index_record == "python":
        log.warning("the compiled index record is not loaded (BASTION_PURE_PYTHON set, or no C compiler or "
                    "SQLite headers (libsqlite3-dev) at install): the index records in Python, more CPU per object")
    archive.audit.record(lifecycle_event(True, settings.aet, f"Bastion {__version__}, node {archive.node_id}"))
    audit_forwarder = (AuditForwarder(str(settings.data / AUDIT_DIR), settings.audit_forward, settings.aet,
                                      cafile=settings.audit_forward_ca, interval=settings.audit_forward_interval)
                       if settings.audit_forward else None)
    if audit_forwarder is not None:
        audit_forwarder.start()
    await _until_signal(http_task, asyncio.ensure_future(_orphaned(parent)))
    log.info("shutting down")
    http.should_exit = True
    await dicom.close()
    await runner.stop()
    if forwarder is not None:
        await forwarder.stop()
    if edge is not None:
        await edge.stop()
    if hl7 is not None:
        await hl7.stop()
    await http_task
    await asyncio.to_thread(repairer.stop)
    await asyncio.to_thread(intake.stop)
    if serving is not None:
        serving.cancel()
    if status.index_rebuild is not None:
        await asyncio.to_thread(status.index_rebuild.stop)
    archive.audit.record(lifecycle_event(False, settings.aet, f"Bastion {__version__}, node {archive.node_id}"))
    archive.close()
    if audit_forwarder is not None:  # after the close, which writes the last events (the stop among them)
        await asyncio.to_thread(audit_forwarder.stop)
    head = read_head(str(settings.data / AUDIT_DIR))
    if head is not None:  # the anchor, also where the log goes (journald, syslog): a second copy off the data directory
        log.info("audit log at stop: seq %d, hash %s", head["seq"], head["hash"])


async def serve_worker(settings: Settings, sock: socket.socket, parent: int, board: LoadBoard, worker: int,
                       tls_sock: socket.socket | None = None) -> None:
    """An extra DICOM worker process: no HTTP, exits with its parent."""
    archive = Archive.open(settings, primary=False)
    dicom = DicomServer(archive, board=board, worker=worker, upstream_holds=upstream_holds(archive))
    await dicom.start(settings.host, settings.dicom_port, sock=sock, tls_sock=tls_sock)
    await _until_signal(asyncio.ensure_future(_orphaned(parent)))
    await dicom.close()
    archive.close()


def run_warmer(settings: Settings, parent: int) -> None:
    """The background process: the metadata warmer, which follows the change log, and where the blob store has
    the landing (:attr:`Settings.has_landing`) the landing mover (:func:`bastion.blobs.landing.run_mover`), at the
    lowest CPU priority.

    Building WADO-RS metadata parses whole headers; in its own niced process it never holds
    the GIL of, nor competes on equal terms with, the processes answering C-STORE; while objects keep
    arriving it takes at most a bounded share of one CPU (:class:`MetadataWarmer`).
    """
    os.nice(19)
    archive = Archive.open(settings, primary=False)
    shared = is_postgresql(settings.index_location)  # other nodes may share it: each warms what it stored
    warmer = start_warmer(archive.index, archive.retriever, settings.data, archive.node_id if shared else None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    mover = None
    if isinstance(landing := archive.blobs.stores[0], LandingStore):
        mover = threading.Thread(target=run_mover, args=(landing, stop, settings.landing_delay_s),
                                 name="bastion-landing-mover", daemon=True)
        mover.start()
    while not stop.is_set() and os.getppid() == parent:
        stop.wait(0.5)
    stop.set()
    if mover is not None:
        mover.join(10)
    warmer.stop()
    archive.close()


def _fork(target: Any, *args: Any, close: tuple[int, ...] = ()) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())  # the supervisor blocks these for sigtimedwait
            for fd in close:
                os.close(fd)
            target(*args)
        except BaseException:
            log.exception("%s failed", getattr(target, "__name__", "child process"))
            code = 1
        os._exit(code)
    return pid


def _ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"was killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"was killed by signal {sig}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """The process ``bastion serve`` starts in: it forks the server's processes and replaces any that dies.

    It holds no thread, no database connection and no event loop, so forking from it is safe whenever it
    happens. A process that dies (a crash, the kernel's OOM killer, ``kill -9``) is replaced at once; one that
    keeps dying waits longer each time (:data:`RESTART_DELAYS_S`). The listening socket stays open here the
    whole time, so the port never closes and the other workers keep serving meanwhile. A replacement opens
    the archive as every process does: the blob journal of the dead process is replayed then (its acknowledged
    objects are made durable), and crash recovery does not run because this process keeps the run marker
    held. SIGINT/SIGTERM stop every process and wait for them.

    SIGUSR1 from one of its processes (the primary, once an online rebuild has built a new index) switches the
    index if ``switch_wanted()`` says so: every process is stopped as on shutdown, a one-shot process runs
    ``switch`` (given when the stop began), and every role is started again. The listening sockets stay open here, so connections made meanwhile wait in the
    backlog until the new processes accept them.
    """

    #: Wait before a role's replacement, by how many times it died in the last minute.
    RESTART_DELAYS_S = (0.0, 0.0, 1.0, 5.0, 30.0)
    #: How long the processes get to finish their associations on shutdown before they are killed.
    STOP_GRACE_S = 30.0

    def __init__(self, roles: dict[str, tuple[Any, tuple[Any, ...]]], close_in_children: tuple[int, ...] = (),
                 switch: Callable[[float], None] | None = None,
                 switch_wanted: Callable[[], bool] = lambda: False) -> None:
        self.roles = roles  # name -> (target, args), forked with _fork
        self.close_in_children = close_in_children
        self.switch = switch
        self.switch_wanted = switch_wanted
        self.pids: dict[int, str] = {}
        self.deaths: dict[str, list[float]] = {}
        self.due: dict[str, float] = {}  # role -> when its replacement starts

    def _start(self, role: str) -> None:
        target, args = self.roles[role]
        self.pids[_fork(target, *args, close=self.close_in_children)] = role

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            role = self.pids.pop(pid, None)
            if role is None:
                continue
            now = time.monotonic()
            recent = [at for at in self.deaths.get(role, []) if now - at < 60.0] + [now]
            self.deaths[role] = recent
            delay = self.RESTART_DELAYS_S[min(len(recent), len(self.RESTART_DELAYS_S)) - 1]
            log.error("%s (pid %d) %s; %s", role, pid, _ended(status),
                      f"starting a new one in {delay:.0f} s" if delay else "starting a new one")
            self.due[role] = now + delay

    def run(self) -> None:
        """Start every role, keep them running until SIGINT/SIGTERM, then stop them."""
        wanted = {signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}
        signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
        try:
            for role in self.roles:
                self._start(role)
            while True:
                now = time.monotonic()
                for role, at in list(self.due.items()):
                    if at <= now:
                        del self.due[role]
                        self._start(role)
                timeout = max(0.0, min(self.due.values()) - now) if self.due else 60.0
                info = signal.sigtimedwait(wanted, timeout)
                if info is not None and info.si_signo in (signal.SIGINT, signal.SIGTERM):
                    break
                if info is not None and info.si_signo == signal.SIGUSR1 and info.si_pid in self.pids:
                    self._switch()
                self._reap()
        finally:
            self._stop()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)

    def _switch(self) -> None:
        """Stop every process, run ``switch`` in a one-shot process and wait for it, start every role again."""
        if self.switch is None or not self.switch_wanted():
            log.warning("SIGUSR1, but no rebuilt index waits to be switched in: ignored")
            return
        began = time.time()
        log.info("switching the rebuilt index in: stopping every process")
        self._stop()
        self.due.clear()
        stopped = time.time()
        pid = _fork(self.switch, began, close=self.close_in_children)
        _, status = os.waitpid(pid, 0)
        if status:
            log.error("switching the index %s: the live index stays", _ended(status))
        for role in self.roles:
            self._start(role)
        log.info("every process started again %.2f s after the stop began (stopped in %.2f s, switched in %.2f s)",
                 time.time() - began, stopped - began, time.time() - stopped)

    def _stop(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.STOP_GRACE_S
        while self.pids and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.05)
            else:
                self.pids.pop(pid, None)
        for pid in self.pids:
            log.error("pid %d did not stop within %.0f s: killing it", pid, self.STOP_GRACE_S)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in list(self.pids):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def run_serve(args: argparse.Namespace) -> int:
    """Entry point of ``bastion serve``."""
    settings = settings_from(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    s3fast.hold_off()  # this process forks the servers: its own S3 requests go through boto3, theirs through obstore
    if read_state(settings.data).state == "switching":  # a crash cut an online rebuild's switch short: finish it
        try:
            with exclusive(settings.data):
                switch_index(settings)
        except BastionError as exc:
            log.warning("an online rebuild of the index was cut short while it was switched in, and cannot be "
                        "finished now: %s", exc)
    # Recover from an unclean shutdown before forking, so every process starts on a consistent index.
    archive = Archive.open(settings)
    try:
        if settings.forward:  # the forwarder's first cursor, before any process accepts a store
            with contextlib.closing(open_queue(settings)) as queue:
                begin_forwarding(queue, archive.index)
    finally:
        archive.close()
    # Held for the whole run: no process started later (a replaced worker, `bastion import`) is ever alone, so
    # none runs crash recovery beside live ones; the last process to close still marks the shutdown clean.
    marker = RunMarker(str(settings.data / RUNNING_MARKER), node_identity(settings))
    marker.acquire()
    try:
        sock = dicom_socket(settings)
        tls_sock = tls_socket(settings)
        http_sock = listening_socket(settings.host, settings.http_port, "HTTP")
    except BastionError:
        marker.release()
        raise
    parent = os.getpid()
    board = LoadBoard(settings.workers, peers=settings.max_associations)
    roles: dict[str, tuple[Any, tuple[Any, ...]]] = {
        "DICOM worker 0 (and HTTP)": (lambda: asyncio.run(serve(settings, sock, http_sock, board, parent, tls_sock)),
                                      ())}
    for w in range(1, settings.workers):
        roles[f"DICOM worker {w}"] = (lambda w=w: asyncio.run(serve_worker(settings, sock, parent, board, w, tls_sock)),
                                      ())
    roles["metadata warmer"] = (run_warmer, (settings, parent))
    try:
        Supervisor(roles, close_in_children=(marker.fd,), switch=lambda began: switch_index(settings, began),
                   switch_wanted=lambda: read_state(settings.data).state == "switching").run()
    finally:
        marker.release()
    return 0
