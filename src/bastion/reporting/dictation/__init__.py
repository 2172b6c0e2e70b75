"""Offline dictation: audio in, the words recognised out, with a radiology vocabulary.

One small interface (:class:`Transcriber`) that the reporting API calls, and :func:`open_transcriber` that builds the
configured engine: ``dictation_engine = "pocketsphinx"`` (the default, :mod:`.sphinx`, with Bastion's radiology
language model) or ``"package.module:Factory"``, a site's own local engine (a callable taking the
:class:`~bastion.settings.Settings` and returning a :class:`Transcriber`). Nothing leaves the machine. See
docs/dictation.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from bastion.errors import BastionError

if TYPE_CHECKING:
    from bastion.settings import Settings


@dataclass(frozen=True)
class Transcript:
    """What an engine heard in one recording."""

    #: The words recognised, lower case, single spaces.
    text: str
    #: The duration of the audio, in seconds.
    seconds: float
    #: The engine that made it, e.g. ``"pocketsphinx-radiology"``.
    engine: str


class AudioUnreadable(BastionError):
    """The audio cannot be decoded: an unsupported container or codec (HTTP 415) or broken data (HTTP 400)."""

    http_status = 415

    def __init__(self, message: str, *, http_status: int = 415) -> None:
        super().__init__(message)
        self.http_status = http_status


class AudioTooLong(BastionError):
    """The recording is longer than ``dictation_max_seconds`` (HTTP 413: split it)."""

    http_status = 413


class DictationUnavailable(BastionError):
    """The configured engine cannot be loaded (HTTP 503)."""

    http_status = 503


@runtime_checkable
class Transcriber(Protocol):
    """A local speech-to-text engine."""

    def transcribe(self, audio: bytes, content_type: str) -> Transcript:
        """The words in ``audio`` (``audio/wav`` or ``audio/webm``); raises :class:`AudioUnreadable`."""
        ...


def open_transcriber(settings: Settings) -> Transcriber:
    """The engine ``settings.dictation_engine`` names (default: pocketsphinx with Bastion's radiology vocabulary)."""
    name = (getattr(settings, "dictation_engine", "") or "pocketsphinx").strip()
    if name in ("pocketsphinx", "pocketsphinx-radiology"):
        from bastion.reporting.dictation.sphinx import SphinxTranscriber

        return SphinxTranscriber.for_settings(settings, radiology=True)
    if name == "pocketsphinx-default":
        from bastion.reporting.dictation.sphinx import SphinxTranscriber

        return SphinxTranscriber.for_settings(settings, radiology=False)
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise DictationUnavailable(f"dictation_engine {name!r}: 'pocketsphinx' or 'package.module:Factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        engine = factory(settings)
    except Exception as exc:  # noqa: BLE001 - a site's engine may fail in any way; say which and why
        raise DictationUnavailable(f"dictation_engine {name!r} cannot be loaded: {exc}") from exc
    if not isinstance(engine, Transcriber):
        raise DictationUnavailable(f"dictation_engine {name!r} returned {type(engine).__name__}, "
                                   "which has no transcribe(audio, content_type)")
    return engine


__all__ = ["AudioTooLong", "AudioUnreadable", "DictationUnavailable", "Transcriber", "Transcript",
           "open_transcriber"]
