"""What every recipe does with the stages: train a model once into its folder, and read back its numbers."""

from __future__ import annotations

import json
from pathlib import Path


def pretrained(data: Path, run: Path, preset: str, recipe: str, model: dict | None, train: dict,
               quiet: bool) -> bool:
    """`gptlab pretrain` into `run` unless it already reached train["max_iters"] (a cut run is resumed)
    -> whether an earlier call had already finished it."""
    from gptlab.fileio import read_json
    from gptlab.pretrain import pretrain
    from gptlab.run.format import LATEST_FILE

    resume = (run / LATEST_FILE).exists()
    if resume and read_json(run / LATEST_FILE, "latest checkpoint")["step"] >= train["max_iters"]:
        return True
    pretrain(str(data), str(run), preset, recipe, model_overrides=None if resume else model, train_layers=(train,),
             resume=resume, quiet=quiet)
    return False


def last_metric(run: Path, key: str) -> float:
    """The last value of `key` in the run's metrics.jsonl (e.g. the final val_loss over the whole split)."""
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [r[key] for r in records if key in r][-1]
