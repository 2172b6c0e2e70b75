"""Word error rate: the words a transcript gets wrong, as a share of the words said."""

from __future__ import annotations

from collections.abc import Iterable


def word_errors(reference: str, hypothesis: str) -> int:
    """Substitutions + deletions + insertions turning ``hypothesis`` into ``reference`` (Levenshtein over words)."""
    ref, hyp = reference.split(), hypothesis.split()
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        current = [i]
        for j, h in enumerate(hyp, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def word_error_rate(pairs: Iterable[tuple[str, str]]) -> float:
    """Total word errors over total reference words, for (reference, hypothesis) pairs (0.0: perfect)."""
    errors = words = 0
    for reference, hypothesis in pairs:
        errors += word_errors(reference, hypothesis)
        words += len(reference.split())
    return errors / words if words else 0.0
