"""AdamW with parameter groups, the learning-rate schedule and GPT-3's batch-size warmup."""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

from gptlab.train.config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str,
                   lr_scale: Callable[[str], float] | None = None) -> torch.optim.AdamW:
    """Matrices and embeddings decay; biases and LayerNorm gains (1-D tensors) do not (GPT-1 §4.1, GPT-3).
    With lr_scale(name) (names without DDP/compile prefixes), parameters are further grouped by their lr
    multiplier, kept as the group's "lr_scale" (the engine sets lr = scheduled lr × lr_scale)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # tied weights appear once
    if lr_scale is None:
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        by: dict[tuple[bool, float], list] = {}
        for n, p in params.items():
            name = n.replace("_orig_mod.", "").removeprefix("module.")
            by.setdefault((p.dim() >= 2, float(lr_scale(name))), []).append(p)
        groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": sc}
                  for (decay, sc), ps in by.items()]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu"):
        try:  # one fused kernel per step instead of a loop over tensors
            opt = torch.optim.AdamW(groups, fused=True, **kw)
            opt.register_step_post_hook(_bump_versions)
            return opt
        except (RuntimeError, TypeError):  # e.g. DTensor params under FSDP on some versions
            pass
    return torch.optim.AdamW(groups, foreach=True, **kw)


def _bump_versions(opt: torch.optim.Optimizer, args, kwargs) -> None:
    """The fused kernel updates weights without bumping their version counter (the foreach path does);
    caches keyed on it (the generator's prepacked weights) must see every step, e.g. PPO's rollouts."""
    from torch.autograd.graph import increment_version

    increment_version([p for g in opt.param_groups for p in g["params"]])


def lr_at(cfg: TrainConfig, step: int, tokens: int) -> float:
    """Linear warmup, then cosine/linear decay to min_lr_ratio·lr. Measured in tokens when the recipe
    sets warmup_tokens/decay_tokens (GPT-3), otherwise in optimizer steps (GPT-1, nanoGPT)."""
    if cfg.warmup_tokens > 0 or cfg.decay_tokens > 0:
        pos, warm, end = tokens, cfg.warmup_tokens, cfg.decay_tokens or cfg.max_tokens
    else:
        pos, warm, end = step, cfg.warmup_iters, cfg.decay_iters or cfg.max_iters
    min_lr = cfg.lr * cfg.min_lr_ratio
    if warm > 0 and pos < warm:
        return cfg.lr * (pos + 1) / (warm + 1)
    if cfg.schedule == "constant" or end <= warm:
        return cfg.lr
    frac = min(1.0, (pos - warm) / max(1, end - warm))
    coeff = 0.5 * (1.0 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1.0 - frac
    return min_lr + coeff * (cfg.lr - min_lr)


def accum_at(cfg: TrainConfig, tokens: int, tokens_per_micro: int) -> int:
    """Gradient-accumulation count for this step. GPT-3 grows the batch in tokens linearly from
    batch_start_tokens to the full batch over batch_warmup_tokens; we realise it by accumulating fewer
    micro-batches early on. tokens_per_micro counts all processes (batch_size × block × world)."""
    full = cfg.grad_accum
    if cfg.batch_warmup_tokens <= 0 or tokens >= cfg.batch_warmup_tokens:
        return full
    start = min(cfg.batch_start_tokens, full * tokens_per_micro)
    want = start + (full * tokens_per_micro - start) * tokens / cfg.batch_warmup_tokens
    return max(1, min(full, math.ceil(want / tokens_per_micro)))
