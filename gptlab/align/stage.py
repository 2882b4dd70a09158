"""What the alignment stages (sft, reward, dpo) share: recipe + override resolution, the epoch schedule,
the held-out split, run-dir checks, and the raw model behind the engine's wrappers."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from gptlab.errors import GptlabError
from gptlab.run import read_run_config
from gptlab.train.checkpoint import LATEST_FILE
from gptlab.train.config import TrainConfig, coerce_fields

# model keys that may change when a stage starts from a run (dropout, attention kernel)
FROM_RUN_MODEL_KEYS = ("embd_pdrop", "attn_pdrop", "resid_pdrop", "head_pdrop", "attn_backend")
NO_DROPOUT = {"embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0}


def resolve_config(recipe_name: str, recipe: dict, *layers: dict) -> tuple[TrainConfig, set[str]]:
    """recipe ← each layer (saved run, YAML, CLI/`train=`) -> (TrainConfig, the keys the layers set)."""
    merged: dict = {**recipe}
    given: set[str] = set()
    for layer in layers:
        vals = coerce_fields(TrainConfig, {k: v for k, v in (layer or {}).items() if k != "recipe"}, "train")
        merged.update(vals)
        given |= set(vals)
    merged["recipe"] = recipe_name
    return TrainConfig(**merged), given


def schedule(cfg: TrainConfig, given: set[str], n_train: int, epochs: float, warmup_fraction: float) -> TrainConfig:
    """max_iters = epochs over n_train samples (unless set); warmup = a fraction of the steps (unless set)."""
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
        raise GptlabError(f"--epochs must be a positive number, got {epochs!r}")
    steps = cfg.max_iters if "max_iters" in given else max(1, math.ceil(epochs * n_train / (cfg.batch_size * cfg.grad_accum)))
    warm = cfg.warmup_iters if "warmup_iters" in given else math.ceil(warmup_fraction * steps)
    return dataclasses.replace(cfg, max_iters=steps, warmup_iters=warm, warmup_tokens=0, decay_tokens=0,
                               batch_warmup_tokens=0)


def split_heldout(n: int, fraction: float, seed: int, min_heldout: int = 1) -> tuple[list[int], list[int]]:
    """Seeded random split of range(n) -> (train indices, held-out indices). fraction 0 -> no held-out set."""
    if not (0 <= fraction < 1):
        raise GptlabError(f"held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return list(range(n)), []
    k = max(min_heldout, round(n * fraction))
    if n - k < 1:
        raise GptlabError(f"{n} examples are too few to hold out {fraction:.0%} and still train")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def start_or_resume(out: Path, stage: str, resume: bool) -> dict:
    """-> the saved run config when resuming (checked to be this stage's); refuses to overwrite a run."""
    if resume:
        saved = read_run_config(out)
        if saved.get("stage") != stage:
            raise GptlabError(f"{out} holds a {saved.get('stage')!r} run, not a {stage} run; --resume continues a {stage} run")
        return saved
    if (out / LATEST_FILE).exists():
        raise GptlabError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return {}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT behind torch.compile / DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def single_process(info, stage: str) -> None:
    if info.enabled:
        raise GptlabError(f"gptlab {stage} runs in one process (its loss reads hidden states outside the "
                          "DDP forward); run it without torchrun")

