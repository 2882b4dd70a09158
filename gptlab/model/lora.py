"""LoRA (Hu et al. 2021): a frozen weight W plus a trained low-rank update, y = x·Wᵀ + (α/r)·x·Aᵀ·Bᵀ with
A (r, in) and B (out, r), B = 0 at the start so training begins from the base model exactly. QLoRA (Dettmers
et al. 2023) is the same adapter over a base stored quantized: any module with `dequantize()` (gptlab's
int8 / 4-bit layers) serves as W.

New token rows (the chat tokens SFT adds) cannot be learned through a frozen embedding: `TrainedRows` keeps
those rows as trained values over the frozen table (PEFT's trainable tokens), and a tied LM head reads the
same rows (`TiedHead`).

Module names stay the model's (`h.0.attn.c_attn.lora_A`), so a merged state dict is a plain GPT's and the
PEFT names are the HF names plus the adapter suffix (gptlab.run.adapter).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

# the Linear layers of a block, by the names HF GPT-2 / GPT-1 give them too
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def base_weight(m: nn.Module, dtype=torch.float32) -> torch.Tensor:
    """The dense (out, in) weight of a Linear or of a quantized layer (its dequantized codes)."""
    return m.dequantize(dtype) if hasattr(m, "dequantize") else m.weight.detach().to(dtype)


class LoRALinear(nn.Module):
    """A frozen `base` layer (nn.Linear or a quantized one) plus the trained update (α/r)·B·A."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        dev = next(iter([*base.parameters(), *base.buffers()])).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT and the paper's code: A random, B zero
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = self.base(x)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B) * self.scaling

    def delta(self, dtype=torch.float32) -> torch.Tensor:
        """(α/r)·B·A: (out, in), what merging adds to the base weight."""
        return (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}"


class TrainedRows(nn.Module):
    """A frozen embedding table or LM head whose rows `ids` are trained: weight = base with those rows
    replaced by `rows` (initialised to the base's values)."""

    def __init__(self, base: nn.Module, ids: Iterable[int]):
        super().__init__()
        self.base = base
        ids = torch.as_tensor(list(ids), dtype=torch.long, device=base.weight.device)
        self.register_buffer("ids", ids)
        self.rows = nn.Parameter(base.weight.detach()[ids].clone().float())

    @property
    def weight(self) -> torch.Tensor:
        w = self.base.weight
        return w.index_copy(0, self.ids, self.rows.to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, nn.Embedding):
            return F.embedding(x, self.weight)
        return F.linear(x, self.weight, self.base.bias)


class TiedHead(nn.Module):
    """The LM head of a tied model whose embedding has trained rows: the same rows, no tensor of its own."""

    def __init__(self, emb: TrainedRows):
        super().__init__()
        self._emb = [emb]  # a plain list: not a second registered owner of the embedding's tensors

    @property
    def weight(self) -> torch.Tensor:
        return self._emb[0].weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


def target_names(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """The block Linear layers named by `targets`: name suffixes (c_attn, c_proj, c_fc, mlp.c_proj) or full
    names (h.0.attn.c_attn)."""
    targets = tuple(t.strip() for t in targets if t.strip())
    return [n for n, m in model.named_modules() if n.startswith("h.") and n.split(".", 2)[-1] in BLOCK_LINEARS
            and any(n == t or n.endswith("." + t) for t in targets)]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets: Iterable[str],
             quantize: Callable[[nn.Linear], nn.Module] | None = None, token_ids: Iterable[int] = ()) -> list[str]:
    """Freeze `model` and give it adapters -> the adapted layer names. With `quantize`, every block Linear's
    base is replaced by `quantize(linear)` (QLoRA: all of them, adapted or not). A task head stays trained
    (PEFT's modules_to_save); `token_ids` get trained embedding (and untied head) rows."""
    names = target_names(model, targets)
    if not names:
        raise ValueError(f"no layer matches the LoRA targets {', '.join(targets)} (block layers: {', '.join(BLOCK_LINEARS)})")
    for p in model.parameters():
        p.requires_grad_(False)
    if quantize is not None:
        for n, m in list(model.named_modules()):
            if n.startswith("h.") and n.split(".", 2)[-1] in BLOCK_LINEARS and isinstance(m, nn.Linear):
                q = quantize(m)
                for p in q.parameters():
                    p.requires_grad_(False)
                _set(model, n, q)
    for n in names:
        _set(model, n, LoRALinear(model.get_submodule(n), r, alpha, dropout))
    ids = sorted(set(int(i) for i in token_ids))
    if ids:
        tied = model.lm_head.weight is model.wte.weight
        model.wte = TrainedRows(model.wte, ids)
        model.lm_head = TiedHead(model.wte) if tied else TrainedRows(model.lm_head, ids)
    if getattr(model, "head", None) is not None:
        for p in model.head.parameters():
            p.requires_grad_(True)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, TrainedRows)) for m in model.modules())


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Run `model` as its frozen base (e.g. as PPO's or DPO's reference: no second copy of the weights).
    Trained token rows stay: the base has no meaning for tokens it never had."""
    layers = list(lora_layers(model).values())
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.enabled = b


@torch.no_grad()
def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter merged: W + (α/r)·B·A (a quantized base dequantized),
    trained rows written into their table; a tied LM head left out (stored as wte.weight)."""
    special = {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, TrainedRows, TiedHead))}
    skip = tuple(f"{n}." for n in special)
    out = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith(skip)}
    for n, m in special.items():
        if isinstance(m, LoRALinear):
            w = base_weight(m.base) + m.delta()
            out[f"{n}.weight"] = w
            if m.base.bias is not None:
                out[f"{n}.bias"] = m.base.bias.detach().float()
        elif isinstance(m, TrainedRows):
            out[f"{n}.weight"] = m.weight.detach().float()
            if getattr(m.base, "bias", None) is not None:
                out[f"{n}.bias"] = m.base.bias.detach()
    if isinstance(special.get("lm_head"), TiedHead) or getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        out.pop("lm_head.weight", None)  # stored once, as wte.weight
    return {k: v.contiguous() for k, v in out.items()}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors by module name: {name: {"A", "B"}} flattened as `name.lora_A` / `name.lora_B`,
    trained rows as `wte.rows` (their ids in `wte.ids`), the task head's tensors under their own names."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            out[f"{n}.lora_A"], out[f"{n}.lora_B"] = m.lora_A.detach(), m.lora_B.detach()
        elif isinstance(m, TrainedRows):
            out[f"{n}.rows"], out[f"{n}.ids"] = m.rows.detach(), m.ids
    if getattr(model, "head", None) is not None:
        out.update({f"head.{k}": v.detach() for k, v in model.head.state_dict().items()})
    return {k: v.contiguous() for k, v in out.items()}
