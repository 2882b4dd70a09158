"""Stage caching: each finished stage is recorded in state.json with a hash of its config and its inputs
(the hashes of the stages it reads from, and the contents of user files it names). A stage re-runs when its
hash changes, so a changed config re-runs that stage and everything downstream of it."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from gptlab.fileio import atomic_write_json, read_json

STATE_FILE = "state.json"
STATE_VERSION = 1


def file_digest(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def stage_hash(name: str, config: dict, upstream: dict[str, str], files: list[str | Path]) -> str:
    """Hash of what determines a stage's output: its config, upstream stage hashes, named input files."""
    payload = {"stage": name, "config": config, "upstream": upstream,
               "files": {str(f): file_digest(f) for f in files}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PipelineState:
    """state.json: {stage: {"hash", "status": running|done|failed, "result", "elapsed_s", "error"}}."""

    def __init__(self, root: Path):
        self.path = Path(root) / STATE_FILE
        self.stages: dict[str, dict] = {}
        if self.path.exists():
            saved = read_json(self.path, "pipeline state")
            self.stages = saved.get("stages", {}) if saved.get("version") == STATE_VERSION else {}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"version": STATE_VERSION, "stages": self.stages})

    def is_done(self, name: str, h: str) -> bool:
        s = self.stages.get(name, {})
        return s.get("status") == "done" and s.get("hash") == h

    def was_started(self, name: str, h: str) -> bool:
        """An interrupted (or failed) run of the same config: its checkpoints can be resumed."""
        s = self.stages.get(name, {})
        return s.get("status") in ("running", "failed") and s.get("hash") == h

    def start(self, name: str, h: str) -> None:
        self.stages[name] = {"hash": h, "status": "running", "started": time.time()}
        self._save()

    def finish(self, name: str, h: str, result: dict, elapsed: float) -> None:
        self.stages[name] = {"hash": h, "status": "done", "result": result, "elapsed_s": round(elapsed, 1),
                             "finished": time.time()}
        self._save()

    def fail(self, name: str, h: str, error: str, elapsed: float) -> None:
        self.stages[name] = {"hash": h, "status": "failed", "error": error, "elapsed_s": round(elapsed, 1)}
        self._save()

    def result(self, name: str) -> dict:
        return self.stages.get(name, {}).get("result", {})
