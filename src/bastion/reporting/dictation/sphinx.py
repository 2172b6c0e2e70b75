"""pocketsphinx (CMU Sphinx, offline, CPU only) behind :class:`~bastion.reporting.dictation.Transcriber`.

Two models over the same English acoustic model that pocketsphinx's wheel ships (``en-us``):

- ``radiology=True`` (the default engine, ``"pocketsphinx-radiology"``): Bastion's radiology trigram LM and its
  dictionary (:mod:`.vocabulary`), so "no acute intracranial haemorrhage" is heard as such, not as general English;
- ``radiology=False`` (``"pocketsphinx-default"``): pocketsphinx's general ``en-us`` LM and CMUdict, kept for
  comparison (the word error rate test and ``benchmarks/dictation.py``).

A decoder is built once per (data directory, model) and shared; pocketsphinx's decoder is not thread-safe, so one
recording is decoded at a time per decoder (a lock), in utterances of at most 30 s (cut at pauses,
:func:`.audio.segments`), each with its own cepstral mean (``cmn=batch``) and a
fixed-seed dither: the same audio always gives the same transcript (the live mean adapted to the recordings before,
and the first recording after a start came out worse).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pocketsphinx  # type: ignore[import-untyped]

from bastion.reporting.dictation import DictationUnavailable, Transcript
from bastion.reporting.dictation.audio import decode, segments, trimmed
from bastion.reporting.dictation.vocabulary import compile_vocabulary, normalise

if TYPE_CHECKING:
    from bastion.settings import Settings

#: Whole-utterance cepstral mean normalisation (no state carried from one recording to the next).
_TUNING = {"cmn": "batch", "loglevel": "FATAL"}
#: Half a second of silence around each utterance: a word cut at its very start or end is otherwise often lost.
_PAD = 8000


def _utterance(piece: np.ndarray) -> bytes:
    """``piece`` padded with silence, plus a dither of one bit from a fixed seed (digital silence has no finite log
    energy): the same audio always makes the same bytes, whatever was decoded before (pocketsphinx's own dither
    draws from one generator for every utterance, so a transcript depended on the recordings before it)."""
    padded = np.concatenate([np.zeros(_PAD, np.int16), piece, np.zeros(_PAD, np.int16)]).astype(np.int32)
    noise = np.random.default_rng(0).integers(-1, 2, len(padded))
    return np.clip(padded + noise, -32768, 32767).astype("<i2").tobytes()


class SphinxTranscriber:
    """One pocketsphinx decoder and the model it was built with."""

    _shared: ClassVar[dict[tuple[str, bool], SphinxTranscriber]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, data: Path | None, *, radiology: bool = True, max_seconds: float = 600.0) -> None:
        self.radiology = radiology
        self.max_seconds = max_seconds
        self.engine = "pocketsphinx-radiology" if radiology else "pocketsphinx-default"
        try:
            if radiology:
                vocabulary = compile_vocabulary(data)
                config = pocketsphinx.Config(lm=str(vocabulary.lm), dict=str(vocabulary.dict), **_TUNING)
            else:
                config = pocketsphinx.Config(**_TUNING)
            self._decoder = pocketsphinx.Decoder(config)
        except (OSError, RuntimeError, ValueError) as exc:
            raise DictationUnavailable(f"pocketsphinx cannot load the {self.engine} model: {exc}") from exc
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings, *, radiology: bool) -> SphinxTranscriber:
        """The shared transcriber for the settings' data directory (built, and the model compiled, on first use)."""
        key = (str(Path(settings.data).resolve()), radiology)
        with cls._shared_lock:
            found = cls._shared.get(key)
            if found is None:
                found = cls._shared[key] = cls(Path(settings.data), radiology=radiology,
                                               max_seconds=settings.dictation_max_seconds)
            return found

    def transcribe(self, audio: bytes, content_type: str) -> Transcript:
        """The words in ``audio``; raises AudioUnreadable (415 / 400) or AudioTooLong (413)."""
        pcm = decode(audio, content_type, max_seconds=self.max_seconds)
        heard = []
        with self._lock:
            for piece in segments(trimmed(pcm.samples)):
                self._decoder.start_utt()
                self._decoder.process_raw(_utterance(piece), False, True)
                self._decoder.end_utt()
                hyp = self._decoder.hyp()
                if hyp is not None:
                    heard.append(hyp.hypstr)
        words = normalise(" ".join(heard))
        return Transcript(text=words, seconds=round(pcm.seconds, 3), engine=self.engine)
