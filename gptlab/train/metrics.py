"""Logging for machines (metrics.jsonl; TensorBoard, W&B, trackio mirror it) and people (loss-curve PNG)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write
from gptlab.plot import Line, Panel, plot
from gptlab.train.loggers import open_sinks
from gptlab.run.format import METRICS_FILE, parse_metrics, read_metrics  # noqa: F401  (read_metrics: re-exported)


class MetricsLogger:
    """Appends one JSON object per event to metrics.jsonl. On resume, events after the resumed step are
    dropped first so the file describes exactly one trajectory."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, sinks: tuple[str, ...] = (), enabled: bool = True,
                 config: dict | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.sinks: list = []
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            text = self.path.read_text()
            recs = parse_metrics(text)
            keep = [r for r in recs if r.get("step", 0) <= resume_step]
            if len(keep) < len(text.splitlines()) or (text and not text.endswith("\n")):
                # events after the checkpoint, or a line cut short by a kill: rewritten atomically, so a
                # kill during the rewrite leaves the old file whole
                atomic_write(self.path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in keep)))
        self.sinks = open_sinks(sinks, Path(run_dir), config or {})  # gptlab.train.loggers

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3), **values}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:
            raise GptlabError(f"cannot write {self.path}: {e.strerror or e} (its earlier lines and the last "
                              "checkpoint are intact)") from None
        for sink in self.sinks:
            sink.log(step, values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def plot_loss(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Train loss per logged step and val loss per eval, on one axis."""
    recs = read_metrics(metrics_path)
    lines = [Line.of(recs, "loss", "train loss"), Line.of(recs, "val_loss", "val loss", "o-", 1.5)]
    return plot(out_png, [Panel(lines, ylabel="cross-entropy (nats/token)")], title or Path(metrics_path).parent.name)
