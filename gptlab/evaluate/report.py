"""Results on the terminal (a table, lm-eval style) and as JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gptlab.fileio import atomic_write_json

_PPL_METRICS = ("loss", "perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"
    return str(v)


def format_table(report: dict) -> str:
    """One row per metric: task, type, shots (mean used if fewer), examples, metric, value, ± stderr."""
    head = ["Task", "Type", "Shots", "N", "Metric", "Value", "± Stderr"]
    rows: list[list[str]] = []
    ppl = report.get("perplexity")
    if ppl:
        label = ", ".join(Path(f).name for f in ppl["files"])
        for i, m in enumerate(_PPL_METRICS):
            rows.append([label if i == 0 else "", "perplexity" if i == 0 else "", "", f"{ppl['tokens']} tok" if i == 0 else "",
                         m, _fmt(ppl[m]), ""])
    for name, r in (report.get("results") or {}).items():
        shots = str(r["shots"])
        if r["shots_used"]["min"] < r["shots"]:
            shots += f" ({r['shots_used']['mean']:.2f} fit)"
        first = True
        for m, v in r["metrics"].items():
            if m.endswith("_stderr"):
                continue
            se = r["metrics"].get(f"{m}_stderr")
            rows.append([name if first else "", r["type"] if first else "", shots if first else "", str(r["n"]) if first else "",
                         m, _fmt(v), _fmt(se)])
            first = False
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    right = {2, 3, 5, 6}

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def write_json(report: dict, path: str | Path) -> None:
    """Write the report; "-" prints it to stdout."""
    if str(path) == "-":
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    p = Path(path)
    if p.parent != Path(""):
        p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, report)
