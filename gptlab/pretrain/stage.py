"""Generative pretraining stage: prepared token shards + a preset + a recipe -> a run directory."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import torch

from gptlab.data.loader import TokenData
from gptlab.errors import GptlabError
from gptlab.model import GPT, GPTConfig
from gptlab.run import check_vocab
from gptlab.sample import sample
from gptlab.stage import begin, fit, load_pretrained
from gptlab.stage.lora import attach, resolve_lora, resume_token_ids
from gptlab.stage.models import build_model_config
from gptlab.tokenizer import TOKENIZER_FILE, load_tokenizer
from gptlab.train import distributed as D
from gptlab.train.config import RECIPES, TrainConfig, resolve_train
from gptlab.run.lock import writes_run_dir

DEFAULT_PRESET = "small-4x128"


@torch.no_grad()
def _eval_loss(model: GPT, batches) -> float:
    total, n = 0.0, 0
    for x, y in batches:
        _, loss = model(x, y)
        total += loss.item() * x.numel()
        n += x.numel()
    return total / max(n, 1)


def _check_same_model(saved: GPTConfig, preset_name: str | None, overrides: dict, out: Path) -> None:
    """--resume continues the saved model: a --preset or --model.* that asks for another one is refused."""
    asked = build_model_config(preset_name, overrides, saved.vocab_size).to_dict() if preset_name else \
        {**saved.to_dict(), **GPTConfig.from_dict({**saved.to_dict(), **overrides}).to_dict()}
    diff = [f"{k} {saved.to_dict()[k]!r} → {v!r}" for k, v in asked.items() if saved.to_dict().get(k) != v]
    if diff:
        raise GptlabError(f"--resume continues the model {out} was started with; the --preset/--model.* given ask "
                          f"for another ({', '.join(diff[:4])}): drop them, or start a new run in another --out")


@writes_run_dir()
def pretrain(data_dir: str, out_dir: str, preset_name: str | None = None, recipe: str = "nanogpt",
             model_overrides: dict | None = None, train_layers: tuple[dict, ...] = (), resume: bool = False,
             quiet: bool = False, init_from: str | Path | None = None, lora: dict | None = None) -> dict:
    """Pretrain a `preset_name` model from random weights, or continue pretraining the run `init_from` (its
    weights, architecture and tokenizer; with `lora`, adapters over its frozen weights) on `data_dir`."""
    data = TokenData(data_dir)
    tok = data.tokenizer()
    st = begin(out_dir, "pretrain", resume)
    out, init_from = st.out, st.init_from(init_from)
    lcfg = resolve_lora(st, lora)
    start = None
    if init_from is not None and not resume:
        if preset_name or model_overrides:
            raise GptlabError("--from continues a run's model: --preset and --model.* do not apply")
        start, run_tok = load_pretrained(init_from)
        if run_tok.to_dict() != tok.to_dict():
            raise GptlabError(f"{data_dir} was not tokenized with {init_from}'s tokenizer; prepare it with "
                              f"--tokenizer {Path(init_from) / TOKENIZER_FILE}")
    elif lcfg.enabled and not resume:
        raise GptlabError("--lora.r adapts pretrained weights: continue a run with --from RUN_DIR")
    if resume:  # the saved run config wins for the model; train keys may be changed (e.g. more steps)
        saved_tok = load_tokenizer(out / st.saved.get("tokenizer", TOKENIZER_FILE))
        if saved_tok.to_dict() != tok.to_dict():
            raise GptlabError(f"{data_dir} was tokenized with a different tokenizer than the run in {out}; "
                              "resume with the data the run was trained on")
        model_cfg = GPTConfig.from_dict(st.saved["model"])
        recipe = st.saved.get("train", {}).get("recipe", recipe)
        _check_same_model(model_cfg, preset_name, model_overrides or {}, out)
    elif start is not None:
        model_cfg = start.cfg
    else:
        model_cfg = build_model_config(preset_name or DEFAULT_PRESET, model_overrides or {}, tok.vocab_size)
        if model_cfg.head:
            raise GptlabError("pretraining trains the LM head only; task heads are added by `gptlab finetune`")
    check_vocab(model_cfg, tok, "pretrain")
    if data.vocab_size != tok.vocab_size:
        raise GptlabError(f"data in {data_dir} was tokenized with vocab {data.vocab_size}, its tokenizer has {tok.vocab_size}")
    if recipe not in RECIPES:
        raise GptlabError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    cfg: TrainConfig = resolve_train(recipe, RECIPES[recipe], *st.train_layers(*train_layers))[0]
    T = cfg.block_size or model_cfg.block_size
    if T > model_cfg.block_size:
        raise GptlabError(f"train.block_size {T} exceeds the model context {model_cfg.block_size}")
    cfg = dataclasses.replace(cfg, block_size=T)

    _warn_if_schedule_outlasts_run(cfg, T)
    info, device = D.init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)  # same init on every rank
    model = start if start is not None else GPT(model_cfg)
    lora_section = attach(model, lcfg, resume_token_ids(st), quiet=quiet or resume or not info.is_main)
    model = model.to(device)
    if info.is_main:
        init = st.saved.get("init") if resume else ({"from": str(Path(init_from).resolve()), "weights": "pretrained"}
                                                     if init_from is not None else None)
        st.record(model_cfg, tok, stage="pretrain", train=cfg.to_dict(),
                  data={"dir": str(Path(data_dir).resolve()), "vocab_size": data.vocab_size},
                  **({"init": init} if init else {}), **({"lora": lora_section} if lora_section else {}))
        if not quiet:
            origin = ("resumed run" if resume else f"continued from {init_from}" if init_from else
                      f"preset {preset_name or DEFAULT_PRESET}" + (" + overrides" if model_overrides else ""))
            print(f"model: {origin} · {model.num_params() / 1e6:.2f}M parameters · "
                  f"{model_cfg.n_layer} layers × {model_cfg.n_embd} · context {model_cfg.block_size} · "
                  f"vocab {model_cfg.vocab_size} · attention {','.join(model_cfg.attention)}")
            print(f"train: recipe {cfg.recipe} · batch {cfg.batch_size}×{cfg.grad_accum}×{info.world} × {T} tokens · "
                  f"lr {cfg.lr:g} · {cfg.max_iters} steps · {cfg.dtype} on {device}")
    D.barrier(info)

    eval_batches = data.fixed_eval_batches(cfg.eval_iters, cfg.batch_size, T, cfg.seed, device=device) \
        if cfg.eval_iters else []

    def batch_fn(step: int, sl: slice, n_global: int):
        return data.get_batch(step, n_global, T, cfg.seed, sample_slice=sl, device=device)

    def eval_fn(m: GPT, final: bool) -> dict:
        if final:  # every val token predicted once, whatever eval_iters says
            return {"val_loss": _eval_loss(m, data.iter_eval_windows(T, cfg.batch_size, device=device))}
        return {"val_loss": _eval_loss(m, eval_batches)}

    def sample_fn(m: GPT, step: int) -> str:
        g = torch.Generator(device=device).manual_seed(cfg.seed + step)  # never touches the training RNG
        start = torch.tensor([[tok.eot_id]], device=device)
        return tok.decode(sample(m, start, cfg.sample_tokens, 0.8, 200, generator=g)[0, 1:].tolist())

    result = fit(model, cfg, st, batch_fn, info=info, tokens_per_sample=T, eval_fn=eval_fn, sample_fn=sample_fn,
                 device=device)
    if info.is_main and not quiet:
        vl = result.get("val_loss", float("nan"))
        print(f"done: step {result['step']} · val loss {vl:.4f} (ppl {math.exp(min(vl, 50)):.2f}) on the whole val split"
              f" · run dir {out}")
    return result


def _warn_if_schedule_outlasts_run(cfg: TrainConfig, T: int) -> None:
    """The papers' schedules are sized for 300B-token runs; on a short run they never leave warmup."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    run_tokens = cfg.max_tokens or cfg.max_iters * cfg.batch_size * cfg.grad_accum * world * T
    long = [f"{k}={getattr(cfg, k):,}" for k in ("warmup_tokens", "batch_warmup_tokens") if getattr(cfg, k) > run_tokens]
    if cfg.warmup_tokens == 0 and cfg.warmup_iters >= cfg.max_iters > 0:
        long.append(f"warmup_iters={cfg.warmup_iters:,}")
    if long and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: recipe {cfg.recipe}: {', '.join(long)} exceeds this run ({run_tokens:,} tokens, "
              f"{cfg.max_iters:,} steps), so the learning rate never reaches its maximum; override these keys "
              "for short runs (e.g. --train.warmup_tokens, --train.decay_tokens, --train.warmup_iters)", file=sys.stderr)
