"""Several LoRA adapters over one served base, chosen per request by its `model` field, in one batch
(`gptlab serve RUN --lora NAME=DIR`), as S-LoRA / Punica serve them: the base weights are shared, and each
adapted layer adds its rows' own low-rank update,

  y_i = x_i·Wᵀ + x_i·A_{a(i)}ᵀ·B_{a(i)}ᵀ       (a(i): row i's adapter; adapter 0 is the base: A = B = 0)

with the adapters' A and B stacked (ranks padded with zeros, α/r folded into B) and gathered per row, two
batched matmuls per layer. Which adapter each row uses is set per forward (`route`), per thread: the engine
thread and the embeddings thread share the model.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.run.adapter import ADAPTER_DIR, read_adapter

CONFIG = "config.json"


class AdapterBank:
    """The served adapters' names and the rows' routing (thread-local)."""

    def __init__(self, names: list[str]):
        self.names = names  # index i + 1 is names[i]; 0 is the base
        self._local = threading.local()

    def index(self, name: str) -> int | None:
        return self.names.index(name) + 1 if name in self.names else None

    def route(self, ids: list[int] | None) -> None:
        """The adapter of each row of the next forwards in this thread (None or all 0: the base alone)."""
        self._local.ids = None if not ids or not any(ids) else ids

    def current(self, device) -> tuple[torch.Tensor | None, int | None]:
        """-> (row ids as a tensor, or None; the one adapter every row uses, or None when they differ)."""
        ids = getattr(self._local, "ids", None)
        if ids is None:
            return None, 0
        first = ids[0]
        if all(i == first for i in ids):
            return None, first
        cached = getattr(self._local, "tensor", None)
        if cached is None or cached[0] is not ids:
            self._local.tensor = (ids, torch.tensor(ids, device=device))
        return self._local.tensor[1], None


class MultiLoRALinear(nn.Module):
    """A base Linear plus stacked adapters, applied per row as the bank routes."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, bank: AdapterBank):
        super().__init__()
        self.base, self.bank = base, bank
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("A", A)  # (n + 1, r, in)
        self.register_buffer("B", B)  # (n + 1, out, r), scaled by α/r

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in) -> (B, T, out)
        y = self.base(x)
        ids, one = self.bank.current(x.device)
        if one == 0:
            return y
        A, B = self.A.to(x.dtype), self.B.to(x.dtype)
        if one is not None:  # every row uses the same adapter: two plain matmuls
            return y + (x @ A[one].T) @ B[one].T
        return y + torch.bmm(torch.bmm(x, A[ids].transpose(1, 2)), B[ids].transpose(1, 2))


def _adapter_dir(path: Path) -> Path:
    return path / ADAPTER_DIR if (path / CONFIG).is_file() else path


def check_adapters(specs: list[tuple[str, str | Path]]) -> None:
    """Each NAME=DIR reads as a LoRA adapter (before the model loads, so a bad one stops the server at once)."""
    for _, d in specs:
        read_adapter(_adapter_dir(Path(d)))


def install_adapters(model: nn.Module, specs: list[tuple[str, str | Path]]) -> AdapterBank:
    """Read each NAME=DIR adapter (a LoRA run dir or a PEFT adapter dir), check it fits `model`, and give the
    adapted layers their stacked A and B -> the bank that routes rows."""
    bank = AdapterBank([name for name, _ in specs])
    layers: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    modules = dict(model.named_modules())
    for k, (name, path) in enumerate(specs, start=1):
        d = _adapter_dir(Path(path))
        config, state = read_adapter(d)
        if any(key.endswith(".rows") for key in state):
            raise GptlabError(f"--lora {name}: {d} trains token rows (it added tokens to its base); serve its merged "
                              "run instead, or train it over a base that already has those tokens")
        if any(key.startswith("head.") for key in state):
            raise GptlabError(f"--lora {name}: {d} carries a task head (a reward or classifier adapter), not a "
                              "language model's")
        scale = float(config.get("lora_alpha", config["r"])) / config["r"]
        for key in state:
            if key.endswith(".lora_A"):
                layer = key.removesuffix(".lora_A")
                m = modules.get(layer)
                a, b = state[key], state[f"{layer}.lora_B"]
                if not isinstance(m, nn.Linear) or a.size(1) != m.in_features or b.size(0) != m.out_features:
                    raise GptlabError(f"--lora {name}: {d} does not fit this model ({layer}); it was trained over "
                                      "another base")
                layers.setdefault(layer, {})[k] = (a, b * scale)
    for layer, per in layers.items():
        base = modules[layer]
        r = max(a.size(0) for a, _ in per.values())
        w = base.weight
        A = torch.zeros(len(specs) + 1, r, base.in_features, dtype=w.dtype, device=w.device)
        B = torch.zeros(len(specs) + 1, base.out_features, r, dtype=w.dtype, device=w.device)
        for k, (a, b) in per.items():  # a smaller rank is padded with zeros: the same product
            A[k, :a.size(0)], B[k, :, :b.size(1)] = a, b
        parent, _, child = layer.rpartition(".")
        setattr(model.get_submodule(parent), child, MultiLoRALinear(base, A, B, bank))
    return bank


def parse_lora_args(values: list[str] | None) -> list[tuple[str, str]]:
    """--lora NAME=DIR (repeatable) -> [(name, dir)]; names unique."""
    out = []
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise GptlabError(f"--lora takes NAME=DIR, got {v!r}")
        if not Path(path).is_dir():
            raise GptlabError(f"--lora {name}: {path} is not a directory")
        out.append((name.strip(), path.strip()))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise GptlabError("--lora names must differ")
    return out
