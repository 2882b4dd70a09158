"""The run-directory format: file names, and model weights in safetensors (read, write, load into a model).

run_dir/
  config.json               model config + what produced it ("format": "gptlab-run")
  model.safetensors         latest good weights (what every other command loads)
  tokenizer.gptlab.json     the tokenizer
  checkpoints/step_0000500/ model.safetensors, optimizer.safetensors (+ RNG states), state.json
  latest.json               which checkpoint --resume continues from (gptlab.train.checkpoint)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write, save_tensors

RUN_FORMAT, RUN_VERSION = "gptlab-run", 1
MODEL_FILE, CONFIG_FILE, LATEST_FILE = "model.safetensors", "config.json", "latest.json"
METRICS_FILE = "metrics.jsonl"  # one JSON object per logged event (gptlab.train.metrics writes it)


def read_safetensors(path: Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise GptlabError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise GptlabError(f"{what} {path} is corrupt or truncated ({e}); it is not a readable safetensors file") from None


def tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that are a second name of one registered earlier (a tied LM head): stored once."""
    unique = {n for n, _ in model.named_parameters()}
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - unique


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights to save: every tensor once (a tied LM head is stored as wte.weight)."""
    tied = tied_names(model)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}


def save_model(model: torch.nn.Module, path: Path) -> None:
    sd = model_state(model)
    atomic_write(path, lambda p: save_tensors(sd, p, metadata={"format": "gptlab"}))


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Load weights with shape and key checks; a foreign or mismatched file is a one-line error."""
    load_state_into(model, read_safetensors(path, "model weights"), path)


def load_state_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], path) -> None:
    """Checked load: the keys and shapes of `sd` must be exactly the model's (tied copies not counted)."""
    expected = model_state(model)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise GptlabError(f"{path} does not match this model (not a gptlab checkpoint of this config?): "
                          f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                          f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            hint = " (tokenizer/model vocab mismatch)" if k == "wte.weight" else ""
            raise GptlabError(f"{path}: {k} has shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}{hint}")
    model.load_state_dict(sd, strict=False)  # the tied names are filled through the tensor they share


def parse_metrics(text: str) -> list[dict]:
    out = []
    for ln in text.splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return out


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    return parse_metrics(path.read_text()) if path.exists() else []
