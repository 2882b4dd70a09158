"""TrainConfig and the papers' recipes (selected with one flag, overridable key by key)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from gptlab.config import check_ranges, coerce, field
from gptlab.errors import GptlabError
from gptlab.runtime import TRAIN_DTYPES, canonical_dtype
from gptlab.train.loggers import parse_log_to


@dataclass
class TrainConfig:
    recipe: str = field("gpt3", "recipe whose defaults fill unset keys: gpt1 | gpt3 | nanogpt")
    # length
    max_iters: int = field(2000, "optimizer steps to run")
    max_tokens: int = field(0, "stop after this many training tokens (0 = off)")
    # batch: global batch = batch_size × grad_accum × world_size sequences of block_size tokens
    batch_size: int = field(12, "micro-batch sequences per process")
    block_size: int = field(0, "sequence length; 0 = the model's context")
    grad_accum: int = field(1, "micro-steps per optimizer step at the full batch")
    batch_warmup_tokens: int = field(0, "GPT-3 batch warmup: grow the batch linearly over this many tokens (0 = off)")
    batch_start_tokens: int = field(32768, "batch size in tokens at the start of the batch warmup")
    group_by_length: int = field(0, "fine-tuning stages: sort each run of N shuffled examples by length, so a "
                                    "batch pads little (0 = off; e.g. 50 × the batch)")
    # optimizer (AdamW; no weight decay on biases and LayerNorm gains)
    lr: float = field(6e-4, "max learning rate")
    min_lr_ratio: float = field(0.1, "final lr as a fraction of max (GPT-3: 0.1, GPT-1: 0)")
    schedule: str = field("cosine", "cosine | linear | constant decay after warmup")
    warmup_iters: int = field(100, "linear warmup steps (ignored when warmup_tokens > 0)")
    warmup_tokens: int = field(0, "linear warmup measured in tokens (GPT-3: 375M)")
    decay_iters: int = field(0, "steps until lr reaches min (0 = max_iters)")
    decay_tokens: int = field(0, "tokens until lr reaches min (GPT-3: 260B); used when > 0")
    weight_decay: float = field(0.1, "decoupled weight decay on matrices and embeddings")
    beta1: float = field(0.9, "Adam beta1")
    beta2: float = field(0.95, "Adam beta2")
    eps: float = field(1e-8, "Adam epsilon")
    grad_clip: float = field(1.0, "global grad-norm clip (0 = off)")
    # numerics and speed
    dtype: str = field("auto", "compute dtype: auto (bf16 where this GPU/CPU runs it natively and faster) | bfloat16 | float32")
    compile: bool = field(False, "torch.compile the model")
    device: str = field("auto", "auto | cpu | cuda | cuda:N")
    seed: int = field(1337, "seed for init, data order and dropout")
    # distributed (under torchrun)
    distributed: str = field("ddp", "ddp | fsdp (FSDP2 shards params, grads and optimizer state)")
    # eval, logging, checkpoints
    eval_interval: int = field(250, "evaluate every N steps (0 = only at the end)")
    eval_iters: int = field(20, "batches per periodic eval (the final eval covers the whole val split)")
    sample_interval: int = field(0, "print a text sample every N steps (0 = off)")
    sample_tokens: int = field(100, "tokens per text sample")
    log_interval: int = field(10, "log loss/lr/tokens-per-second/MFU every N steps")
    checkpoint_interval: int = field(500, "save a checkpoint every N steps (and at the end)")
    keep_last: int = field(2, "checkpoints to keep")
    peak_flops: float = field(0.0, "declared peak FLOP/s per device for MFU (0 = measure a matmul)")
    log_to: str = field("", "also log to: tensorboard, wandb, trackio (comma-separated; metrics.jsonl is always written)")
    tensorboard: bool = field(False, "also log to TensorBoard (the same as --train.log_to tensorboard)")

    def __post_init__(self) -> None:
        self.dtype = canonical_dtype(self.dtype, TRAIN_DTYPES, "train.dtype")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise GptlabError(f"schedule must be cosine|linear|constant, got {self.schedule!r}")
        parse_log_to(self.log_to)  # an unknown logger is an error now, not after data loading
        if self.distributed not in ("ddp", "fsdp"):
            raise GptlabError(f"distributed must be ddp|fsdp, got {self.distributed!r}")
        check_ranges(self, "train", (
            ("max_iters", self.max_iters >= 0, "≥ 0"), ("max_tokens", self.max_tokens >= 0, "≥ 0"),
            ("batch_size", self.batch_size >= 1, "≥ 1"), ("block_size", self.block_size >= 0, "≥ 0 (0: the model's context)"),
            ("grad_accum", self.grad_accum >= 1, "≥ 1"),
            ("group_by_length", self.group_by_length >= 0, "≥ 0"), ("batch_warmup_tokens", self.batch_warmup_tokens >= 0, "≥ 0"),
            ("batch_start_tokens", self.batch_start_tokens >= 1, "≥ 1"), ("lr", self.lr >= 0, "≥ 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"), ("warmup_iters", self.warmup_iters >= 0, "≥ 0"),
            ("warmup_tokens", self.warmup_tokens >= 0, "≥ 0"), ("decay_iters", self.decay_iters >= 0, "≥ 0"),
            ("decay_tokens", self.decay_tokens >= 0, "≥ 0"), ("weight_decay", self.weight_decay >= 0, "≥ 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("eps", self.eps > 0, "> 0"), ("grad_clip", self.grad_clip >= 0, "≥ 0 (0: off)"),
            ("seed", 0 <= self.seed < 2**63, "in [0, 2^63)"), ("eval_interval", self.eval_interval >= 0, "≥ 0"),
            ("eval_iters", self.eval_iters >= 0, "≥ 0"), ("sample_interval", self.sample_interval >= 0, "≥ 0"),
            ("sample_tokens", self.sample_tokens >= 1, "≥ 1"), ("log_interval", self.log_interval >= 1, "≥ 1"),
            ("checkpoint_interval", self.checkpoint_interval >= 0, "≥ 0"), ("keep_last", self.keep_last >= 1, "≥ 1"),
            ("peak_flops", self.peak_flops >= 0, "≥ 0 (0: measured)")))
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise GptlabError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise GptlabError(f"device {self.device} requested but no CUDA GPU is available")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# GPT-1 (§4.1): Adam max lr 2.5e-4, linear warmup over 2000 updates then cosine to 0, decoupled L2 0.01
# on non-bias/gain weights, batch 64 × 512. GPT-3 (Appendix B): β2 0.95, eps 1e-8, clip 1.0, wd 0.1,
# warmup 375M tokens, cosine to 10% over 260B tokens, batch warmup from 32k tokens over the first
# 4–12B tokens. nanogpt: Karpathy's shakespeare-char CPU recipe.
RECIPES: dict[str, dict] = {
    "gpt1": dict(lr=2.5e-4, warmup_iters=2000, warmup_tokens=0, min_lr_ratio=0.0, schedule="cosine",
                 weight_decay=0.01, beta1=0.9, beta2=0.999, eps=1e-8, grad_clip=0.0, batch_size=64,
                 batch_warmup_tokens=0),
    "gpt3": dict(lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0, min_lr_ratio=0.1,
                 schedule="cosine", warmup_tokens=375_000_000, decay_tokens=260_000_000_000,
                 batch_warmup_tokens=4_000_000_000, batch_start_tokens=32768),
    "nanogpt": dict(lr=1e-3, min_lr_ratio=0.1, warmup_iters=100, warmup_tokens=0, decay_tokens=0, beta1=0.9,
                    beta2=0.99, weight_decay=0.1, grad_clip=1.0, batch_warmup_tokens=0, batch_size=12),
}


def resolve_train(recipe_name: str, recipe: dict, *layers: dict) -> tuple[TrainConfig, set[str]]:
    """TrainConfig defaults ← recipe ← each layer (saved run, YAML, flags) -> (config, the keys the layers set).
    The one resolution every training stage uses."""
    merged: dict = {**recipe}
    given: set[str] = set()
    for layer in layers:
        vals = coerce(TrainConfig, {k: v for k, v in (layer or {}).items() if k != "recipe"}, "train")
        merged.update(vals)
        given |= set(vals)
    merged["recipe"] = recipe_name
    return TrainConfig(**merged), given


def resolve_train_config(recipe: str, *layers: dict) -> TrainConfig:
    """A named recipe of RECIPES ← layers (see resolve_train)."""
    if recipe not in RECIPES:
        raise GptlabError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    return resolve_train(recipe, RECIPES[recipe], *layers)[0]
