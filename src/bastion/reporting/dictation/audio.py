"""Recorded audio to what pocketsphinx reads: 16 kHz, mono, signed 16-bit little-endian PCM.

WAV (RIFF, PCM of any rate, channel count and 8/16/24/32-bit width) is read with the standard library's
:mod:`wave` and resampled with numpy (other WAV encodings, e.g. 32-bit float, go to PyAV); WebM or Ogg with Opus or Vorbis (browsers' ``MediaRecorder``), and MP4/AAC,
are decoded with PyAV (FFmpeg's decoders, bundled in its wheel, offline). A recording longer than the limit is
refused before it is decoded in full (:class:`~bastion.reporting.dictation.AudioTooLong`).
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass

import numpy as np

from bastion.reporting.dictation import AudioTooLong, AudioUnreadable

RATE = 16000
_WAV = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave")
_COMPRESSED = ("audio/webm", "video/webm", "audio/ogg", "audio/mp4", "audio/mpeg", "audio/aac")


@dataclass(frozen=True)
class Pcm:
    """Decoded audio: 16 kHz mono int16 samples."""

    samples: np.ndarray

    @property
    def seconds(self) -> float:
        return len(self.samples) / RATE

    def tobytes(self) -> bytes:
        return self.samples.astype("<i2").tobytes()


def segments(samples: np.ndarray, *, longest: float = 30.0, shortest: float = 15.0) -> list[np.ndarray]:
    """``samples`` cut into pieces of at most ``longest`` seconds, each cut at the quietest 30 ms frame after
    ``shortest`` seconds (a pause between words, in speech): the decoder's memory grows with an utterance's length
    (a 10-minute utterance took 650 MB), so a long recording is decoded piece by piece."""
    frame = int(0.03 * RATE)
    top, bottom = int(longest * RATE), int(shortest * RATE)
    pieces = []
    start = 0
    while len(samples) - start > top:
        window = samples[start + bottom:start + top].astype(np.float32)
        frames = window[:len(window) // frame * frame].reshape(-1, frame)
        quietest = int(np.argmin((frames * frames).mean(axis=1)))
        cut = start + bottom + quietest * frame + frame // 2
        pieces.append(samples[start:cut])
        start = cut
    pieces.append(samples[start:])
    return pieces


#: Samples of at most this magnitude (about -72 dBFS, below any microphone's own noise) are digital silence.
SILENT = 8


def trimmed(samples: np.ndarray, *, margin: float = 0.25) -> np.ndarray:
    """``samples`` without the digital silence they start and end with (a muted microphone, zero padding), keeping
    ``margin`` seconds of it on each side.

    pocketsphinx (``cmn=batch``) normalises an utterance by its mean cepstrum, and seconds of exact silence drag
    that mean far from the speech: "no acute intracranial haemorrhage" after 3 s of zeros came back as "no acute".
    Real background noise does no such harm, nor does silence between words."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > SILENT)
    if len(loud) == 0:
        return samples[:0]
    keep = int(margin * RATE)
    return samples[max(0, int(loud[0]) - keep): int(loud[-1]) + 1 + keep]


def decode(audio: bytes, content_type: str, *, max_seconds: float) -> Pcm:
    """``audio`` of ``content_type`` as 16 kHz mono PCM; raises AudioUnreadable (415 / 400) or AudioTooLong (413)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if not audio:
        raise AudioUnreadable("the audio is empty", http_status=400)
    if kind in _WAV or (not kind or kind == "application/octet-stream") and audio[:4] == b"RIFF":
        return _decode_wav(audio, max_seconds)
    if kind in _COMPRESSED or (not kind or kind == "application/octet-stream"):
        return _decode_av(audio, max_seconds)
    raise AudioUnreadable(f"audio of type {content_type!r} is not supported: send audio/wav or audio/webm")


def _decode_wav(audio: bytes, max_seconds: float) -> Pcm:
    try:
        with wave.open(io.BytesIO(audio), "rb") as w:
            rate, channels, width, frames = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            if rate <= 0 or channels <= 0:
                raise AudioUnreadable(f"WAV with {rate} Hz and {channels} channel(s)", http_status=400)
            if frames / rate > max_seconds:
                raise AudioTooLong(f"the recording lasts {frames / rate:.0f} s; at most {max_seconds:.0f} s "
                                   "(dictation_max_seconds) at a time")
            raw = w.readframes(frames)
    except (wave.Error, EOFError) as exc:
        if "unknown format" in str(exc):  # IEEE float, A-law, mu-law, extensible: FFmpeg's WAV reader has them
            return _decode_av(audio, max_seconds)
        raise AudioUnreadable(f"cannot read the WAV audio: {exc}", http_status=400) from exc
    usable = len(raw) // (width * channels) * width * channels
    raw = raw[:usable]
    if width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) * 256.0
    elif width == 2:
        data = np.frombuffer(raw, "<i2").astype(np.float32)
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        data = (((b[:, 2] << 24) | (b[:, 1] << 16) | (b[:, 0] << 8)) >> 16).astype(np.float32)
    elif width == 4:
        data = (np.frombuffer(raw, "<i4") >> 16).astype(np.float32)
    else:
        raise AudioUnreadable(f"WAV with {width * 8}-bit samples is not supported", http_status=415)
    mono = data.reshape(-1, channels).mean(axis=1, dtype=np.float32) if channels > 1 else data
    return Pcm(_to_int16(resample(mono, rate, RATE)))


def resample(samples: np.ndarray, rate: int, target: int = RATE) -> np.ndarray:
    """``samples`` at ``rate`` Hz as ``target`` Hz (float32): a windowed-sinc low-pass below the new Nyquist, then
    linear interpolation (enough for speech recognition, which looks at the band below 8 kHz). Ten seconds of output
    at a time, so a long recording costs little more memory than its samples."""
    if rate == target or len(samples) == 0:
        return samples.astype(np.float32)
    taps = np.arange(-32, 33)
    kernel = None
    if rate > target:
        cutoff = 0.9 * target / 2 / rate  # cycles per input sample
        kernel = (2 * cutoff * np.sinc(2 * cutoff * taps) * np.hamming(len(taps))).astype(np.float32)
        kernel /= kernel.sum()
    step = rate / target
    count = int(round(len(samples) * target / rate))
    out = np.empty(count, np.float32)
    for first in range(0, count, 10 * target):
        positions = np.arange(first, min(first + 10 * target, count)) * step
        low = max(int(positions[0]) - len(taps), 0)
        high = min(int(positions[-1]) + len(taps) + 2, len(samples))
        piece = samples[low:high].astype(np.float32)
        if kernel is not None:
            piece = np.convolve(piece, kernel, mode="same")
        out[first:first + len(positions)] = np.interp(positions - low, np.arange(len(piece)), piece)
    return out


def _to_int16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.round(samples), -32768, 32767).astype(np.int16)


def _decode_av(audio: bytes, max_seconds: float) -> Pcm:
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av is a dependency; a site may have removed it
        raise AudioUnreadable("compressed audio needs PyAV (pip install av); send audio/wav", http_status=415) from exc
    limit = int(max_seconds * RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(audio), mode="r") as container:
            if not container.streams.audio:
                raise AudioUnreadable("the container holds no audio stream", http_status=400)
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().reshape(-1)
                    chunks.append(chunk)
                    total += len(chunk)
                if total > limit:
                    raise AudioTooLong(f"the recording lasts more than {max_seconds:.0f} s "
                                       "(dictation_max_seconds); split it")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except av.error.FFmpegError as exc:
        raise AudioUnreadable(f"cannot decode the audio: {exc}", http_status=400) from exc
    samples = np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)
    if len(samples) == 0:
        raise AudioUnreadable("the audio holds no samples", http_status=400)
    return Pcm(samples)
