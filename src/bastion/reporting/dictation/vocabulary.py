"""Bastion's radiology vocabulary, compiled into a language model and dictionary pocketsphinx loads.

The corpus is plain text, one phrase a line (``#`` starts a comment line): the package's ``corpus/*.txt`` (template phrases and common findings)
and a site's own ``<data>/dictation/*.txt``. Pronunciations (CMU ARPABET, ``word phones`` and ``word(2) phones``
for alternatives) come from a site's ``<data>/dictation/*.dict``, then the package's ``corpus/*.dict`` (British
spellings such as *haemorrhage* and the radiology words CMUdict lacks), then pocketsphinx's ``cmudict-en-us.dict``.
A word with no pronunciation anywhere is left out of the model (and named by :attr:`CompiledVocabulary.missing`).

The model is a back-off trigram ARPA file (pocketsphinx's own ``ArpaBoLM``), compiled at first use and cached under
``<data>/dictation/cache/<digest>/``: the digest covers every input, so an edited corpus compiles again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pocketsphinx  # type: ignore[import-untyped]
from pocketsphinx.lm import ArpaBoLM  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

PACKAGE_CORPUS = Path(__file__).with_name("corpus")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


@dataclass(frozen=True)
class CompiledVocabulary:
    """A compiled model's files and the corpus words that could not be given a pronunciation."""

    lm: Path
    dict: Path
    words: int
    missing: tuple[str, ...]


def normalise(text: str) -> str:
    """Lower case, letters and apostrophes only, single spaces (the form :class:`Transcript` text takes)."""
    return " ".join(_WORD.findall(text.lower()))


def site_directory(data: Path) -> Path:
    """Where a site adds its own corpus (``*.txt``) and pronunciations (``*.dict``)."""
    return data / "dictation"


def _inputs(data: Path | None, suffix: str) -> list[Path]:
    """The package's files with ``suffix``, then the site's (each set sorted by name)."""
    found = sorted(PACKAGE_CORPUS.glob(f"*{suffix}"))
    if data is not None and site_directory(data).is_dir():
        found += sorted(site_directory(data).glob(f"*{suffix}"))
    return found


def cmudict_path() -> Path:
    """pocketsphinx's English pronunciation dictionary."""
    return Path(pocketsphinx.get_model_path("en-us/cmudict-en-us.dict"))


def read_pronunciations(paths: list[Path]) -> dict[str, list[str]]:
    """``word -> [phones, ...]`` from dictionary files; a later file's entry for a word replaces an earlier one's."""
    out: dict[str, list[str]] = {}
    for path in paths:
        seen: dict[str, list[str]] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split(None, 1)
            if len(parts) != 2 or line.startswith((";", "#")):
                continue
            word = re.sub(r"\(\d+\)$", "", parts[0]).lower()
            seen.setdefault(word, []).append(parts[1].split("#")[0].strip())
        out.update(seen)
    return out


def compile_vocabulary(data: Path | None) -> CompiledVocabulary:
    """The radiology model for a data directory (``None``: the package corpus only), compiled once and cached."""
    corpus = _inputs(data, ".txt")
    dicts = [cmudict_path(), *_inputs(data, ".dict")]
    digest = hashlib.sha256(pocketsphinx.__version__.encode() if hasattr(pocketsphinx, "__version__") else b"5")
    for path in corpus + dicts:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    key = digest.hexdigest()[:20]
    root = site_directory(data) / "cache" if data is not None else Path(tempfile.gettempdir()) / "bastion-dictation"
    target = root / key
    if not (target / "radiology.lm").is_file():
        _build(corpus, dicts, root, target)
    missing = tuple((target / "missing.txt").read_text(encoding="utf-8").split())
    words = sum(1 for line in (target / "radiology.dict").read_text(encoding="utf-8").splitlines()
                if "(" not in line.split(" ", 1)[0])
    return CompiledVocabulary(target / "radiology.lm", target / "radiology.dict", words, missing)


def _build(corpus: list[Path], dicts: list[Path], root: Path, target: Path) -> None:
    """Write the LM, dictionary and missing-word list into a fresh directory, then move it into place whole."""
    pronunciations = read_pronunciations(dicts)
    sentences: list[str] = []
    missing: set[str] = set()
    for path in corpus:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.lstrip().startswith("#"):
                continue
            words = normalise(line).split()
            missing.update(w for w in words if w not in pronunciations)
            kept = [w for w in words if w in pronunciations]
            if kept:
                sentences.append(" ".join(kept))
    if missing:
        log.warning("dictation: no pronunciation for %d corpus word(s), left out: %s (add them to a "
                    "<data>/dictation/*.dict file)", len(missing), " ".join(sorted(missing)))
    vocabulary = sorted({w for s in sentences for w in s.split()})
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        lm = ArpaBoLM(text="\n".join(sentences) + "\n", add_start=True)
        lm.compute()
        lm.write_file(str(work / "radiology.lm"))
        with open(work / "radiology.dict", "w", encoding="utf-8") as fh:
            for word in vocabulary:
                for n, phones in enumerate(pronunciations[word], start=1):
                    fh.write(f"{word} {phones}\n" if n == 1 else f"{word}({n}) {phones}\n")
        (work / "missing.txt").write_text("\n".join(sorted(missing)) + "\n", encoding="utf-8")
        try:
            os.rename(work, target)
        except OSError:
            if not (target / "radiology.lm").is_file():  # not another process compiling the same inputs first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
