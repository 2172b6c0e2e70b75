"""``bastion serve``: the DICOM listener and the HTTP listener.

With ``workers = N > 1`` the DICOM listening socket is shared by N processes (forked before
any thread or database connection exists), which spread associations evenly over themselves
(:class:`~bastion.dimse.server.LoadBoard`), so parallel senders use every core. The first process
also serves HTTP. One more process, at the lowest CPU priority, builds WADO-RS metadata for new
objects from the change log. All processes write the same index (their write transactions queue
on a lock file, see :class:`~bastion.index.sqlite.SqliteIndex`) and the same blob store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any

import uvicorn

from bastion import __version__
from bastion.archive import Archive
from bastion.dicomweb.metadata import start_warmer
from bastion.dimse.server import DicomServer, LoadBoard
from bastion.settings import Settings, load_settings
from bastion.web.app import ServerStatus, create_app

log = logging.getLogger("bastion")


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the config file, environment and the command's flags."""
    return load_settings(args.config, data=args.data, aet=getattr(args, "aet", None),
                         host=getattr(args, "host", None), dicom_port=getattr(args, "dicom_port", None),
                         http_port=getattr(args, "http_port", None), remotes=getattr(args, "remote", None),
                         log_level=getattr(args, "log_level", None), workers=getattr(args, "workers", None))


def dicom_socket(settings: Settings) -> socket.socket:
    """The bound, listening DICOM socket (shared by every worker)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.dicom_port))
    sock.listen(256)
    sock.setblocking(False)
    return sock


async def _until_signal(extra: asyncio.Future[None] | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiters = {asyncio.ensure_future(stop.wait())} | ({extra} if extra else set())
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)


async def serve(settings: Settings, sock: socket.socket, board: LoadBoard) -> None:
    """The primary process (worker 0): DICOM and HTTP until SIGINT/SIGTERM."""
    archive = Archive.open(settings)
    status = ServerStatus()
    dicom = DicomServer(archive, board=board, worker=0)
    await dicom.start(settings.host, settings.dicom_port, sock=sock)
    status.dicom_listening = True
    status.dicom_address = f"{settings.host}:{settings.dicom_port}"
    status.per_worker = board.counts  # type: ignore[method-assign]
    config = uvicorn.Config(create_app(archive, status), host=settings.host, port=settings.http_port,
                            log_level="warning", access_log=False, lifespan="off")
    http = uvicorn.Server(config)
    http.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    http_task = asyncio.ensure_future(http.serve())
    log.info("Bastion %s: DICOM %s@%s:%d (%d worker(s)), HTTP http://%s:%d, data %s", __version__, settings.aet,
             settings.host, settings.dicom_port, settings.workers, settings.host, settings.http_port,
             settings.data)
    await _until_signal(http_task)
    log.info("shutting down")
    http.should_exit = True
    await dicom.close()
    await http_task
    archive.close()


async def serve_worker(settings: Settings, sock: socket.socket, parent: int, board: LoadBoard, worker: int) -> None:
    """An extra DICOM worker process: no HTTP, exits with its parent."""
    archive = Archive.open(settings, primary=False)
    dicom = DicomServer(archive, board=board, worker=worker)
    await dicom.start(settings.host, settings.dicom_port, sock=sock)

    async def orphaned() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(1)

    await _until_signal(asyncio.ensure_future(orphaned()))
    await dicom.close()
    archive.close()


def run_warmer(settings: Settings, parent: int) -> None:
    """The metadata warmer process: follows the change log at the lowest CPU priority.

    Building WADO-RS metadata parses whole headers; in its own niced process it never holds
    the GIL of, nor competes on equal terms with, the processes answering C-STORE.
    """
    os.nice(19)
    archive = Archive.open(settings, primary=False)
    warmer = start_warmer(archive.index, archive.retriever, settings.data)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    while not stop["now"] and os.getppid() == parent:
        time.sleep(0.5)
    warmer.stop()
    archive.close()


def _fork(target: Any, *args: Any) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            target(*args)
        except BaseException:
            log.exception("%s failed", getattr(target, "__name__", "child process"))
            code = 1
        os._exit(code)
    return pid


def run_serve(args: argparse.Namespace) -> int:
    """Entry point of ``bastion serve``."""
    settings = settings_from(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    # Recover from an unclean shutdown before forking, so every process starts on a consistent index.
    Archive.open(settings).close()
    sock = dicom_socket(settings)
    parent = os.getpid()
    board = LoadBoard(settings.workers)
    children = [_fork(lambda w=w: asyncio.run(serve_worker(settings, sock, parent, board, w)))
                for w in range(1, settings.workers)]
    children.append(_fork(run_warmer, settings, parent))
    try:
        asyncio.run(serve(settings, sock, board))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return 0
