"""The pocketsphinx engine (being built: loads, but answers 503 until its body lands)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bastion.reporting.dictation import DictationUnavailable, Transcript

if TYPE_CHECKING:
    from bastion.settings import Settings


class SphinxTranscriber:
    """pocketsphinx behind :class:`~bastion.reporting.dictation.Transcriber`."""

    @classmethod
    def for_settings(cls, settings: Settings, *, radiology: bool) -> SphinxTranscriber:
        return cls()

    def transcribe(self, audio: bytes, content_type: str) -> Transcript:
        raise DictationUnavailable("the pocketsphinx engine is not built yet")
