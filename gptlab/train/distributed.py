"""Several processes under torchrun: DistributedDataParallel, or FSDP2 for models that do not fit.

Launched with `torchrun --nproc_per_node N -m gptlab pretrain ...`; without torchrun's environment
everything here degrades to a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda") or device_pref.startswith("cuda")
    if world <= 1:
        if device_pref == "auto":
            return DistInfo(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(), torch.device(device_pref)
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if cuda:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return info, device


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device, mode: str) -> nn.Module:
    """DDP replicates the model; FSDP2 (fully_shard) shards each block and the root."""
    if not info.enabled:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def load_sharded(model: nn.Module, optimizer, model_sd, opt_sd) -> None:
    """Scatter full (unsharded) state dicts into an FSDP2 model and its optimizer (checkpoints of FSDP runs
    before they were written sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=opt_sd or {},
                   options=StateDictOptions(full_state_dict=True, strict=False))


def save_dcp(model: nn.Module, optimizer, path) -> None:
    """Every rank writes its own shards of the model and optimizer state (torch.distributed.checkpoint):
    nothing is gathered; the files reshard on load to any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, opt_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=str(path))


def load_dcp(model: nn.Module, optimizer, path, distributed: bool) -> None:
    """Read a `save_dcp` checkpoint into this model and optimizer, whatever the number of processes that
    wrote it (FSDP2 here or not: a single process reads the whole state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, opt_sd = get_state_dict(model, optimizer)  # (initialises the optimizer state it reads into)
    state = {"model": model_sd, "optim": opt_sd}
    dcp.load(state, checkpoint_id=str(path), no_dist=not distributed)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_model_state(model: nn.Module) -> dict:
    """The FSDP2 model's full weights on CPU, on rank 0 (the run's model.safetensors); {} elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_objects(obj, info: DistInfo) -> list:
    """One small picklable object from every rank (e.g. RNG states), in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
