"""LoRA / QLoRA for every training stage: `--lora.r R` trains adapters over a frozen base, the same way in
each stage (the `lora:` section of the run's config.json, resumed as it started).

What a LoRA run directory holds:
- model.safetensors: the merged model (base + (α/r)·B·A), a plain GPT, so evaluate, chat, serve, convert and
  the next stage load it as any run;
- adapter/: the adapter alone in PEFT's format (gptlab.run.adapter), for `peft`, `gptlab serve --lora` and
  `gptlab lora merge`;
- checkpoints/: the whole module (frozen base included, quantized for QLoRA) and the optimizer state of the
  trained tensors only, so a resume is exact and needs nothing outside the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab.config import check_ranges, coerce, field
from gptlab.errors import GptlabError
from gptlab.model.lora import BLOCK_LINEARS, add_lora, adapter_state, has_lora, merged_state
from gptlab.run.adapter import ADAPTER_DIR, save_adapter

QUANTIZE = ("none", "int8", "int4")


@dataclass
class LoRAConfig:
    r: int = field(0, "LoRA rank: train adapters of rank r over a frozen base (0 = off: every weight trains)")
    alpha: float = field(16.0, "LoRA scale α: the update is (α/r)·B·A")
    dropout: float = field(0.0, "dropout on the adapters' input")
    targets: str = field("c_attn,c_proj,c_fc", "block layers to adapt, comma-separated: c_attn, c_proj (both), "
                                                "attn.c_proj, mlp.c_proj, c_fc")
    quantize: str = field("none", "QLoRA: store the frozen base's block layers as int8 | int4 (none: as they are)")
    group_size: int = field(64, "int4 QLoRA: weights per quantization group (0 = one per row)")

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE:
            raise GptlabError(f"lora.quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        check_ranges(self, "lora", (("r", self.r >= 0, "≥ 0 (0: off)"), ("alpha", self.alpha > 0, "> 0"),
                                    ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                                    ("group_size", self.group_size >= 0, "≥ 0")))
        names = [t.strip() for t in self.targets.split(",") if t.strip()]
        bad = [t for t in names if not any(layer == t or layer.endswith("." + t) for layer in BLOCK_LINEARS)]
        if not names or bad:
            raise GptlabError(f"lora.targets: {', '.join(bad) or '(none)'} is no block layer; choose from c_attn, c_proj, "
                              "attn.c_proj, mlp.c_proj, c_fc")
        if self.quantize != "none" and self.r == 0:
            raise GptlabError("lora.quantize needs adapters to train: set --lora.r too")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def add_lora_args(parser) -> None:
    """The --lora.KEY flags of a training command."""
    from gptlab.config import add_dataclass_args

    add_dataclass_args(parser, LoRAConfig, "lora", "LoRA / QLoRA: train adapters over a frozen base (--lora.KEY VALUE)")


def resolve_lora(st, given: dict | None) -> LoRAConfig:
    """The stage's LoRA settings: the flags / YAML for a new run; on resume the saved ones (changing them
    would not fit the checkpoint)."""
    if not st.resume:
        return LoRAConfig(**coerce(LoRAConfig, given or {}, "lora"))
    saved = {k: v for k, v in (st.saved.get("lora") or {}).items() if k != "token_ids"}
    cfg = LoRAConfig(**coerce(LoRAConfig, saved, "lora"))
    changed = [k for k, v in coerce(LoRAConfig, given or {}, "lora").items() if getattr(cfg, k) != v]
    if changed:
        raise GptlabError(f"--lora.{changed[0]} cannot change when resuming (the checkpoint holds the run's adapters); "
                          "start a new run from its weights instead")
    return cfg


def _quantizer(cfg: LoRAConfig):
    if cfg.quantize == "none":
        return None
    from gptlab.compress.quant import Int8Linear, rtn_intn

    if cfg.quantize == "int8":
        return Int8Linear.from_linear

    def int4(lin):
        g = cfg.group_size if cfg.group_size and lin.in_features % cfg.group_size == 0 else 0
        return rtn_intn(lin, 4, g)

    return int4


def attach(model: torch.nn.Module, cfg: LoRAConfig, token_ids=(), quiet: bool = False) -> dict | None:
    """Freeze `model` and add the adapters (and trained rows for `token_ids`, the tokens this stage added)
    -> the run config's `lora` section, or None when LoRA is off."""
    if not cfg.enabled:
        return None
    total = sum(p.numel() for p in model.parameters())
    add_lora(model, cfg.r, cfg.alpha, cfg.dropout, cfg.targets.split(","), _quantizer(cfg), token_ids)
    section = {**cfg.to_dict(), "token_ids": sorted(int(i) for i in token_ids)}
    model.lora_section = section  # what fit() writes the adapter with
    if not quiet:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        base = "" if cfg.quantize == "none" else f", base stored {cfg.quantize}"
        print(f"lora: rank {cfg.r}, α {cfg.alpha:g} on {cfg.targets}{base} · {trained:,} trained parameters "
              f"({100 * trained / max(total, 1):.2f}% of {total:,})"
              + (f" · {len(token_ids)} new token rows trained" if len(token_ids) else ""))
    return section


def resume_token_ids(st) -> list[int]:
    return list((st.saved.get("lora") or {}).get("token_ids", [])) if st.resume else []


def write_adapter(model: torch.nn.Module, run_dir: Path, base: str | None = None) -> Path:
    """OUT/adapter/ in PEFT's format, from the model's current adapters."""
    post_ln = getattr(getattr(model, "cfg", None), "norm", "pre") == "post"
    return save_adapter(Path(run_dir) / ADAPTER_DIR, adapter_state(model), model.lora_section, post_ln, base)


def lora_hooks(model: torch.nn.Module, run_dir: Path, on_checkpoint=None, base: str | None = None) -> dict:
    """Trainer keyword arguments for a model with adapters: the merged model as the run's model.safetensors,
    the adapter directory rewritten with each checkpoint. {} for a model without."""
    if not has_lora(model):
        return {}

    def checkpointed() -> None:
        write_adapter(model, run_dir, base)
        if on_checkpoint is not None:
            on_checkpoint()

    return {"export_fn": lambda _sd: merged_state(model), "on_checkpoint": checkpointed}
