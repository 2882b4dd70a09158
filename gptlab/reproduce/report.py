"""A reproduction's outputs: report.md (the claims table, the measured tables, the figures), results.json
(every number, machine-readable) and the PNG figures, written atomically into the reproduction's folder."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptlab.fileio import atomic_write


@dataclass
class Claim:
    claim: str           # what the paper says, in a line
    paper: str           # the paper's own figure
    measured: str        # ours, at this scale
    holds: bool | None   # None: not measurable here
    why: str = ""        # the reason, when it does not hold (or a caveat when it does)


@dataclass
class Reproduction:
    name: str
    paper: str
    setup: str                                       # what was trained and measured, in a paragraph
    claims: list[Claim]
    tables: dict[str, str] = field(default_factory=dict)    # title -> markdown table
    figures: dict[str, Path] = field(default_factory=dict)  # caption -> PNG (inside the folder)
    results: dict = field(default_factory=dict)             # every number, for results.json
    seconds: float = 0.0
    machine: str = ""


def _verdict(holds: bool | None) -> str:
    return "n/a" if holds is None else ("yes" if holds else "**no**")


def claims_table(claims: list[Claim]) -> str:
    rows = ["| the paper says | paper | we measured | holds at this scale? |", "|---|---|---|---|"]
    for c in claims:
        why = f" — {c.why}" if c.why else ""
        rows.append(f"| {c.claim} | {c.paper} | {c.measured} | {_verdict(c.holds)}{why} |")
    return "\n".join(rows)


def write(out: Path, rep: Reproduction) -> Path:
    """out/report.md and out/results.json -> the report's path."""
    out = Path(out)
    lines = [f"# `gptlab reproduce {rep.name}`", "", f"*{rep.paper}*", "",
             f"Machine: {rep.machine}. Wall time: {rep.seconds / 60:.1f} min. Written {time.strftime('%Y-%m-%d %H:%M')}.",
             "", rep.setup, "", "## Claims", "", claims_table(rep.claims), ""]
    for title, table in rep.tables.items():
        lines += [f"## {title}", "", table, ""]
    for caption, png in rep.figures.items():
        if png is not None and Path(png).is_file():
            lines += [f"![{caption}]({Path(png).name})", "", f"*{caption}*", ""]
    text = "\n".join(lines)
    atomic_write(out / "report.md", lambda p: Path(p).write_text(text, encoding="utf-8"))
    results = {"name": rep.name, "paper": rep.paper, "machine": rep.machine, "seconds": rep.seconds,
               "claims": [asdict(c) for c in rep.claims], **rep.results}
    atomic_write(out / "results.json", lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
    return out / "report.md"
