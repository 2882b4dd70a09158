"""Logging for machines (metrics.jsonl, TensorBoard) and people (loss-curve PNG), and MFU's peak."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

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


def _cache_dir() -> Path:
    return Path(os.environ.get("GPTLAB_CACHE", Path.home() / ".cache" / "gptlab"))


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """This machine's matmul throughput (FLOP/s) for `dtype`: the denominator of MFU. Cached per
    device, dtype and thread count, since a benchmark of ~1 s should not run on every start."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}t"
    key = f"{name}|{dtype}|{n}"
    cache = _cache_dir() / "peak_flops.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key in known:
        return float(known[key])
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)  # not randn: the training RNG stays untouched
    b = torch.full((n, n), 0.25, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    sync()
    flops = 2 * n**3 * iters / (time.perf_counter() - t0)
    known[key] = flops
    try:
        from gptlab.train.checkpoint import atomic_write_json

        atomic_write_json(cache, known)
    except OSError:
        pass
    return flops
