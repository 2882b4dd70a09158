"""Experiment trackers that mirror metrics.jsonl (which stays the source of truth): TensorBoard, Weights &
Biases and trackio, chosen by `--train.log_to tensorboard,wandb,trackio`.

Each sink gets every numeric value of every logged event at its step. A resumed run continues the same
tracker run: W&B and trackio ids are kept in the run directory (`trackers.json`). W&B works offline with
`WANDB_MODE=offline` (sync later with `wandb sync`); trackio writes a local database (`TRACKIO_DIR`) and
needs no account. The project is `GPTLAB_PROJECT` (default "gptlab"); the tracker run is named after the
run directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write

SINKS = ("tensorboard", "wandb", "trackio")
IDS_FILE = "trackers.json"


def parse_log_to(value: str, tensorboard: bool = False) -> tuple[str, ...]:
    """'tensorboard,wandb' -> ('tensorboard', 'wandb'); an unknown name is a one-line error."""
    names = [n.strip().lower() for n in (value or "").split(",") if n.strip() and n.strip().lower() != "none"]
    bad = [n for n in names if n not in SINKS]
    if bad:
        raise GptlabError(f"train.log_to: unknown logger {bad[0]!r} (choose from {', '.join(SINKS)}, comma-separated)")
    if tensorboard and "tensorboard" not in names:  # --train.tensorboard true, the older spelling
        names.insert(0, "tensorboard")
    return tuple(dict.fromkeys(names))


def _numbers(values: dict) -> dict[str, float]:
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _run_id(run_dir: Path, name: str) -> str:
    """The tracker run id this run directory uses (made once, kept for resumes)."""
    path = run_dir / IDS_FILE
    ids = json.loads(path.read_text()) if path.is_file() else {}
    if name not in ids:
        ids[name] = f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
        atomic_write(path, lambda p: Path(p).write_text(json.dumps(ids, indent=1) + "\n"))
    return ids[name]


def _need(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise GptlabError(f"--train.log_to {extra} needs `pip install gptlab[{extra}]`") from None


class TensorBoardSink:
    def __init__(self, run_dir: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GptlabError("TensorBoard logging needs `pip install gptlab[tensorboard]`") from None
        self.w = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict) -> None:
        for k, v in _numbers(values).items():
            self.w.add_scalar(k, v, step)

    def close(self) -> None:
        self.w.close()


class WandbSink:
    def __init__(self, run_dir: Path, config: dict):
        wandb = _need("wandb", "wandb")
        self.run = wandb.init(project=os.environ.get("GPTLAB_PROJECT", "gptlab"), name=run_dir.name, config=config,
                              id=_run_id(run_dir, "wandb"), resume="allow", dir=str(run_dir))

    def log(self, step: int, values: dict) -> None:
        self.run.log(_numbers(values), step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioSink:
    def __init__(self, run_dir: Path, config: dict):
        trackio = _need("trackio", "trackio")
        project = os.environ.get("GPTLAB_PROJECT", "gptlab")
        with contextlib.redirect_stdout(io.StringIO()):  # its banner would break into the progress bar
            self.run = trackio.init(project=project, name=_run_id(run_dir, "trackio"), config=config, resume="allow")
        print(f"trackio: run {self.run.name} in project {project} (see it with `trackio show --project {project}`)")

    def log(self, step: int, values: dict) -> None:
        self.run.log(_numbers(values), step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.run.finish()


def open_sinks(names: tuple[str, ...], run_dir: Path, config: dict) -> list:
    kinds = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "trackio": TrackioSink}
    return [kinds[n](Path(run_dir), config) for n in names]
