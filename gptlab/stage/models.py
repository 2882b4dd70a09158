"""The model a stage starts from: a run's weights (without its task head), or a preset at random."""

from __future__ import annotations

from pathlib import Path

import torch

from gptlab.config import coerce
from gptlab.errors import GptlabError
from gptlab.model import GPT, GPTConfig, preset
from gptlab.run import check_vocab, read_run_config
from gptlab.run.format import MODEL_FILE, load_state_into, read_safetensors
from gptlab.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

# model keys that may change when a stage starts from a run (the rest is fixed by its weights)
FROM_RUN_MODEL_KEYS = ("embd_pdrop", "attn_pdrop", "resid_pdrop", "head_pdrop", "attn_backend")
NO_DROPOUT = {"embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0}


def check_model_overrides(overrides: dict, from_run: bool) -> dict:
    bad = [k for k in overrides if k in ("head", "head_out")]
    if bad:
        raise GptlabError(f"--model.{bad[0]} is set by the task type, not by hand")
    if from_run:
        fixed = [k for k in overrides if k not in FROM_RUN_MODEL_KEYS]
        if fixed:
            raise GptlabError(f"--model.{fixed[0]} cannot change when fine-tuning a pretrained run (its weights fix "
                              f"it); only {', '.join(FROM_RUN_MODEL_KEYS)} can")
    return coerce(GPTConfig, overrides, "model")


def load_pretrained(run_dir: str | Path, overrides: dict | None = None) -> tuple[GPT, Tokenizer]:
    """A run's model (without any task head it may carry) and tokenizer, on the CPU in fp32."""
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    tok = load_tokenizer(run_dir / saved.get("tokenizer", TOKENIZER_FILE))
    cfg = GPTConfig.from_dict({**saved["model"], "head": "", "head_out": 0, **check_model_overrides(overrides or {}, True)})
    check_vocab(cfg, tok, str(run_dir))
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    sd = {k: v for k, v in read_safetensors(run_dir / MODEL_FILE, "model weights").items() if not k.startswith("head.")}
    load_state_into(model, sd, run_dir / MODEL_FILE)
    return model.float(), tok


def build_model_config(preset_name: str, model_overrides: dict, vocab_size: int) -> GPTConfig:
    """Preset ← overrides; the vocabulary comes from the tokenizer unless set explicitly."""
    overrides = dict(model_overrides)
    overrides.setdefault("vocab_size", vocab_size)
    return preset(preset_name, **overrides)


def random_model(preset_name: str, tokenizer: Tokenizer, overrides: dict | None = None) -> GPT:
    cfg = build_model_config(preset_name, check_model_overrides(overrides or {}, False), tokenizer.vocab_size)
    check_vocab(cfg, tokenizer, f"preset {preset_name}")
    model = GPT(cfg)
    init_code_embeddings(model, tokenizer)
    return model


@torch.no_grad()
def init_code_embeddings(model: GPT, tokenizer: Tokenizer, seed: int = 0) -> None:
    """An omni vocabulary's image/audio code rows start as a fixed random projection of what each code
    stands for (its patch, its mel frame), at the usual init scale: codes that look or sound alike start
    near each other, so a small model generalises from a few thousand images or voices instead of learning
    each code's meaning from scratch. Text rows keep their random init."""
    g = torch.Generator().manual_seed(seed)
    for modality, codec in getattr(tokenizer, "codecs", {}).items():
        vectors = None if codec is None else codec.code_vectors()
        if vectors is None:
            continue
        v = torch.as_tensor(vectors, dtype=torch.float32)
        v = (v - v.mean(0)) / (v.std(0) + 1e-6)                             # (K, D) standardised features
        rows = v @ torch.randn(v.shape[1], model.cfg.n_embd, generator=g)  # (K, C)
        rows *= model.cfg.init_std / rows.std()
        span = tokenizer.code_range(modality)
        model.wte.weight[span.start:span.stop] = rows.to(model.wte.weight.dtype)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model behind torch.compile / DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def single_process(info, stage: str) -> None:
    if info.enabled:
        raise GptlabError(f"gptlab {stage} runs in one process (its loss reads hidden states outside the "
                          "DDP forward); run it without torchrun")
