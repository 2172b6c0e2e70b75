"""Failure drills: a scenario run end to end against a real ``bastion serve`` on loopback, with its own
throw-away archive, measured from the outside (``bastion drill SCENARIO``; ``docs/drills.md``).

:func:`run_drill` runs one scenario (:data:`SCENARIOS`) and returns its :class:`DrillResult`: the figures every
drill reports (``lost``, ``corrupt_served``, ``failed_reads``, ``seconds_to_recover``, ``ok``) and the
scenario's own. The building blocks (server process, C-STORE loader, WADO-RS reader) are in
:mod:`bastion.drills.harness`, the scenarios in :mod:`bastion.drills.scenarios`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The scenarios, in the order ``bastion drill --help`` lists them.
SCENARIOS = ("kill-node", "lose-index", "lose-copy", "bit-rot", "full-disk")
#: The scenarios that need a server keeping copies of each object in several blob stores.
NEEDS_COPIES = ("lose-copy", "bit-rot", "full-disk")


@dataclass
class DrillOptions:
    """What ``bastion drill`` was asked for."""

    instances: int = 500
    rounds: int = 5
    keep: bool = False
    timeout: float = 300.0  # the longest wait for a recovery or repair
    flips: int = 20  # bit-rot: stored copies damaged
    seed: int | None = None
    settings: dict[str, str] = field(default_factory=dict)  # extra BASTION_* for the server


@dataclass
class DrillResult:
    """The measured figures of one drill. ``figures`` holds the scenario's own, in display order, under the
    names the JSON carries; ``labels`` their table labels."""

    scenario: str
    instances: int
    lost: int | None = None
    corrupt_served: int | None = None
    failed_reads: int | None = None
    seconds_to_recover: float | None = None
    ok: bool = False
    skipped: str | None = None
    error: str | None = None  # the drill itself broke (e.g. the server did not start): its work directory is kept
    figures: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    workdir: str | None = None

    def add(self, name: str, value: Any, label: str | None = None) -> None:
        self.figures[name] = value
        if label:
            self.labels[name] = label

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "instances": self.instances, "lost": self.lost,
                "corrupt_served": self.corrupt_served, "failed_reads": self.failed_reads,
                "seconds_to_recover": self.seconds_to_recover, "ok": self.ok, "skipped": self.skipped, "error": self.error,
                **self.figures, "notes": self.notes, "workdir": self.workdir}

    def table(self) -> str:
        """The figures as a two-column table."""
        rows: list[tuple[str, str]] = [("scenario", self.scenario), ("instances", str(self.instances))]
        if self.skipped:
            rows.append(("skipped", self.skipped))
        if self.error:
            rows.append(("error", self.error))
        names = sorted((n for n in self.figures if n != "seed"),
                       key=lambda n: (n != "server_settings", n == "verify_ok"))
        for name in names:
            rows.append((self.labels.get(name, name.replace("_", " ")), _show(self.figures[name])))
        for name, label in (("lost", "acknowledged instances lost"), ("corrupt_served", "corrupt bytes served"),
                            ("failed_reads", "failed reads"), ("seconds_to_recover", "seconds to recover")):
            value = getattr(self, name)
            if value is not None:
                rows.append((label, _show(value)))
        if "seed" in self.figures:
            rows.append(("seed", _show(self.figures["seed"])))
        rows.append(("ok", "yes" if self.ok else "NO"))
        width = max(len(label) for label, _ in rows)
        lines = [f"{label:<{width}}  {value}" for label, value in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(_show(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_show(v)}" for k, v in value.items()) if value else "-"
    if value is None:
        return "-"
    return str(value)


def run_drill(scenario: str, options: DrillOptions) -> DrillResult:
    """Run ``scenario`` (one of :data:`SCENARIOS`) with ``options``."""
    from bastion.drills.scenarios import run

    return run(scenario, options)
