"""How a compressed run is recorded, written and rebuilt.

A compressed run is an ordinary run dir (config.json + model.safetensors + tokenizer). config.json gains

  "compression": {"format": "gptlab-compress", "version": 1,
                  "steps": [{"method": "gptq", "bits": 4, ...}, ...],      what was done, in order
                  "modules": {"h.0.attn.c_attn": {"kind": "intn", "bits": 4, "group_size": 128}, ...}}

`modules` names the Linear layers stored in a quantized layout; `gptlab.run.load_run` calls
`prepare_model` on the freshly built (meta) model to swap those layers for their quantized modules before
the weights load, so generate, chat, evaluate and serve load compressed runs unchanged. Pruned layers need
no entry (dense weights with zeros), and structured pruning is just a smaller GPTConfig. A format, version
or module kind this gptlab does not know is refused with a one-line error.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from gptlab.compress.quant import Int8Linear, IntNLinear, LLMInt8Linear
from gptlab.errors import GptlabError
from gptlab.run import register_layout, write_run_config
from gptlab.run.format import MODEL_FILE, model_state, save_model

FORMAT, VERSION = "gptlab-compress", 1
KINDS = {"int8": Int8Linear, "llm-int8": LLMInt8Linear, "intn": IntNLinear}


def module_spec(mod: nn.Module) -> dict | None:
    """The record entry that rebuilds `mod` (None for a plain nn.Linear)."""
    if isinstance(mod, LLMInt8Linear):  # before Int8Linear: it is one (same weights, another forward)
        return {"kind": "llm-int8", "threshold": mod.threshold}
    if isinstance(mod, Int8Linear):
        return {"kind": "int8"}
    if isinstance(mod, IntNLinear):
        return {"kind": "intn", "bits": mod.bits, "group_size": mod.group_size}
    return None


def build_record(model: nn.Module, steps: list[dict]) -> dict:
    modules = {}
    for name, mod in model.named_modules():
        spec = module_spec(mod)
        if spec is not None:
            modules[name] = spec
    return {"format": FORMAT, "version": VERSION, "steps": steps, "modules": modules}


def check_record(rec, where: str = "run") -> None:
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        fmt = rec.get("format") if isinstance(rec, dict) else rec
        raise GptlabError(f"{where}: unknown compression format {fmt!r} (this gptlab reads {FORMAT!r} v{VERSION})")
    if rec.get("version") != VERSION:
        raise GptlabError(f"{where}: compression format version {rec.get('version')!r} is not supported "
                          f"(this gptlab reads v{VERSION}); upgrade gptlab")
    if not isinstance(rec.get("modules", {}), dict) or not isinstance(rec.get("steps", []), list):
        raise GptlabError(f"{where}: corrupt compression record (modules must be a mapping, steps a list)")
    for name, spec in rec.get("modules", {}).items():
        if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
            kind = spec.get("kind") if isinstance(spec, dict) else spec
            raise GptlabError(f"{where}: layer {name} has unknown compressed kind {kind!r} "
                              f"(known: {', '.join(KINDS)})")


def make_module(spec: dict, lin: nn.Linear) -> nn.Module:
    """An empty quantized module with `lin`'s shape, on `lin`'s device (meta while loading)."""
    kind, bias, dev = spec["kind"], lin.bias is not None, lin.weight.device
    try:
        if kind == "int8":
            return Int8Linear(lin.in_features, lin.out_features, bias, device=dev)
        if kind == "llm-int8":
            return LLMInt8Linear(lin.in_features, lin.out_features, bias, float(spec.get("threshold", 6.0)), device=dev)
        return IntNLinear(lin.in_features, lin.out_features, bias, int(spec["bits"]), int(spec.get("group_size", 0)),
                          device=dev)
    except (KeyError, TypeError, ValueError) as e:
        raise GptlabError(f"corrupt compressed-layer spec {spec!r}: {e}") from None


def prepare_model(model: nn.Module, rec: dict, where: str = "run") -> nn.Module:
    """Swap the recorded layers of a freshly built model for their quantized modules (before loading)."""
    check_record(rec, where)
    for name, spec in rec.get("modules", {}).items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            lin = getattr(parent, attr)
        except AttributeError:
            raise GptlabError(f"{where}: compressed layer {name} does not exist in this model config") from None
        if not isinstance(lin, nn.Linear):
            raise GptlabError(f"{where}: compressed layer {name} is not a Linear layer")
        setattr(parent, attr, make_module(spec, lin))
    return model


def check_dense_source(cfg: dict, where) -> list[dict]:
    """Earlier compression steps of a source run; quantized sources cannot be compressed again."""
    rec = cfg.get("compression")
    if rec is None:
        return []
    check_record(rec, str(where))
    if rec.get("modules"):
        raise GptlabError(f"{where} is already quantized; compress the original (dense or pruned) run instead")
    return list(rec.get("steps", []))


def save_compressed(model, tokenizer, out_dir, src_cfg: dict, src_dir, steps: list[dict]) -> Path:
    """Write a run dir: weights first, then config.json (so a run dir with a config has its weights)."""
    out = Path(out_dir)
    if out.resolve() == Path(src_dir).resolve():
        raise GptlabError(f"--out {out} is the source run; write the compressed run to another directory")
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out / MODEL_FILE)
    # keep what the source stage recorded (stage, task, reward, train, ...): a compressed classifier or reward
    # model still works as one; the compression record says what was done to it
    own = {"format", "version", "gptlab", "model", "tokenizer", "compression", "compressed_from"}
    extra = {k: v for k, v in src_cfg.items() if k not in own}
    write_run_config(out, model.cfg, tokenizer, compressed_from=str(Path(src_dir).resolve()),
                     compression=build_record(model, steps), **extra)
    return out


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a checkpoint of `model` holds (tied head counted once)."""
    return sum(t.numel() * t.element_size() for t in model_state(model).values())


def stored_params(model: nn.Module) -> int:
    """Weights the model represents (tied head once): quantized layers count their logical elements
    (4-bit codes: 2 a byte); quantization scales and zero points are metadata, not parameters."""
    seen, n = set(), 0
    for mod in model.modules():
        for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            if id(t) in seen or name in ("weight_scale", "scales", "zeros"):
                continue
            seen.add(id(t))
            n += t.numel() * (2 if name == "qweight" else 1)
    return n


register_layout("compression", prepare_model)  # load_run rebuilds a compressed run's layers through this
