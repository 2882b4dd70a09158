"""Direct Preference Optimization (Rafailov et al. 2023): `gptlab dpo`, the one-stage alternative to RM + PPO.

The policy starts from the SFT run; the reference is that same SFT run, frozen. Because the reference never
changes, its summed log-probabilities of every (prompt, response) are computed ONCE before training (under
no_grad, in the training dtype, in eval mode) and stored per example — TRL's `precompute_ref_log_probs`: no
second model in memory and no reference forward per step; only the pairs the schedule will visit are scored
(a fraction of an epoch scores that fraction). A resumed run recomputes them from the SFT run.

Pairs: a prompt with K ranked responses gives all C(K,2) pairs (better, worse), the comparisons the reward
model trains on; HH / chosen-rejected rows give one pair. The held-out split is by prompt, before pairs are
formed, so no held-out prompt is trained on. Sequences are scored like the reward model's (prompt with its
generation prompt + response + <|end|>); the log-probability covers the response tokens and its <|end|>.
Dropout is off (the log-probabilities of policy and reference must be comparable). One engine: `Trainer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from gptlab.align.data import load_preferences
from gptlab.align.losses import dpo_loss, ranking_accuracy, token_logprobs
from gptlab.align.reward import Encoded, encode_response, prompt_ids
from gptlab.chat.template import add_chat_tokens
from gptlab.stage.lora import attach, resolve_lora, resume_token_ids
from gptlab.errors import GptlabError
from gptlab.stage import (NO_DROPOUT, EpochOrder, begin, eval_subsets, fit, load_pretrained, resolve_train, schedule,
                          single_process, split_heldout, unwrap)
from gptlab.model import GPT, GPTConfig
from gptlab.run import check_vocab
from gptlab.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from gptlab.train import distributed as D
from gptlab.runtime import autocast
from gptlab.train.engine import compute_dtype
from gptlab.run.lock import writes_run_dir

RECIPE = "dpo"
# DPO paper: RMSprop lr 1e-6, batch 64, warmup 150 steps, β 0.1; small models here need a larger lr
DPO_RECIPE: dict = dict(lr=1e-5, batch_size=8, schedule="cosine", min_lr_ratio=0.0, warmup_tokens=0, decay_tokens=0,
                        weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0, batch_warmup_tokens=0,
                        grad_accum=1, eval_interval=50, eval_iters=8, log_interval=10, checkpoint_interval=500)
WARMUP_FRACTION = 0.1


class Pair(NamedTuple):
    chosen: Encoded
    rejected: Encoded


def make_pairs(tok: Tokenizer, prefs, T: int) -> tuple[list[Pair], int]:
    """All C(K,2) (better, worse) pairs of each preference -> (pairs, count with a truncated sequence)."""
    out, n_trunc = [], 0
    for p in prefs:
        pid = prompt_ids(tok, p.prompt)
        enc = [encode_response(tok, pid, r, T) for r in p.responses]
        for i in range(len(enc)):
            for j in range(i + 1, len(enc)):
                out.append(Pair(enc[i], enc[j]))
                n_trunc += enc[i].truncated or enc[j].truncated
    return out, n_trunc


class DPOBatch(NamedTuple):
    x: torch.Tensor          # (2B, T): B chosen sequences then their B rejected ones, right-padded
    start: torch.Tensor      # (2B,) first response token
    end: torch.Tensor        # (2B,) the closing <|end|>
    ref_chosen: torch.Tensor     # (B,) reference summed log-probs (zeros while they are being computed)
    ref_rejected: torch.Tensor   # (B,)


def collate(pairs: list[Pair], pad: int, ref: torch.Tensor | None = None, idx: list[int] | None = None,
            device=None) -> DPOBatch:
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    T = max(len(s.ids) for s in seqs)
    x = torch.tensor([s.ids + [pad] * (T - len(s.ids)) for s in seqs], dtype=torch.long)
    start = torch.tensor([s.start for s in seqs], dtype=torch.long)
    end = torch.tensor([s.end for s in seqs], dtype=torch.long)
    r = ref[idx] if ref is not None else torch.zeros(len(pairs), 2)
    return DPOBatch(x.to(device), start.to(device), end.to(device), r[:, 0].to(device), r[:, 1].to(device))


def sequence_logprobs(model: torch.nn.Module, x: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Σ_{t=start..end} log p(x_t | x_<t) per row: (M, T), (M,), (M,) -> (M,) fp32. The LM head runs only on
    the positions that predict a response token (never on the prompt or the padding)."""
    raw = unwrap(model)
    h = raw.hidden(x)  # (M, T, C)
    pos = torch.arange(x.size(1) - 1, device=x.device)[None, :]  # position p predicts token p + 1
    m = (pos >= start[:, None] - 1) & (pos < end[:, None])  # (M, T-1)
    rows, cols = m.nonzero(as_tuple=True)
    logits = raw.lm_head(h[rows, cols])  # (n, V)
    lp = token_logprobs(logits[None], x[rows, cols + 1][None])[0]  # (n,) fp32
    return torch.zeros(x.size(0), device=x.device, dtype=torch.float32).index_add(0, rows, lp)


def dpo_terms(model, b: DPOBatch, beta: float):
    lp = sequence_logprobs(model, b.x, b.start, b.end)
    B = b.ref_chosen.numel()
    return dpo_loss(lp[:B], lp[B:], b.ref_chosen, b.ref_rejected, beta)


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, pairs: list[Pair], pad: int, batch_size: int, device,
                       autocast) -> torch.Tensor:
    """(P, 2) summed log-probs of each pair's (chosen, rejected) response under `model` (the frozen reference)."""
    was = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2)
    order = sorted(range(len(pairs)), key=lambda i: max(len(pairs[i].chosen.ids), len(pairs[i].rejected.ids)))
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        b = collate([pairs[i] for i in idx], pad, device=device)
        with autocast:
            lp = sequence_logprobs(model, b.x, b.start, b.end).cpu()
        out[idx, 0], out[idx, 1] = lp[:len(idx)], lp[len(idx):]
    model.train(was)
    return out


@torch.no_grad()
def evaluate(model, batches, beta: float) -> dict:
    loss_sum, right, margin, n = 0.0, 0.0, 0.0, 0
    for b in batches:
        loss, c, r = dpo_terms(model, b, beta)
        k = c.numel()
        loss_sum += loss.item() * k
        right += ranking_accuracy(torch.stack([c, r], 1), torch.ones(k, 2, dtype=torch.bool)).item() * k
        margin += (c - r).sum().item()
        n += k
    n = max(n, 1)
    return {"val_loss": loss_sum / n, "heldout_reward_accuracy": right / n, "heldout_margin": margin / n}


@writes_run_dir()
def dpo(out_dir: str | Path, data, *, init_from: str | Path | None = None, beta: float = 0.1, epochs: float = 1.0,
        heldout_fraction: float = 0.1, train: dict | None = None, resume: bool = False, quiet: bool = False,
        lora: dict | None = None) -> dict:
    """DPO into `out_dir` from the SFT run `init_from` (also the frozen reference) on preference `data` ->
    final metrics ("heldout_reward_accuracy", "heldout_margin", "val_loss", "step", ...)."""
    st = begin(out_dir, "dpo", resume)
    out = st.out
    init_from = st.saved.get("init", {}).get("from") if resume else init_from  # the reference is fixed at the start
    if init_from is None and not resume:
        raise GptlabError("dpo needs --from RUN_DIR (the SFT run: the starting policy and the frozen reference)")
    data = st.data(data, "a preference file")
    beta, epochs, heldout_fraction = st.kept("beta", beta), st.kept("epochs", epochs), st.kept("heldout_fraction", heldout_fraction)
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise GptlabError(f"--beta must be positive, got {beta!r}")
    cfg, given = resolve_train(RECIPE, DPO_RECIPE, *st.train_layers(train or {}))
    prefs = load_preferences(data, quiet=quiet)
    train_idx, held_idx = split_heldout(len(prefs), heldout_fraction, cfg.seed)

    lcfg = resolve_lora(st, lora)
    torch.manual_seed(cfg.seed)
    ref_model, tok = load_pretrained(init_from, NO_DROPOUT)  # the SFT run: reference (and the start when not resuming)
    tok, new_tokens = add_chat_tokens(tok, ref_model)
    new_tokens = resume_token_ids(st) or new_tokens
    if resume:
        tok = load_tokenizer(out / st.saved.get("tokenizer", TOKENIZER_FILE))
        model = GPT(GPTConfig.from_dict(st.saved["model"]))
        attach(ref_model, lcfg, new_tokens, quiet=True)  # QLoRA: the reference is the same quantized base
    else:
        model = ref_model  # with LoRA its adapters start at zero: the reference log-probs are the base's
    check_vocab(model.cfg, tok, "dpo")
    lora_section = attach(model, lcfg, new_tokens, quiet=quiet or resume)
    T = min(cfg.block_size or model.cfg.block_size, model.cfg.block_size)
    cfg.block_size = T
    train_pairs, n_trunc = make_pairs(tok, [prefs[i] for i in train_idx], T)
    held_pairs, h_trunc = make_pairs(tok, [prefs[i] for i in held_idx], T)
    info, device = D.init_distributed(cfg.device)
    single_process(info, "dpo")
    cfg = schedule(cfg, given, len(train_pairs), epochs, WARMUP_FRACTION)
    model, ref_model = model.to(device), ref_model.to(device)
    tokens_per_sample = max(1, round(sum(len(p.chosen.ids) + len(p.rejected.ids) for p in train_pairs) / len(train_pairs)))
    # the reference's log-probs in the dtype the Trainer will train in (the same decision, printed once)
    amp = autocast(device, compute_dtype(cfg, model, device, tokens_per_sample))
    pad = tok.eot_id
    order = EpochOrder(len(train_pairs), cfg.seed)
    n_global = cfg.batch_size * cfg.grad_accum
    # only the pairs this schedule will visit need reference log-probs (all of them from one epoch on);
    # the others stay NaN, so a schedule/data mismatch would stop training instead of passing silently
    needed = sorted({i for s in range(cfg.max_iters) for i in order.indices(s, slice(0, n_global), n_global)})
    ref_train = torch.full((len(train_pairs), 2), float("nan"))
    ref_train[needed] = reference_logprobs(ref_model, [train_pairs[i] for i in needed], pad, cfg.batch_size,
                                           device, amp)
    ref_held = reference_logprobs(ref_model, held_pairs, pad, cfg.batch_size, device, amp)
    del ref_model  # only its log-probs are needed from here on (when not resuming it IS the policy)

    stage_cfg = {"data": str(Path(data).resolve()) if isinstance(data, (str, Path)) else None, "beta": beta,
                 "epochs": epochs, "heldout_fraction": heldout_fraction, "pairs": "all C(K,2) pairs per prompt",
                 "n_train_pairs": len(train_pairs), "n_heldout_pairs": len(held_pairs),
                 "n_truncated": n_trunc + h_trunc, "max_iters_given": "max_iters" in given}
    init_cfg = st.saved.get("init") if resume else {"from": str(Path(init_from).resolve()), "weights": "sft"}
    st.record(model.cfg, tok, stage="dpo", train=cfg.to_dict(), dpo=stage_cfg, init=init_cfg,
              **({"lora": lora_section} if lora_section else {}))
    if not quiet:
        print(f"dpo: {model.num_params() / 1e6:.2f}M parameters · β {beta:g} · reference = {init_from} (log-probs "
              f"precomputed) · {len(train_pairs):,} train / {len(held_pairs):,} held-out pairs "
              f"({n_trunc + h_trunc} with truncation) · {cfg.max_iters} steps · lr {cfg.lr:g} · {cfg.dtype} on {device}")

    def batch_fn(step: int, sl: slice, n_global: int) -> DPOBatch:
        idx = order.indices(step, sl, n_global)
        return collate([train_pairs[i] for i in idx], pad, ref_train, idx, device)

    def held_batches(idx: list[int]):
        for k in range(0, len(idx), cfg.batch_size):
            chunk = idx[k:k + cfg.batch_size]
            yield collate([held_pairs[i] for i in chunk], pad, ref_held, chunk, device)

    [subset] = eval_subsets(cfg.seed, (len(held_pairs), cfg.eval_iters * cfg.batch_size))

    def eval_fn(m: torch.nn.Module, final: bool) -> dict:
        return evaluate(m, held_batches(list(range(len(held_pairs))) if final else subset), beta)

    result = fit(model, cfg, st, batch_fn, info=info, tokens_per_sample=tokens_per_sample,
                 loss_fn=lambda m, b: dpo_terms(m, b, beta)[0], eval_fn=eval_fn if held_pairs else None,
                 device=device)
    if not quiet and "heldout_reward_accuracy" in result:
        print(f"done: step {result['step']} · held-out reward accuracy {result['heldout_reward_accuracy']:.4f} · "
              f"margin {result['heldout_margin']:+.4f} · run dir {out}")
    return result
