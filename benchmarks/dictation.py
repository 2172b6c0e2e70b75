"""Dictation: real-time factor of the radiology model on a minute of speech, and the word error rate of both models.

Speech is synthesised with espeak-ng (en-gb) from tests/data/dictation/sentences.txt: the sentences one by one for
the word error rate (radiology model vs pocketsphinx's general English model; voices en-gb, en-us and en-gb at
140 words a minute), and all of them joined and repeated
into one recording of at least ``--seconds`` for the real-time factor (seconds spent transcribing / seconds of audio;
target <= 0.5). The model is compiled (and the decoder loaded) before timing.

Usage: ``.venv/bin/python benchmarks/dictation.py [--seconds 60] [--json]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from bastion.reporting.dictation.sphinx import SphinxTranscriber
from bastion.reporting.dictation.wer import word_error_rate

SENTENCES = Path(__file__).resolve().parents[1] / "tests" / "data" / "dictation" / "sentences.txt"


#: The voices the word error rate is measured with: (label, espeak-ng arguments). en-gb is the test's.
VOICES = (("en-gb", ["-v", "en-gb"]), ("en-us", ["-v", "en-us"]), ("en-gb-slow", ["-v", "en-gb", "-s", "140"]))


def speak(text: str, path: Path, voice: list[str] = VOICES[0][1]) -> bytes:
    subprocess.run(["espeak-ng", *voice, "-w", str(path), text], check=True, timeout=300)
    return path.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the real-time-factor recording")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sentences = [s for s in SENTENCES.read_text().splitlines() if s.strip() and not s.startswith("#")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        engines = [SphinxTranscriber(root / "data", radiology=True), SphinxTranscriber(root / "data", radiology=False)]
        result: dict[str, object] = {"sentences": len(sentences), "words": sum(len(s.split()) for s in sentences)}
        for label, voice in VOICES:
            audio = [speak(s, root / f"{label}-{n}.wav", voice) for n, s in enumerate(sentences)]
            for engine in engines:
                heard = [(s, engine.transcribe(a, "audio/wav").text) for s, a in zip(sentences, audio, strict=True)]
                result[f"wer_{label}_{engine.engine}"] = round(word_error_rate(heard), 3)
        # One long recording: the sentences joined (espeak's sentence pauses between), repeated to the length.
        probe = engines[0].transcribe(speak(". ".join(sentences) + ".", root / "all.wav"), "audio/wav").seconds
        repeats = max(1, int(-(-args.seconds // probe)))
        long = speak(". ".join(sentences * repeats) + ".", root / "long.wav")
        for engine in engines:
            started = time.perf_counter()
            transcript = engine.transcribe(long, "audio/wav")
            spent = time.perf_counter() - started
            result[f"rtf_{engine.engine}"] = round(spent / transcript.seconds, 3)
            result["long_seconds"] = round(transcript.seconds, 1)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:40} {value}")


if __name__ == "__main__":
    main()
