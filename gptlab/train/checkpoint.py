"""Training checkpoints inside a run directory (gptlab.run.format): safetensors for every tensor (weights,
optimizer state, RNG states), JSON for everything else, atomic writes.

  checkpoints/step_0000500/ model.safetensors, optimizer.safetensors (+ RNG states), state.json
                            FSDP: dcp/ instead of the weights and optimizer state: torch.distributed.checkpoint
                            shards written by every rank (nothing gathered), readable by any number of
                            processes; optimizer.safetensors keeps the RNG states
  latest.json               which checkpoint --resume continues from

A checkpoint directory is written under a temporary name and renamed into place, and latest.json is
replaced atomically afterwards: a crash at any point leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write, atomic_write_json, read_json, save_tensors
from gptlab.run.format import LATEST_FILE, MODEL_FILE, read_safetensors

DCP_DIR = "dcp"  # a sharded (FSDP) checkpoint's torch.distributed.checkpoint folder


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- optimizer and trainer state -----------------------------------------------------------------
def optimizer_tensors(opt_sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into flat tensors (safetensors, keys `opt|param|name`) and JSON-able rest."""
    tensors, scalars = {}, {}
    for pid, st in opt_sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt|{pid}|{k}"] = v.detach().contiguous()
            else:
                scalars[f"{pid}|{k}"] = v
    return tensors, {"param_groups": opt_sd["param_groups"], "scalars": scalars}


def _pid(pid: str):
    return int(pid) if pid.isdigit() else pid  # plain optimizers key by index, FSDP full state dicts by name


def optimizer_state_from(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for name, v in tensors.items():
        if name.startswith("opt|"):
            _, pid, k = name.split("|", 2)
            state.setdefault(_pid(pid), {})[k] = v
    for name, v in meta.get("scalars", {}).items():
        pid, k = name.split("|", 1)
        state.setdefault(_pid(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int = 2):
        self.run_dir, self.keep_last = Path(run_dir), max(1, keep_last)
        self.ckpt_dir = self.run_dir / "checkpoints"

    def staging(self, step: int, fresh: bool = True) -> Path:
        """The temporary directory step N's checkpoint is written in (emptied when `fresh`); a sharded
        checkpoint's ranks write their shards there before rank 0 completes it with `save`."""
        tmp = self.ckpt_dir / f".step_{step:07d}.tmp"
        if fresh:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        return tmp

    def save(self, step: int, opt_sd: dict | None, state: dict, model_sd: dict[str, torch.Tensor] | None,
             extra: dict[str, torch.Tensor] | None = None, export_sd: dict[str, torch.Tensor] | None = None,
             staged: bool = False) -> Path:
        """Write checkpoints/step_N (weights, optimizer + `extra` tensors such as RNG states, state.json),
        then the top-level weights, then latest.json: each step atomic, the previous one intact until then.
        The top-level weights are a copy of the checkpoint's, or `export_sd` when given (e.g. PPO's actor
        alone, while its checkpoints also hold the critic). `staged`: the staging directory already holds
        the checkpoint's shards (`model_sd` None; `export_sd` is then the run's weights)."""
        final = self.ckpt_dir / f"step_{step:07d}"
        tmp = self.staging(step, fresh=not staged)
        try:
            if model_sd is not None:
                save_tensors(model_sd, tmp / MODEL_FILE, metadata={"format": "gptlab"})
            tensors, opt_meta = optimizer_tensors(opt_sd) if opt_sd is not None else ({}, None)
            save_tensors({**(extra or {}), **tensors}, tmp / "optimizer.safetensors")
            (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_meta}, indent=2))
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        except BaseException:  # e.g. a full disk: free what was written at once
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():  # a stale folder from a crash after its rename but before latest.json moved
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.ckpt_dir)
        try:
            if export_sd is None:
                atomic_write(self.run_dir / MODEL_FILE, lambda p: shutil.copyfile(final / MODEL_FILE, p))
            else:
                atomic_write(self.run_dir / MODEL_FILE, lambda p: save_tensors(export_sd, p, metadata={"format": "gptlab"}))
            atomic_write_json(self.run_dir / LATEST_FILE, {"step": step, "checkpoint": final.name})
        except BaseException:  # latest.json still names the previous checkpoint: this one is not part of the run
            shutil.rmtree(final, ignore_errors=True)
            raise
        _fsync_dir(self.run_dir)
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        steps = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir() and p != keep)
        for old in steps[: max(0, len(steps) - (self.keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        if not (self.run_dir / LATEST_FILE).exists():
            return None
        path = self.ckpt_dir / read_json(self.run_dir / LATEST_FILE, "latest checkpoint pointer")["checkpoint"]
        if not path.is_dir():
            raise GptlabError(f"latest checkpoint {path} is missing; the run directory was modified by hand")
        return path

    def load(self, path: Path) -> tuple[dict, dict | None, dict, dict[str, torch.Tensor]]:
        """-> (model state dict, optimizer state dict or None, state.json, extra tensors such as RNG states);
        a sharded checkpoint (state["sharded"]) returns no model or optimizer state: they are read from its
        dcp/ folder by the ranks that load them."""
        state = read_json(path / "state.json", "trainer state")
        extra = read_safetensors(path / "optimizer.safetensors", "optimizer state")
        opt = optimizer_state_from(extra, state["optimizer"]) if state.get("optimizer") else None
        extra = {k: v for k, v in extra.items() if not k.startswith("opt|")}
        if state.get("sharded"):
            return None, None, state, extra
        return read_safetensors(path / MODEL_FILE, "model weights"), opt, state, extra
