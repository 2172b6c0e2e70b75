"""``bastion serve``: the DICOM listener and the HTTP listener on one asyncio loop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import uvicorn

from bastion.archive import Archive
from bastion.dimse.server import DicomServer
from bastion.settings import Settings, load_settings
from bastion.web.app import ServerStatus, create_app

log = logging.getLogger("bastion")


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the config file, environment and the command's flags."""
    return load_settings(args.config, data=args.data, aet=getattr(args, "aet", None),
                         host=getattr(args, "host", None), dicom_port=getattr(args, "dicom_port", None),
                         http_port=getattr(args, "http_port", None), remotes=getattr(args, "remote", None),
                         log_level=getattr(args, "log_level", None))


async def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM."""
    archive = Archive.open(settings)
    status = ServerStatus()
    dicom = DicomServer(archive)
    await dicom.start(settings.host, settings.dicom_port)
    status.dicom_listening = True
    status.dicom_address = f"{settings.host}:{settings.dicom_port}"
    app = create_app(archive, status)
    config = uvicorn.Config(app, host=settings.host, port=settings.http_port, log_level="warning",
                            access_log=False, lifespan="off")
    http = uvicorn.Server(config)
    http.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    http_task = asyncio.create_task(http.serve())
    log.info("Bastion %s: DICOM %s@%s:%d, HTTP http://%s:%d, data %s", __import__("bastion").__version__,
             settings.aet, settings.host, settings.dicom_port, settings.host, settings.http_port, settings.data)
    stop_task = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down")
    http.should_exit = True
    await dicom.close()
    if http_task not in done:
        await http_task
    elif http_task.exception():
        raise http_task.exception()  # type: ignore[misc]
    archive.close()


def run_serve(args: argparse.Namespace) -> int:
    """Entry point of ``bastion serve``."""
    settings = settings_from(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    asyncio.run(serve(settings))
    return 0
