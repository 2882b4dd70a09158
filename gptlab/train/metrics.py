"""Logging for machines (metrics.jsonl, TensorBoard) and people (loss-curve PNG)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from gptlab.errors import GptlabError


class MetricsLogger:
    """Appends one JSON object per event to metrics.jsonl. On resume, events after the resumed step are
    dropped first so the file describes exactly one trajectory."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = False, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            keep = [r for r in _parse_lines(self.path.read_text()) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise GptlabError("TensorBoard logging needs `pip install gptlab[tensorboard]`") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _parse_lines(text: str) -> list[dict]:
    out = []
    for ln in text.splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return out


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    return _parse_lines(path.read_text()) if path.exists() else []


def plot_loss(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Train loss per logged step and val loss per eval, on one axis."""
    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
