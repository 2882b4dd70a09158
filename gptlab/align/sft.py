"""InstructGPT step 1: supervised fine-tuning on demonstrations (`gptlab sft`).

A pretrained run gets the chat tokens (embeddings grown by `ensure_chat_tokens`), each conversation is
rendered with the one chat template (`render_ids`), and the model's fused cross-entropy is trained on the
assistant tokens only: target t is token t+1 where the template's assistant_mask is True (assistant content
and its closing `<|end|>`), -100 (ignored) elsewhere — system, user, role markers and the newline after
`<|end|>` predict nothing. Every assistant turn of a multi-turn conversation is trained.

Over-long conversations keep their start (the first block_size + 1 tokens); the count is reported, and a
conversation whose context holds no assistant token is dropped (and counted).

Packing (`pack=True`): short examples are placed first-fit-decreasing into windows of block_size tokens.
Each example brings its own inputs and targets, so a target never crosses into a neighbour (the first token
of the next example is not predicted from the previous one). Attention does cross example boundaries inside
a window (plain causal attention, positions counted from the window start, as in TRL's packed
ConstantLengthDataset): cheaper than padding; turn packing off where that matters.

Training runs on the one engine (`Trainer`); the run dir is an ordinary one, so `gptlab chat RUN_DIR` loads it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from gptlab.align.data import load_sft_examples
from gptlab.chat.template import CHAT_TOKENS, add_chat_tokens, ensure_chat_tokens, render_ids
from gptlab.errors import GptlabError
from gptlab.stage import EpochOrder, begin, eval_subsets, fit, load_pretrained, resolve_train, schedule, split_heldout
from gptlab.stage.lora import attach, resolve_lora, resume_token_ids
from gptlab.stage.models import random_model
from gptlab.model import GPT, GPTConfig
from gptlab.run import check_vocab
from gptlab.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from gptlab.train import distributed as D
from gptlab.run.lock import writes_run_dir

RECIPE = "sft"
# Small-model SFT defaults (TRL/OpenRLHF-like: AdamW, cosine to 10%, short warmup, no weight decay);
# InstructGPT trained 16 epochs with lr decay and residual dropout 0.2 on 175B — far too long for tiny models.
SFT_RECIPE: dict = dict(lr=1e-4, batch_size=16, schedule="cosine", min_lr_ratio=0.1, warmup_tokens=0, decay_tokens=0,
                        weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0, batch_warmup_tokens=0,
                        grad_accum=1, eval_interval=100, eval_iters=10, log_interval=10, checkpoint_interval=500)
EPOCHS, WARMUP_FRACTION = 3.0, 0.03
IGNORE = -100


class Sample(NamedTuple):
    x: list[int]  # input ids
    y: list[int]  # next-token targets, IGNORE where not an assistant token


def encode_sft(tok: Tokenizer, messages: list[dict], block_size: int) -> tuple[Sample, bool]:
    """A conversation -> (inputs, targets) of at most block_size tokens, and whether it was truncated."""
    ids, mask = render_ids(tok, messages, add_generation_prompt=False)
    truncated = len(ids) > block_size + 1
    ids, mask = ids[: block_size + 1], mask[: block_size + 1]
    return Sample(ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]), truncated


def pack_samples(samples: list[Sample], block_size: int) -> list[Sample]:
    """First-fit-decreasing into windows of ≤ block_size tokens (deterministic). Targets stay per example."""
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].x), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(samples[i].x)
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(block_size - n)
    return [Sample([t for i in b for t in samples[i].x], [t for i in b for t in samples[i].y]) for b in bins]


class SFTBatch(NamedTuple):
    x: torch.Tensor       # (B, T) right-padded inputs
    y: torch.Tensor       # (B, T) targets, IGNORE on pads and non-assistant tokens
    weight: float = 1.0   # this micro-batch's target tokens ÷ the step's mean per micro-batch


def collate(samples: list[Sample], pad: int, device=None) -> SFTBatch:
    T = max(len(s.x) for s in samples)
    x = torch.tensor([s.x + [pad] * (T - len(s.x)) for s in samples], dtype=torch.long)
    y = torch.tensor([s.y + [IGNORE] * (T - len(s.y)) for s in samples], dtype=torch.long)
    return SFTBatch(x.to(device), y.to(device))


def sft_loss(model: torch.nn.Module, b: SFTBatch) -> torch.Tensor:
    """Mean cross-entropy over the batch's assistant tokens (the model's fused CE skips IGNORE targets)."""
    return model(b.x, b.y)[1] * b.weight


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batches) -> float:
    total, n = 0.0, 0
    for b in batches:
        k = int((b.y != IGNORE).sum())
        if k:
            total += model(b.x, b.y)[1].item() * k
            n += k
    return total / max(n, 1)


def encode_all(tok: Tokenizer, convs: list[list[dict]], T: int) -> tuple[list[Sample], int, int]:
    """-> (samples with at least one target, truncated count, dropped count)."""
    out, n_trunc, n_drop = [], 0, 0
    for c in convs:
        s, tr = encode_sft(tok, c, T)
        n_trunc += tr
        if all(t == IGNORE for t in s.y):
            n_drop += 1
            continue
        out.append(s)
    return out, n_trunc, n_drop


@writes_run_dir()
def sft(out_dir: str | Path, data, *, init_from: str | Path | None = None, epochs: float | None = None,
        pack: bool = False, val_fraction: float = 0.05, train: dict | None = None, resume: bool = False,
        skip_empty: bool = False, quiet: bool = False, preset_name: str | None = None,
        tokenizer: str | Path | None = None, model_overrides: dict | None = None, lora: dict | None = None) -> dict:
    """Supervised fine-tuning into `out_dir` from the pretrained run `init_from` (or from random weights of
    `preset_name` with the tokenizer file `tokenizer`: an omni model trained on its chat data alone) ->
    final metrics (loss, val_loss, step, n_train, n_val, n_truncated, ...). `train` overrides TrainConfig keys."""
    st = begin(out_dir, "sft", resume)
    out, init_from = st.out, st.init_from(init_from)
    if not resume and (init_from is None) == (preset_name is None):
        raise GptlabError("sft starts from --from RUN_DIR (a pretrained run), or from random weights with "
                          "--preset P --tokenizer FILE; give one of the two")
    if model_overrides and (resume or init_from is not None):  # not silently ignored
        raise GptlabError("--model.* options shape a new model from --preset; a run started --from another run "
                          "(or resumed) keeps that run's model")
    if not resume and preset_name is not None and tokenizer is None:
        raise GptlabError("sft --preset needs --tokenizer FILE (e.g. the omni-data folder's tokenizer.gptlab.json)")
    data = st.data(data, "demonstrations: JSONL/JSON/CSV")
    pack, val_fraction = st.kept("pack", pack), st.kept("val_fraction", val_fraction)
    epochs = epochs if epochs is not None else st.section().get("epochs", EPOCHS)
    cfg, given = resolve_train(RECIPE, SFT_RECIPE, *st.train_layers(train or {}))
    lcfg = resolve_lora(st, lora)

    convs = load_sft_examples(data, skip_empty=skip_empty)
    train_idx, val_idx = split_heldout(len(convs), val_fraction, cfg.seed)

    torch.manual_seed(cfg.seed)  # the new embedding rows
    new_tokens = resume_token_ids(st)
    if resume:
        tok = load_tokenizer(out / st.saved.get("tokenizer", TOKENIZER_FILE))
        model = GPT(GPTConfig.from_dict(st.saved["model"]))
    elif init_from is not None:
        model, tok = load_pretrained(init_from)
        tok, new_tokens = add_chat_tokens(tok, model)
    else:
        if lcfg.enabled:
            raise GptlabError("--lora.r adapts a pretrained model: give --from RUN_DIR, not --preset")
        tok = ensure_chat_tokens(load_tokenizer(tokenizer))
        model = random_model(preset_name, tok, model_overrides)
    check_vocab(model.cfg, tok, "sft")
    lora_section = attach(model, lcfg, new_tokens, quiet=quiet or resume)
    T = min(cfg.block_size or model.cfg.block_size, model.cfg.block_size)
    cfg.block_size = T
    train_s, n_trunc, n_drop = encode_all(tok, [convs[i] for i in train_idx], T)
    val_s, v_trunc, v_drop = encode_all(tok, [convs[i] for i in val_idx], T)
    if not train_s:
        raise GptlabError(f"no training example has an assistant token within the first {T} tokens")
    n_examples = len(train_s)
    if pack:
        train_s = pack_samples(train_s, T)
    info, device = D.init_distributed(cfg.device)
    cfg = schedule(cfg, given, len(train_s), epochs, WARMUP_FRACTION, info.world)
    model = model.to(device)
    stage_cfg = {"data": str(Path(data).resolve()) if isinstance(data, (str, Path)) else None, "epochs": epochs,
                 "pack": pack, "val_fraction": val_fraction, "n_train": n_examples, "n_val": len(val_s),
                 "n_truncated": n_trunc + v_trunc, "n_dropped": n_drop + v_drop,
                 "max_iters_given": "max_iters" in given}
    if info.is_main:
        init_cfg = st.saved.get("init") if resume else (
            {"from": str(Path(init_from).resolve()), "weights": "pretrained"} if init_from is not None else
            {"weights": "random", "preset": preset_name, "tokenizer": str(Path(tokenizer).resolve())})
        st.record(model.cfg, tok, stage="sft", train=cfg.to_dict(), sft=stage_cfg, init=init_cfg,
                  **({"lora": lora_section} if lora_section else {}))
        if not quiet:
            print(f"sft: {model.num_params() / 1e6:.2f}M parameters · context {T} · chat tokens {' '.join(CHAT_TOKENS)}")
            print(f"data: {n_examples:,} train / {len(val_s):,} val conversations"
                  + (f" packed into {len(train_s):,} windows" if pack else "")
                  + f" · {n_trunc + v_trunc} truncated to {T + 1} tokens (start kept)"
                  + (f" · {n_drop + v_drop} dropped (no assistant token in the context)" if n_drop + v_drop else ""))
            print(f"train: batch {cfg.batch_size}×{cfg.grad_accum}×{info.world} · lr {cfg.lr:g} {cfg.schedule} · "
                  f"warmup {cfg.warmup_iters} · {cfg.max_iters} steps ({epochs:g} epochs) · {cfg.dtype} on {device}")
    if n_trunc + v_trunc and not quiet:
        print(f"warning: {n_trunc + v_trunc} conversation(s) longer than {T + 1} tokens were truncated (start kept)",
              file=sys.stderr)
    D.barrier(info)

    pad = tok.eot_id
    order = EpochOrder(len(train_s), cfg.seed, [len(s.x) for s in train_s], cfg.group_by_length)
    n_tgt = [sum(t != IGNORE for t in s.y) for s in train_s]
    tokens_per_sample = max(1, round(sum(len(s.x) for s in train_s) / len(train_s)))

    def batch_fn(step: int, sl: slice, n_global: int) -> SFTBatch:
        b = collate([train_s[i] for i in order.indices(step, sl, n_global)], pad, device)
        return b._replace(weight=order.micro_weight(step, sl, n_global, n_tgt.__getitem__))

    by_len = sorted(range(len(val_s)), key=lambda i: len(val_s[i].x))
    [subset] = eval_subsets(cfg.seed, (len(val_s), cfg.eval_iters * cfg.batch_size))
    subset.sort(key=lambda i: len(val_s[i].x))

    def val_batches(idx: list[int]):
        for k in range(0, len(idx), cfg.batch_size):
            yield collate([val_s[i] for i in idx[k:k + cfg.batch_size]], pad, device)

    def eval_fn(m: torch.nn.Module, final: bool) -> dict:
        v = eval_loss(m, val_batches(by_len if final else subset))
        return {"val_loss": v, "val_ppl": math.exp(min(v, 50))}

    result = fit(model, cfg, st, batch_fn, info=info, tokens_per_sample=tokens_per_sample, loss_fn=sft_loss,
                 eval_fn=eval_fn if val_s else None, device=device)
    result.update(n_train=n_examples, n_val=len(val_s), n_truncated=n_trunc + v_trunc, n_dropped=n_drop + v_drop)
    if info.is_main and not quiet:
        vl = result.get("val_loss")
        print(f"done: step {result['step']}" + (f" · val loss {vl:.4f} on assistant tokens" if vl is not None else "")
              + f" · run dir {out} (try: gptlab chat {out})")
    return result
