"""A run directory is the unit every command passes around: config.json + model.safetensors + tokenizer."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gptlab import __version__
from gptlab.errors import GptlabError
from gptlab.model import GPT, GPTConfig
from gptlab.runtime import linear_shape, resolve_dtype
from gptlab.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from gptlab.fileio import atomic_write_json, read_json
from gptlab.run.format import (CONFIG_FILE, LATEST_FILE, METRICS_FILE, MODEL_FILE, RUN_FORMAT, RUN_VERSION, load_model_weights,
                               read_metrics)


# Config sections whose layers another package rebuilds in their stored layout before the weights load
# (quantized layers): section -> the module that registers the hook (`register_layout`) when imported. It
# is imported by name when such a run is loaded, so this module depends on none of them.
LAYOUT_PROVIDERS = {"compression": "gptlab.compress.format"}
_LAYOUT_HOOKS: dict[str, Callable[[GPT, dict, str], None]] = {}


def register_layout(section: str, hook: Callable[[GPT, dict, str], None]) -> None:
    """hook(model on the meta device, config[section], where) swaps in the layers the weights were saved from."""
    _LAYOUT_HOOKS[section] = hook


def _prepare_layers(model: GPT, cfg: dict, where: str) -> None:
    for section, provider in LAYOUT_PROVIDERS.items():
        if section in cfg:
            if section not in _LAYOUT_HOOKS:
                importlib.import_module(provider)
            _LAYOUT_HOOKS[section](model, cfg[section], where)


@dataclass
class Run:
    model: GPT
    tokenizer: Tokenizer
    config: dict
    path: Path


def write_run_config(run_dir: Path, model_cfg: GPTConfig, tokenizer: Tokenizer, **extra) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run_dir / TOKENIZER_FILE)
    atomic_write_json(run_dir / CONFIG_FILE, {"format": RUN_FORMAT, "version": RUN_VERSION, "gptlab": __version__,
                                              "model": model_cfg.to_dict(), "tokenizer": TOKENIZER_FILE, **extra})


def read_run_config(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GptlabError(f"run directory not found: {run_dir}")
    cfg = read_json(run_dir / CONFIG_FILE, "run config")
    if cfg.get("format") != RUN_FORMAT:
        raise GptlabError(f"{run_dir / CONFIG_FILE} is not a gptlab run config (format {cfg.get('format')!r})")
    if not isinstance(cfg.get("model"), dict):
        raise GptlabError(f"{run_dir / CONFIG_FILE} has no model section (a mapping of model keys); the file is damaged")
    try:  # a hand-edited or damaged model section: named with its file here, not later by whoever reads it
        GPTConfig.from_dict(cfg["model"])
    except GptlabError as e:
        raise GptlabError(f"{run_dir / CONFIG_FILE}: {e}") from None
    if not isinstance(cfg.get("version", 0), int):
        raise GptlabError(f"{run_dir / CONFIG_FILE}: version must be a whole number, got {cfg.get('version')!r}")
    if cfg.get("version", 0) > RUN_VERSION:
        raise GptlabError(f"{run_dir} was written by a newer gptlab (run format v{cfg['version']}); upgrade gptlab")
    return cfg


def check_vocab(model_cfg: GPTConfig, tokenizer: Tokenizer, where: str) -> None:
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise GptlabError(f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{model_cfg.vocab_size} (tokenizer/model vocab mismatch)")


def load_run(run_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
             rows: int = 1) -> Run:
    """Load a run directory for inference: model in eval mode, weights checked against the config.
    dtype: None keeps the stored weights' dtype; a name ('auto', 'bf16', ...) or torch dtype converts them,
    'auto' measured for forwards of `rows` tokens (1: decoding; batch × context: scoring)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    model_cfg = GPTConfig.from_dict(cfg["model"])
    tok = load_tokenizer(run_dir / cfg.get("tokenizer", TOKENIZER_FILE))
    check_vocab(model_cfg, tok, str(run_dir))
    with torch.device("meta"):
        model = GPT(model_cfg)
    _prepare_layers(model, cfg, str(run_dir))
    model = model.to_empty(device=device)
    model.tie_weights()
    load_model_weights(model, run_dir / MODEL_FILE)
    if dtype is not None:
        model = model.to(resolve_dtype(dtype, device, linear_shape(model, rows)))
    return Run(model.eval(), tok, cfg, run_dir)


def describe_run(run_dir: Path) -> dict:
    """What `gptlab info` shows: stage, size, model and tokenizer, latest checkpoint, last val loss."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    mcfg = GPTConfig.from_dict(cfg["model"])
    tok = load_tokenizer(run_dir / cfg.get("tokenizer", TOKENIZER_FILE))
    latest = read_json(run_dir / LATEST_FILE, "latest checkpoint pointer") if (run_dir / LATEST_FILE).exists() else {}
    vals = [m for m in read_metrics(run_dir / METRICS_FILE) if "val_loss" in m]
    return {"run_dir": str(run_dir), "stage": cfg.get("stage"), "parameters": mcfg.num_params(), "model": cfg["model"],
            "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size}, "latest_checkpoint": latest.get("checkpoint"),
            "last_val_loss": vals[-1]["val_loss"] if vals else None, "train": cfg.get("train"), "task": cfg.get("task")}
