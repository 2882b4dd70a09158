"""LoRA adapters on disk in PEFT's format, so `peft.PeftModel.from_pretrained(hf_model, ADAPTER_DIR)` loads
what gptlab trained over the model `gptlab convert --to-hf` exports:

  adapter_config.json         PEFT LoraConfig (peft_type LORA, r, lora_alpha, target_modules, fan_in_fan_out:
                              GPT-2's Conv1D layers; trainable_token_indices for trained token rows)
  adapter_model.safetensors   base_model.model.transformer.h.N.<layer>.lora_{A,B}.weight (A (r, in), B (out, r)),
                              ...wte.token_adapter.trainable_tokens_delta (the trained rows' values)
  head.safetensors            a task head (reward / value / classifier), which PEFT's causal LM has no place for

Names are the HF ones: the block layers are named alike in both (gptlab.interop.hf), GPT-1's embedding is
HF's tokens_embed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write, save_tensors
from gptlab.run.format import read_safetensors

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_WEIGHTS = "adapter_config.json", "adapter_model.safetensors", "head.safetensors"
PREFIX = "base_model.model."
ROWS_SUFFIX = ".token_adapter.trainable_tokens_delta"


def _hf_module(name: str, post_ln: bool) -> str:
    if name == "lm_head":
        return name
    if post_ln and name == "wte":
        return "transformer.tokens_embed"
    return f"transformer.{name}"


def _our_module(hf: str) -> str:
    name = hf.removeprefix("transformer.")
    return "wte" if name == "tokens_embed" else name


def peft_files(state: dict[str, torch.Tensor], lora: dict, post_ln: bool, base: str | None = None) -> tuple[dict, dict, dict]:
    """gptlab.model.lora.adapter_state + its settings -> (adapter_config, PEFT tensors, head tensors)."""
    tensors, head, token_ids = {}, {}, {}
    for k, v in state.items():
        module, _, leaf = k.rpartition(".")
        if k.startswith("head."):
            head[k] = v
        elif leaf in ("lora_A", "lora_B"):
            tensors[f"{PREFIX}{_hf_module(module, post_ln)}.{leaf}.weight"] = v.float()
        elif leaf == "rows":
            tensors[f"{PREFIX}{_hf_module(module, post_ln)}{ROWS_SUFFIX}"] = v.float()
        elif leaf == "ids":
            token_ids[_hf_module(module, post_ln).removeprefix("transformer.")] = [int(i) for i in v.tolist()]
    targets = sorted({t.strip() for t in lora["targets"].split(",") if t.strip()})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["r"], "lora_alpha": lora["alpha"],
              "lora_dropout": lora["dropout"], "target_modules": targets, "fan_in_fan_out": True, "bias": "none",
              "inference_mode": True, "base_model_name_or_path": base, "modules_to_save": None, "use_rslora": False,
              "use_dora": False, "init_lora_weights": True}
    if token_ids:  # one list when only the (tied) embedding has rows, as PEFT writes it
        config["trainable_token_indices"] = next(iter(token_ids.values())) if len(token_ids) == 1 else token_ids
    return config, tensors, head


def save_adapter(out_dir: Path, state: dict[str, torch.Tensor], lora: dict, post_ln: bool,
                 base: str | None = None) -> Path:
    """Write an adapter directory (each file atomically; the config last, so a directory with a config is whole)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, tensors, head = peft_files(state, lora, post_ln, base)
    atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_tensors(tensors, p, metadata={"format": "pt"}))
    if head:
        atomic_write(out / HEAD_WEIGHTS, lambda p: save_tensors(head, p, metadata={"format": "gptlab"}))
    atomic_write(out / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return out


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A PEFT LoRA directory (ours or PEFT's) -> (its config, tensors under gptlab names as adapter_state writes
    them). Refuses what gptlab cannot apply (DoRA, other PEFT types, layers outside the blocks)."""
    d = Path(adapter_dir)
    if not (d / ADAPTER_CONFIG).is_file():
        raise GptlabError(f"{d} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    try:
        config = json.loads((d / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise GptlabError(f"{d / ADAPTER_CONFIG} is not readable JSON ({e})") from None
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("lora_bias"):
        raise GptlabError(f"{d}: only plain LoRA adapters apply (peft_type LORA, no DoRA, no LoRA bias)")
    if not isinstance(config.get("r"), int) or config["r"] < 1 or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise GptlabError(f"{d}: the adapter needs one rank r ≥ 1 for every layer")
    raw = read_safetensors(d / ADAPTER_WEIGHTS, "adapter weights")
    state: dict[str, torch.Tensor] = {}
    ids = config.get("trainable_token_indices") or {}
    if isinstance(ids, list):
        ids = {"wte": ids}
    for k, v in raw.items():
        name = k.removeprefix(PREFIX)
        if name.endswith(ROWS_SUFFIX):
            module = _our_module(name.removesuffix(ROWS_SUFFIX))
            key = "tokens_embed" if module == "wte" and "tokens_embed" in ids else module
            state[f"{module}.rows"] = v.float()
            state[f"{module}.ids"] = torch.tensor(ids.get(key) or ids.get("embed_tokens") or [], dtype=torch.long)
            continue
        for leaf in ("lora_A", "lora_B"):
            suffix = f".{leaf}.weight"
            if name.endswith(suffix):
                state[f"{_our_module(name.removesuffix(suffix))}.{leaf}"] = v.float()
                break
        else:
            raise GptlabError(f"{d / ADAPTER_WEIGHTS}: unexpected tensor {k} (not a LoRA layer of a GPT-2/GPT-1 block)")
    if (d / HEAD_WEIGHTS).is_file():
        state.update(read_safetensors(d / HEAD_WEIGHTS, "adapter head weights"))
    return config, state


def apply_adapter(model, config: dict, state: dict[str, torch.Tensor], where) -> None:
    """Give a plain GPT the adapter `read_adapter` returned: LoRA layers with its A and B, its trained token
    rows, its task head. Shapes are checked against the model (an adapter of another base is refused)."""
    from gptlab.model.lora import LoRALinear, TrainedRows, add_lora

    layers = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith((".lora_A", ".lora_B"))})
    rows = {k.removesuffix(".ids"): v for k, v in state.items() if k.endswith(".ids")}
    if any(k.startswith("head.") for k in state) and getattr(model, "head", None) is None:
        n_out = state["head.1.weight"].size(0)
        model.add_head("scalar" if n_out == 1 else "classifier", n_out, 0.0)
    try:
        add_lora(model, config["r"], float(config.get("lora_alpha", config["r"])), 0.0,
                 layers, token_ids=rows.get("wte", ()))
    except ValueError as e:
        raise GptlabError(f"{where}: {e}") from None
    modules = dict(model.named_modules())
    for name in layers:
        m = modules.get(name)
        a, b = state.get(f"{name}.lora_A"), state.get(f"{name}.lora_B")
        if not isinstance(m, LoRALinear) or a is None or b is None or a.shape != m.lora_A.shape or b.shape != m.lora_B.shape:
            raise GptlabError(f"{where}: the adapter's {name} does not fit this model (another base model?)")
        with torch.no_grad():
            m.lora_A.copy_(a), m.lora_B.copy_(b)
    for name in rows:
        m = modules.get(name)
        if not isinstance(m, TrainedRows) or state[f"{name}.rows"].shape != m.rows.shape:
            raise GptlabError(f"{where}: the adapter's trained rows of {name} do not fit this model")
        with torch.no_grad():
            m.rows.copy_(state[f"{name}.rows"])
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    if head:
        model.head.load_state_dict(head)


def merge_adapter(adapter, base_run, out_dir) -> Path:
    """`gptlab lora merge`: the base run + an adapter (a LoRA run dir, or a PEFT adapter dir) -> a run dir
    holding the merged plain model. A LoRA run's tokenizer comes with it (it may hold tokens it added)."""
    from gptlab.model.lora import merged_state
    from gptlab.run import CONFIG_FILE, check_vocab, load_run, read_run_config, write_run_config
    from gptlab.run.format import MODEL_FILE, load_state_into, save_model
    from gptlab.tokenizer import TOKENIZER_FILE, load_tokenizer

    adapter, out = Path(adapter), Path(out_dir)
    if (out / CONFIG_FILE).exists():
        raise GptlabError(f"{out} already holds a run; choose another --out")
    lora_run = (adapter / CONFIG_FILE).is_file()
    config, state = read_adapter(adapter / ADAPTER_DIR if lora_run else adapter)
    run = load_run(base_run)
    if (run.config.get("compression") or {}).get("modules"):
        raise GptlabError(f"{base_run} is quantized; merge into the dense run it came from")
    model, tok = run.model.float(), run.tokenizer
    if lora_run:
        tok = load_tokenizer(adapter / read_run_config(adapter).get("tokenizer", TOKENIZER_FILE))
    ids = state.get("wte.ids")
    need = max(int(ids.max()) + 1 if ids is not None and ids.numel() else 0, tok.vocab_size)
    if need > model.cfg.vocab_size:
        if need > tok.vocab_size:
            raise GptlabError(f"{adapter} trains token ids up to {need - 1}, beyond {base_run}'s vocabulary; merge "
                              "the LoRA run directory (it holds the tokenizer with those tokens)")
        model.resize_token_embeddings(need)
    check_vocab(model.cfg, tok, str(adapter))
    apply_adapter(model, config, state, adapter)
    with torch.device("meta"):
        plain = type(model)(model.cfg)
    plain = plain.to_empty(device="cpu")
    plain.tie_weights()
    load_state_into(plain, merged_state(model), adapter)
    out.mkdir(parents=True, exist_ok=True)
    save_model(plain, out / MODEL_FILE)  # the config last: a directory with one is a whole run
    write_run_config(out, plain.cfg, tok, stage="lora-merge",
                     init={"from": str(Path(base_run).resolve()), "adapter": str(adapter.resolve())})
    return out
